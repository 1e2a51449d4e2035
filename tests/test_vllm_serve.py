"""vLLM serves what tunelab trains, checked through a real OpenAI client against `tunelab generate`.

Three kinds of run on SmolLM2-135M (trained a few steps here), each behind vLLM's OpenAI server on localhost:

* adapters: one server on the base model with `--enable-lora --lora-modules lora=RUN/adapter rslora=RUN/adapter`
  — a LoRA run (all-linear) and an rsLoRA run (scale α/√r, three target modules, per-module r and α through
  PEFT's rank_pattern / alpha_pattern);
* `tunelab export RUN --merged OUT`, served as a plain model;
* a full-finetune run's `model/` folder, served as a plain model.

For every prompt: the chat completion (greedy, 16 tokens, the run's chat template) has the text `tunelab generate`
prints, vLLM's prompt ids are tunelab's, and vLLM's prompt log-probs (`prompt_logprobs`, float32) are tunelab's
forward within PROMPT_LOGP_TOL. The adapters must matter: their log-probs differ from the base model's by far more
than that tolerance. Needs vLLM (`make test-vllm`); skipped with the reason otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import alpaca_rows, write_config, write_jsonl
from tests.vllm_support import skip_reason, vllm_server

REASON = skip_reason()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

from tunelab.cli import main  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["Add the numbers. 2 + 3", "What is the capital of France?", "Add the numbers. 40 + 17 please"]
MAX_TOKENS = 16
# float32 on both sides; the rest is summation order (vLLM's CPU attention and GEMM kernels vs torch's SDPA).
PROMPT_LOGP_TOL = 5e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"lora", "rslora", "full"}: finished tunelab runs (a few steps each, short rows)."""
    tmp = tmp_path_factory.mktemp("vllm_runs")
    data = write_jsonl(tmp / "d.jsonl", alpaca_rows(12))
    common = dict(model={"name": "smollm2-135m"}, samples={"n_heldout": 0},
                  data={"train": str(data), "max_length": 64, "eval_max": 2, "eval_fraction": 0.2})
    specs = {"lora": ("lora", {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}, 3, 5e-3),
             "rslora": ("lora", {"lora": {"r": 8, "alpha": 16, "use_rslora": True,
                                          "target_modules": ["q_proj", "v_proj", "down_proj"],
                                          "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32}}},
                        3, 5e-3),
             "full": ("full", {}, 2, 1e-4)}
    out = {}
    for name, (method, extra, steps, lr) in specs.items():
        cfg = write_config(tmp / f"{name}.yaml", output_dir=str(tmp / name), method=method, **common, **extra,
                           train={"max_steps": steps, "batch_size": 2, "lr": lr})
        assert main(["train", str(cfg)]) == 0
        out[name] = tmp / name
    return out


def tunelab_side(run: Path, capsys) -> list[tuple[str, list[int], torch.Tensor]]:
    """Per prompt: `tunelab generate RUN --prompt P` (greedy) text, and the rendered prompt's ids and log-probs
    (log p of token t given tokens < t, t ≥ 1) from the run loaded by `export.load_run` — tunelab's own forward."""
    from tunelab.export import load_run

    model, tok, template = load_run(run, device="cpu", dtype="float32")
    out = []
    for p in PROMPTS:
        capsys.readouterr()
        assert main(["generate", str(run), "--prompt", p, "--max-new-tokens", str(MAX_TOKENS)]) == 0
        text = capsys.readouterr().out.rstrip("\n")
        ids = tok(template.generation_prompt([{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        out.append((text, ids, logp))
    return out


def served(url: str, model: str) -> list[tuple[str, list[int], torch.Tensor]]:
    """Per prompt, from the OpenAI client: greedy chat text, prompt ids and prompt log-probs."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused")
    out = []
    for p in PROMPTS:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=MAX_TOKENS,
            extra_body={"prompt_logprobs": 0, "return_token_ids": True}).model_dump()
        ids = r["prompt_token_ids"]
        # prompt_logprobs[t] holds token t's own log-prob (and, when it is not the argmax, nothing else at k=0)
        logp = torch.tensor([r["prompt_logprobs"][t][str(ids[t])]["logprob"] for t in range(1, len(ids))])
        out.append((r["choices"][0]["message"]["content"].strip(), ids, logp))
    return out


def check_same(name: str, ours, theirs) -> float:
    """Asserts equal texts and prompt ids, log-probs within the tolerance; returns the largest |Δ log p|."""
    worst = 0.0
    for p, (text, ids, logp), (v_text, v_ids, v_logp) in zip(PROMPTS, ours, theirs):
        assert v_ids == ids, f"{name} {p!r}: vLLM rendered other prompt ids"
        assert v_text == text, f"{name} {p!r}: vLLM {v_text!r} != tunelab generate {text!r}"
        delta = float((v_logp - logp).abs().max())
        assert delta < PROMPT_LOGP_TOL, f"{name} {p!r}: prompt log-probs differ by {delta:.2e}"
        worst = max(worst, delta)
        print(f"{name} {p!r}: {text!r} (equal), prompt max |Δ log p| {delta:.1e}")
    return worst


def test_lora_and_rslora_adapters_served_with_enable_lora(runs, tmp_path, capsys):
    from tunelab.models.load import resolve

    base = resolve("smollm2-135m")  # the converted local folder: nothing is downloaded
    ours = {k: tunelab_side(runs[k], capsys) for k in ("lora", "rslora")}
    template = runs["lora"] / "adapter" / "chat_template.jinja"  # the run's own template, the one tunelab renders
    with vllm_server(base, "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--lora-modules",
                     f"lora={runs['lora']}/adapter", f"rslora={runs['rslora']}/adapter",
                     "--chat-template", str(template), log=tmp_path / "serve.log") as url:
        theirs = {k: served(url, k) for k in ("lora", "rslora")}
        base_served = served(url, base)
    with capsys.disabled():
        for k in ("lora", "rslora"):
            check_same(k, ours[k], theirs[k])
            moved = max(float((a[2] - b[2]).abs().max()) for a, b in zip(theirs[k], base_served))
            print(f"{k}: adapter vs base model, prompt max |Δ log p| {moved:.2f}")
            assert moved > 50 * PROMPT_LOGP_TOL, f"{k}: the served adapter barely changes the base model"


def test_merged_export_served(runs, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert main(["export", str(runs["rslora"]), "--merged", str(merged)]) == 0
    ours = tunelab_side(runs["rslora"], capsys)
    with vllm_server(str(merged), log=tmp_path / "serve.log") as url:
        theirs = served(url, str(merged))
    with capsys.disabled():
        check_same("merged rslora", ours, theirs)


def test_full_finetune_served(runs, tmp_path, capsys):
    ours = tunelab_side(runs["full"], capsys)
    model = str(runs["full"] / "model")
    with vllm_server(model, log=tmp_path / "serve.log") as url:
        theirs = served(url, model)
    with capsys.disabled():
        check_same("full", ours, theirs)
