"""Multi-stage runs from one config, each stage consuming what earlier stages produced.

    output_dir: runs/pipeline
    model: {name: smollm2-135m}
    data: {train: gsm_pref.jsonl, max_length: 384}
    stages:
      - {name: sft, objective: sft, train: {max_steps: 20, lr: 2.0e-4}}
      - {name: dpo, objective: dpo, train: {max_steps: 20, lr: 5.0e-5}}

Each stage is the top-level config deep-merged with the stage's keys (``name``, ``from`` and ``generate`` are the
stage's own), run in ``<output_dir>/<name>``. A stage trains from the output of the stage named by ``from``
(``base`` = the top-level ``model.name``); by default from the previous policy stage (not a reward model, not a
data stage), and the first stage from the top-level model. A stage's output is its ``model/`` folder (full
finetuning) or, for adapter methods, ``merged/`` — the base with the adapter folded in, written once after the
stage (a new adapter then starts from it, so for DPO the disabled-adapter reference *is* the previous stage's
model).

**Data that chains.** A stage with a ``generate:`` section is a data stage (train/stage_data.py): it trains
nothing, it samples ``rl.group_size`` completions per prompt of its ``data.train`` from the policy named by its
``from``, scores them with its ``rl.rewards`` (a verifier, or a reward model an earlier stage trained) and writes
``pairs.jsonl`` (a highest- vs a lowest-scored sample per prompt) and/or ``sft.jsonl`` (the samples that pass a
threshold: rejection sampling as data), each row with its scores and ``source_policy``. A later stage names an
earlier stage's output with ``${STAGE:<name>}`` (train/stage_refs.py) — its folder::

      - {name: rm_pairs, from: sft, generate: {pairs: true}, data: {train: prompts.jsonl},
         rl: {group_size: 4, rewards: [{name: exact_match}]}}
      - {name: rm, objective: reward, data: {train: "${STAGE:rm_pairs}/pairs.jsonl"}}
      - {name: ppo, objective: ppo, from: sft, rl: {rewards: [{name: reward_model, run_dir: "${STAGE:rm}"}]}}

(quoted: inside ``{…}`` YAML reads the braces as its own). Every reference is checked before anything runs: the
stage exists and comes earlier, a data stage's file is one it writes, a reward model's run is a ``reward``
stage — else one line with the config file's line. ``examples/llama3_pipeline.yaml`` (SFT → rejection sampling
→ PPO → DPO) and ``examples/llama3_iterative.yaml`` (rounds of reward model → rejection sampling → SFT → DPO)
chain every stage this way. ``${PIPELINE_DIR}`` (the pipeline's ``output_dir``) still works, unchecked.

Resumable stage by stage: a stage whose folder holds ``results.json`` (a data stage: ``data.json``) is finished
and skipped; an interrupted stage resumes from its latest checkpoint (a data stage starts over). Every stage's
config is validated before anything runs, so a typo in the last stage fails before the first one trains.

When every stage has finished, the pipeline folder gets its own ``results.json``: one summary row per stage
(objective, steps, learning/forgetting, rewards; a data stage: ``objective: generate`` and its counts) under
``stages``, and the pipeline's overall learning and forgetting — the last policy stage's final task scores
against the first policy stage's base scores (the model the pipeline started from) — as
``learning_score``/``forgetting_score``, so `tunelab compare` can put a whole pipeline beside single runs.
`tunelab report <pipeline folder>` shows every training stage as a row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import ValidationError

from ..adapters.base import load_method, merge, saves_full_model
from ..config import RunConfig, save_config, substitute_text
from ..config_errors import config_errors
from ..console import console
from ..errors import TunelabError
from ..eval import learning_forgetting
from ..models.load import load_model, save_tokenizer
from ..objectives import objective_class, run_config_schema
from ..rl.pair_data import GenerateOptions
from . import run as single_run
from . import stage_data, stage_refs
from .distributed import barrier, is_main
from .guards import disk_full, is_disk_full, tensor_bytes
from .rundir import check_output_dir
from .stage_refs import ConfigLines


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Stage(tuple):
    """One resolved stage. Unpacks as ``(name, cfg, source)`` — `source`: the policy stage it trains from (a data
    stage: samples from), None for the configured model; `generate`: a data stage's options, None for a stage
    that trains."""

    def __new__(cls, name: str, cfg: RunConfig, source: str | None, generate: GenerateOptions | None = None):
        stage = super().__new__(cls, (name, cfg, source))
        stage.generate = generate
        return stage

    name = property(lambda self: self[0])
    cfg = property(lambda self: self[1])
    source = property(lambda self: self[2])


def resolve_stages(cfg: RunConfig, source: str | Path | None = None) -> list[Stage]:
    """Every stage, validated, with its references resolved (see the module docstring). `source`: the config file,
    for ``file:line:`` in the errors."""
    root = Path(cfg.output_dir)
    lines = ConfigLines(source)
    base = cfg.model_dump(mode="json", exclude={"stages"})
    top = stage_refs.references(base)
    if top:
        path, ref, _ = top[0]
        raise TunelabError(f"{lines.at(None, path)}{'.'.join(map(str, path))}: ${{STAGE:{ref}}} belongs in a stage "
                           "(it names an earlier stage's output)")
    all_names = [str(raw.get("name", f"stage{i + 1}")) for i, raw in enumerate(cfg.stages)]
    placeholder = "${PIPELINE_DIR}"
    out, names, policies, kinds = [], [], [], {}
    for i, raw in enumerate(cfg.stages):
        st = substitute_text(dict(raw), placeholder, str(root))
        name = str(st.pop("name", f"stage{i + 1}"))
        src = st.pop("from", None)
        where = f"stages[{i}] ({name})"

        def fail(message: str, path: tuple = (), i=i, where=where):
            raise TunelabError(f"{lines.at(i, path)}{where}: {message}")

        if name in names or not name or "/" in name:
            fail("stage names must be unique folder names", ("name",))
        for key in ("stages", "output_dir", "overwrite"):
            if key in st:
                fail(f"'{key}' is set for the whole pipeline, not per stage", (key,))
        _check_references(st, name, names, all_names, kinds, fail)
        st = stage_refs.substitute(st, root)
        generate = st.pop("generate", None)
        try:
            scfg = run_config_schema().model_validate(_merge(base, st) | {"output_dir": str(root / name),
                                                                         "overwrite": False})
        except ValidationError as e:  # every error of the stage, each with its file:line and a suggestion for typos
            raise config_errors(e, run_config_schema(), where, {}, set(), elsewhere=where,
                                locate=lambda path, i=i: lines.at(i, path)) from None
        if src is None and "name" not in st.get("model", {}):
            src = policies[-1] if policies else None
        elif src == "base":
            src = None
        elif src is not None and src not in policies:
            fail(f"from: '{src}' is not an earlier policy (non-reward, non-data) stage "
                 f"(have: {', '.join(policies) or 'none'})", ("from",))
        _check_value_init(scfg, src, {n: s.source for n, s in zip(names, out)}, root, fail)
        if generate is not None:
            try:
                generate = GenerateOptions.model_validate(generate)
            except ValidationError as e:
                err = e.errors()[0]
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                fail(f"generate.{'.'.join(str(x) for x in err['loc'])}: {msg}", ("generate", *map(str, err["loc"])))
            try:
                stage_data.check_data_stage(scfg, generate, {str(root / n) for n in all_names})
            except TunelabError as e:
                fail(str(e))
        out.append(Stage(name, scfg, src, generate))
        names.append(name)
        kinds[name] = generate.files() if generate is not None else scfg.objective
        if generate is None and objective_class(scfg.objective).generator:
            policies.append(name)
    return out


def _check_references(st: dict, name: str, earlier: list[str], all_names: list[str], kinds: dict, fail) -> None:
    """Every ``${STAGE:x}`` of stage `name` (train/stage_refs.py): an earlier stage; a data stage's file by name; a
    reward model's run a reward stage; a policy by ``from:``, not by folder."""
    for path, ref, rest in stage_refs.references(st):
        token = f"{'.'.join(map(str, path))}: ${{STAGE:{ref}}}"
        if ref == name:
            fail(f"{token}: a stage cannot use its own output", path)
        if ref not in all_names:
            fail(f"{token}: no stage named '{ref}' (stages: {', '.join(all_names)})", path)
        if ref not in earlier:
            fail(f"{token}: stage '{ref}' comes later; a stage can only use the output of a stage before it", path)
        if path[:2] == ("model", "name"):
            fail(f"{token}: a stage starts from an earlier policy with `from: {ref}`, not model.name", path)
        kind = kinds[ref]
        if isinstance(kind, list):  # a data stage: its folder holds the files it writes
            if rest.lstrip("/") not in kind:
                fail(f"{token}{rest}: stage '{ref}' writes "
                     f"{' and '.join(f'${{STAGE:{ref}}}/{f}' for f in kind)}", path)
        elif kind != "reward" and (path == ("ppo", "value_init") or _is_reward_model_dir(st, path)):
            fail(f"{token}: needs a reward-model stage (objective: reward); '{ref}' is objective: {kind}", path)


def _check_value_init(scfg: RunConfig, src: str | None, sources: dict, root: Path, fail) -> None:
    """PPO's value model as an adapter started from a reward stage's adapter needs the same base weights: refuse
    now a reward stage that trained from another model than this stage's policy (it would fail when PPO starts)."""
    init = getattr(getattr(scfg, "ppo", None), "value_init", None)
    if scfg.objective != "ppo" or not init or Path(init).parent != root or Path(init).name not in sources:
        return
    mode = scfg.ppo.value_model
    if mode == "copy" or (mode == "auto" and saves_full_model(scfg.method)):
        return
    rm_src = sources[Path(init).name]
    if rm_src != src:
        fail(f"ppo.value_init: the reward model '{Path(init).name}' trained from {rm_src or 'the base model'}, this "
             f"policy from {src or 'the base model'}: its adapter would not mean the same over other weights "
             "(use ppo.value_model: copy)", ("ppo", "value_init"))


def _is_reward_model_dir(st: dict, path: tuple) -> bool:
    """Is `path` the ``run_dir`` of a ``reward_model`` entry of ``rl.rewards``?"""
    if len(path) != 4 or path[:2] != ("rl", "rewards") or path[3] != "run_dir":
        return False
    spec = st["rl"]["rewards"][path[2]]
    return isinstance(spec, dict) and spec.get("name") == "reward_model"


STAGE_FIELDS = ("steps", "learning_score", "forgetting_score", "reward_before", "reward_after", "final_train_loss",
                "train_seconds", "eval_pairwise_accuracy")
DATA_FIELDS = ("prompts", "samples", "pairs", "tied_groups", "identical_groups", "sft_kept", "score_mean")


def summarize(root: Path, stages: list[Stage]) -> dict:
    """The pipeline's results.json (see the module docstring) from its finished stages' results.json (a data
    stage's row: its data.json counts)."""
    rows, results, policy_stages = [], {}, []
    for stage in stages:
        name, scfg, src = stage
        if stage.generate is not None:
            data = stage_data.summary(Path(scfg.output_dir))
            rows.append({"name": name, "objective": "generate", "from": src or scfg.model.name,
                         "run_dir": str(Path(scfg.output_dir)), "files": data["files"],
                         **{k: data[k] for k in DATA_FIELDS if k in data}})
            continue
        res = json.loads((Path(scfg.output_dir) / "results.json").read_text())
        results[name] = res
        rows.append({"name": name, "objective": scfg.objective, "from": src or scfg.model.name,
                     "run_dir": str(Path(scfg.output_dir)), **{k: res[k] for k in STAGE_FIELDS if k in res}})
        if objective_class(scfg.objective).generator and "eval" in res:
            policy_stages.append(name)
    trained = [s for s in stages if s.generate is None]
    out = {"pipeline": True, "objective": "pipeline", "stages": rows,
           "method": trained[-1].cfg.method if trained else stages[-1].cfg.method,
           "steps": sum(r.get("steps", 0) for r in rows),
           "train_seconds": sum(r.get("train_seconds", 0.0) for r in rows)}
    if policy_stages:
        first, last = results[policy_stages[0]], results[policy_stages[-1]]
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


def finished(out: Path, stage: Stage | None = None) -> bool:
    if stage is not None and stage.generate is not None:
        return stage_data.finished(out, stage.generate)
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


def run_pipeline(cfg: RunConfig, source: str | Path | None = None) -> Path:
    """Run every stage in order (skipping finished ones); returns the pipeline's root folder. `source`: the
    config file (its lines are named in errors)."""
    stages = resolve_stages(cfg, source)
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


def _run_stages(stages: list[Stage], root: Path) -> Path:
    outputs: dict[str, Path] = {}
    for stage in stages:
        name, scfg, src = stage
        if src is not None:
            scfg.model.name = str(outputs[src])
        out = Path(scfg.output_dir)
        if finished(out, stage):
            console.print(f"[bold]stage {name}[/]: finished earlier, skipping ({out})")
        elif stage.generate is not None:
            stage_data.run_data_stage(name, scfg, stage.generate, src)
        else:
            console.print(f"[bold]stage {name}[/]: {scfg.objective} from {scfg.model.name}")
            single_run.run(scfg)
        if stage.generate is None and objective_class(scfg.objective).generator:
            if is_main():  # rank 0 merges; the others then find the folder
                stage_model(out, scfg)
            barrier()
            outputs[name] = stage_model(out, scfg)
        else:
            outputs[name] = out
    (root / "results.json").write_text(json.dumps(summarize(root, stages), indent=1, default=str))
    return root
