"""GPU check (UNVERIFIED: written without a GPU; no session so far had one to run it): vLLM serves a tunelab run
the way tunelab generates with it.

    python scripts/gpu_vllm_check.py RUN_DIR [--prompts "2 + 3" "Hi"] [--max-tokens 32] [--dtype float32]

1. tunelab: the run loaded with its adapter (`load_run`), prompts rendered with the run's chat template,
   greedy completion ids from `tunelab.sampling.sample` — the reference;
2. vLLM + LoRA: `LLM(base, enable_lora=True)` and `LoRARequest` on the run's PEFT `adapter/` folder (methods
   lora and qlora — vLLM has no DoRA, MoRA or LoReFT adapters); the base is the local folder tunelab
   resolves the run's `model.name` to (an alias becomes its converted safetensors folder, so nothing is
   downloaded: the GPU machine has no internet);
3. vLLM on the merged HF folder (`tunelab export RUN --merged`).

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
    args = ap.parse_args()

    import yaml

    from tunelab.export import export_merged
    from tunelab.models.load import resolve

    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    ids, want, tok = tunelab_greedy(str(run), args.prompts, args.max_tokens, args.dtype)
    ok = True
    adapter = run / "adapter" / "adapter_config.json"
    if adapter.exists() and cfg.get("method") in ("lora", "qlora"):
        rank = json.loads(adapter.read_text())["r"]
        got = vllm_greedy(resolve(cfg["model"]["name"]), ids, args.max_tokens, args.dtype, (str(adapter.parent), rank))
        ok &= compare("vllm + LoRARequest", want, got, tok)
    else:
        print(f"[vllm + LoRARequest] skipped: method {cfg.get('method')} is not a vLLM LoRA")
    with tempfile.TemporaryDirectory() as tmp:
        merged = export_merged(run, Path(tmp) / "merged")
        ok &= compare("vllm merged folder", want, vllm_greedy(str(merged), ids, args.max_tokens, args.dtype), tok)
    print("ALL EQUAL" if ok else "SOME DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
