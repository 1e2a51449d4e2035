"""Multi-stage runs from one config: e.g. SFT on the chosen responses, then DPO from that checkpoint.

    output_dir: runs/pipeline
    model: {name: smollm2-135m}
    data: {train: gsm_pref.jsonl, max_length: 384}
    stages:
      - {name: sft, objective: sft, train: {max_steps: 20, lr: 2.0e-4}}
      - {name: dpo, objective: dpo, train: {max_steps: 20, lr: 5.0e-5}}

Each stage is the top-level config deep-merged with the stage's keys (``name`` and ``from`` are the stage's own),
run in ``<output_dir>/<name>``. A stage trains from the output of the stage named by ``from`` (``base`` = the
top-level ``model.name``); by default from the previous stage that is not a reward model, and the first stage
from the top-level model. A stage's output is its ``model/`` folder (full finetuning) or, for adapter methods,
``merged/`` — the base with the adapter folded in, written once after the stage (a new adapter then starts
from it, so for DPO the disabled-adapter reference *is* the previous stage's model).

Resumable stage by stage: a stage whose folder holds ``results.json`` is finished and skipped; an interrupted
stage resumes from its latest checkpoint. Every stage's config is validated before anything runs, so a typo in
the last stage fails before the first one trains.

``${PIPELINE_DIR}`` in a stage's values means the pipeline's ``output_dir``, so a stage can name an earlier
stage's folder — e.g. PPO scoring with the reward model trained two stages before:
``rl: {rewards: [{name: reward_model, run_dir: "${PIPELINE_DIR}/rm"}]}``.

When every stage has finished, the pipeline folder gets its own ``results.json``: one summary row per stage
(objective, steps, learning/forgetting, rewards) under ``stages``, and the pipeline's overall learning and
forgetting — the last policy stage's final task scores against the first stage's base scores (the model the
pipeline started from) — as ``learning_score``/``forgetting_score``, so `tunelab compare` can put a whole
pipeline beside single runs. `tunelab report <pipeline folder>` shows every stage as a row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import ValidationError

from ..adapters.base import load_method, merge
from ..config import RunConfig, save_config, substitute_text
from ..config_errors import config_errors
from ..console import console
from ..errors import TunelabError
from ..eval import learning_forgetting
from ..models.load import load_model, save_tokenizer
from ..objectives import objective_class
from . import run as single_run
from .distributed import barrier, is_main
from .guards import disk_full, is_disk_full, tensor_bytes
from .rundir import check_output_dir


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_stages(cfg: RunConfig) -> list[tuple[str, RunConfig, str | None]]:
    """[(name, stage config, source stage name or None for the configured model)], all validated."""
    root = Path(cfg.output_dir)
    base = cfg.model_dump(mode="json", exclude={"stages"})
    placeholder = "${PIPELINE_DIR}"
    out, names, policies = [], [], []
    for i, raw in enumerate(cfg.stages):
        st = substitute_text(dict(raw), placeholder, str(root))
        name = str(st.pop("name", f"stage{i + 1}"))
        src = st.pop("from", None)
        where = f"stages[{i}] ({name})"
        if name in names or not name or "/" in name:
            raise TunelabError(f"{where}: stage names must be unique folder names")
        for key in ("stages", "output_dir", "overwrite"):
            if key in st:
                raise TunelabError(f"{where}: '{key}' is set for the whole pipeline, not per stage")
        try:
            scfg = RunConfig.model_validate(_merge(base, st) | {"output_dir": str(root / name), "overwrite": False})
        except ValidationError as e:  # every error of the stage, with suggestions for typos
            raise config_errors(e, RunConfig, where, {}, set(), elsewhere=where) from None
        if src is None and "name" not in st.get("model", {}):
            src = policies[-1] if policies else None
        elif src == "base":
            src = None
        elif src is not None and src not in policies:
            raise TunelabError(f"{where}: from: '{src}' is not an earlier policy (non-reward) stage "
                               f"(have: {', '.join(policies) or 'none'})")
        out.append((name, scfg, src))
        names.append(name)
        if objective_class(scfg.objective).generator:
            policies.append(name)
    return out


STAGE_FIELDS = ("steps", "learning_score", "forgetting_score", "reward_before", "reward_after", "final_train_loss",
                "train_seconds", "eval_pairwise_accuracy")


def summarize(root: Path, stages: list[tuple[str, RunConfig, str | None]]) -> dict:
    """The pipeline's results.json (see the module docstring) from its finished stages' results.json."""
    rows, results = [], {}
    for name, scfg, src in stages:
        res = json.loads((Path(scfg.output_dir) / "results.json").read_text())
        results[name] = res
        rows.append({"name": name, "objective": scfg.objective, "from": src or scfg.model.name,
                     "run_dir": str(Path(scfg.output_dir)), **{k: res[k] for k in STAGE_FIELDS if k in res}})
    out = {"pipeline": True, "objective": "pipeline", "stages": rows,
           "method": stages[-1][1].method, "steps": sum(r.get("steps", 0) for r in rows),
           "train_seconds": sum(r.get("train_seconds", 0.0) for r in rows)}
    policy = [n for n, c, _ in stages if objective_class(c.objective).generator and "eval" in results[n]]
    if policy:
        first, last = results[policy[0]], results[policy[-1]]
        target, source = list(last.get("learning", {})), list(last.get("forgetting", {}))
        base = {t: {"metrics": m} for t, m in first["eval"]["base"].items()}
        final = {t: {"metrics": m} for t, m in last["eval"]["final"].items()}
        try:
            lf = learning_forgetting(base, final, target, source)
            out.update(learning_score=lf["learning"], forgetting_score=lf["forgetting"], learning=lf["target"],
                       forgetting=lf["source"], eval={"base": first["eval"]["base"], "final": last["eval"]["final"]})
        except KeyError:  # stages evaluated different tasks: no overall number
            pass
    return out


def finished(out: Path) -> bool:
    return (out / "results.json").exists()


def stage_model(out: Path, cfg: RunConfig) -> Path:
    """A loadable HF folder with the stage's trained model (merging the adapter once for adapter methods)."""
    if (out / "model").exists():
        return out / "model"
    merged = out / "merged"
    if (merged / "config.json").exists():
        return merged
    from transformers import AutoTokenizer

    model, _ = load_model(cfg.model.name, cfg.model.dtype, "cpu", cfg.model.trust_remote_code,
                          allow_pickle=cfg.model.allow_pickle)
    load_method(model, cfg.method, out / "adapter")
    merge(model)
    tmp = out / ".tmp-merged"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        save_tokenizer(AutoTokenizer.from_pretrained(str(out / "adapter")), tmp)  # carries the run's chat template
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full("the merged model for the next stage", out, tensor_bytes(model.parameters())) from None
        raise
    tmp.rename(merged)
    return merged


def run_pipeline(cfg: RunConfig) -> Path:
    """Run every stage in order (skipping finished ones); returns the pipeline's root folder."""
    stages = resolve_stages(cfg)
    if not stages:
        raise TunelabError("stages: empty pipeline")
    root = Path(cfg.output_dir)
    def checks():  # a stage folder that is a file or holds the user's files: refused before training
        for _, scfg, _ in stages:
            check_output_dir(Path(scfg.output_dir), overwrite=True)

    # the root lock: one pipeline at a time. Under torchrun every rank runs the stages; rank 0 alone checks and
    # claims the folders and writes, the others wait until it holds the root
    with single_run.claim_on_main(root, cfg.overwrite, resume=True, checks=checks, kind="pipeline"):
        if is_main():
            save_config(cfg, root / "pipeline.yaml")
        return _run_stages(stages, root)


def _run_stages(stages, root: Path) -> Path:
    outputs: dict[str, Path] = {}
    for name, scfg, src in stages:
        if src is not None:
            scfg.model.name = str(outputs[src])
        out = Path(scfg.output_dir)
        if finished(out):
            console.print(f"[bold]stage {name}[/]: finished earlier, skipping ({out})")
        else:
            console.print(f"[bold]stage {name}[/]: {scfg.objective} from {scfg.model.name}")
            single_run.run(scfg)
        if objective_class(scfg.objective).generator:
            if is_main():  # rank 0 merges; the others then find the folder
                stage_model(out, scfg)
            barrier()
            outputs[name] = stage_model(out, scfg)
        else:
            outputs[name] = out
    (root / "results.json").write_text(json.dumps(summarize(root, stages), indent=1, default=str))
    return root
