"""Hand-made run directories, shaped like the runs `tunelab train` writes, for report tests."""

import json
from pathlib import Path

import yaml


def fake_runs(root: Path):
    """fake_run(name, method, trainable, learning, forgetting, steps=4, **results) -> a finished run directory
    with config.yaml, metrics.jsonl and a results.json carrying task-evaluation keys (as the lead's runs will)."""

    def make(name: str, method: str = "lora", trainable: int = 1000, learning: float | None = 0.1,
             forgetting: float | None = 0.05, steps: int = 4, r: int = 8, **extra) -> Path:
        d = root / "runs" / name
        d.mkdir(parents=True)
        cfg = {"output_dir": str(d), "method": method, "model": {"name": "tiny"}, "lora": {"r": r},
               "train": {"max_steps": steps, "lr": 1e-3}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        rows = []
        for s in range(1, steps + 1):
            rows.append({"step": s, "loss": 3.0 - 0.2 * s * (1 + (learning or 0)), "lr": 1e-3, "tokens_per_s": 100})
            if s % 2 == 0:
                rows.append({"step": s, "eval_loss": 3.1 - 0.1 * s, "eval/uuid:exact_match": 0.1 * s})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r_) + "\n" for r_ in rows))
        results = {"method": method, "objective": "sft", "report": f"{method}: trainable {trainable:,}",
                   "trainable_params": trainable, "total_params": 100_000, "data": {"n_examples": 10},
                   "eval_loss_before": 3.0, "eval_loss_after": 2.5, "steps": steps, "train_tokens": 1000,
                   "train_seconds": 10.0, "tokens_per_s": 100.0, "final_train_loss": 2.2, "total_seconds": 12.0,
                   "samples": [{"prompt": "<|im_start|>user\nWhat is 2+2? <b>bold?</b><|im_end|>",
                                "before": "fish", "after": "4"}]}
        if learning is not None:  # the fields a run with eval.target/source writes, made by the same function
            from tunelab.eval.forgetting import run_results_fields

            def task(loss):
                return {"metrics": {"loss": loss, "perplexity": 2.718 ** loss}, "primary": "loss"}

            base = {"code_loss": task(2.0), "prose_loss": task(3.0)}
            final = {"code_loss": task(2.0 * (1 - learning)), "prose_loss": task(3.0 * (1 + (forgetting or 0)))}
            results.update(run_results_fields(base, final, ["code_loss"], ["prose_loss"]))
        results.update(extra)
        (d / "results.json").write_text(json.dumps(results))
        return d

    return make
