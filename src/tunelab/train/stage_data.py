"""A pipeline's data stage: sample from an earlier stage's policy, score, and write training data for later stages.

    - name: rm_pairs
      from: sft                  # the policy sampled (default: the latest policy stage; ``base``: the model)
      data: {train: prompts.jsonl, limit: 64}                   # the prompts: prompt / messages / alpaca records
      rl: {group_size: 4, temperature: 1.0, max_new_tokens: 64, prompts_per_step: 8,
           rewards: [{name: exact_match, extract: last_number}]}  # or [{name: reward_model, run_dir: "${STAGE:rm}"}]
      generate: {pairs: true, sft: true, sft_threshold: 1.0}
    - {name: rm, objective: reward, data: {train: "${STAGE:rm_pairs}/pairs.jsonl"}}

A stage with a ``generate:`` section trains nothing. Its ``rl:`` section says how to sample (``group_size`` G
completions per prompt at ``temperature``/``top_p``, up to ``max_new_tokens``, ``stop``) and score (``rewards``:
a verifier, or a reward model trained by an earlier stage); ``generate:`` says what to write from each group
(rl/pair_data.py: ``pairs.jsonl`` — a highest- vs a lowest-scored sample, tied groups skipped and counted —
and/or ``sft.jsonl`` — the samples that pass ``sft_threshold``, rejection sampling as data). All of
``data.train`` is used (``data.limit`` keeps its first records; there is no held-out split: the stages that train
on the files hold out their own).

The stage folder holds the files, ``config.yaml`` (the stage as it ran) and ``data.json``: the counts (prompts,
samples, pairs, tied groups, kept SFT rows, mean scores), the source policy, the options — written last, it marks
the stage finished, and a rerun reuses the files. The files are written whole (through a ``.tmp-`` name) once every
prompt is done, so an interrupted stage starts over and never leaves a half file behind. Deterministic: chunk k
of ``rl.prompts_per_step`` prompts is sampled with seed (``train.seed``, k); one progress line per chunk.
Under torchrun rank 0 writes the data while the other ranks wait.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path

import torch

from .. import rl  # noqa: F401  (registers the `prompts` data kind)
from ..config import RunConfig, save_config
from ..console import console
from ..data.kinds import data_kind
from ..data.mixture import load_sources, mix
from ..data.sources import load_records
from ..data.templates import get_template
from ..errors import TunelabError
from ..models.load import load_model
from ..rl.pair_data import DATA_FILES, GenerateOptions, GroupTally, group_rows, score_chunk, stop_tokens
from ..rl.rewards import REWARDS, build_rewards
from .distributed import is_main, main_says
from .rundir import claim_run_dir

MARKER = "data.json"
VERIFIERS = ("exact_match", "code_tests")  # rewards that say right (1) or wrong (0)
PROMPT_FORMATS = ("auto", "alpaca", "messages", "prompt_completion")


def check_data_stage(cfg: RunConfig, opts: GenerateOptions, pending: set[str]) -> None:
    """Refuse a data stage that cannot run, before any stage runs. `pending`: the folders of the pipeline's stages
    (a reward model in one of them does not exist yet; its options are checked, its files later)."""
    if not (opts.pairs or opts.sft):
        raise TunelabError("generate: writes nothing (set pairs: true and/or sft: true)")
    if not cfg.data.train:
        raise TunelabError("data.train: a data stage needs prompts (a .jsonl/.json/.csv/.parquet file or a dataset)")
    if cfg.data.format not in PROMPT_FORMATS:
        raise TunelabError(f"data.format={cfg.data.format}: a data stage needs prompts (alpaca, messages or "
                           "prompt_completion records)")
    if cfg.data.max_length - cfg.rl.max_new_tokens < 1:
        raise TunelabError(f"data.max_length={cfg.data.max_length} leaves no room for a prompt with "
                           f"rl.max_new_tokens={cfg.rl.max_new_tokens}")
    if opts.include_pairs and not opts.pairs:
        raise TunelabError("generate.include_pairs: needs pairs: true (the rows go into this stage's pairs.jsonl)")
    if opts.pairs and cfg.rl.group_size < 2:
        raise TunelabError(f"rl.group_size={cfg.rl.group_size}: a pair needs at least 2 samples per prompt")
    later = [r for r in cfg.rl.rewards if str(r.get("run_dir", "")) in pending]
    ready = [r for r in cfg.rl.rewards if r not in later]
    if ready:
        _rewards(ready, cfg)
    for spec in later:  # trained by an earlier stage: its options now, its files when this stage runs
        name = spec.get("name")
        options = [p for p, v in inspect.signature(REWARDS.get(name, lambda: None)).parameters.items()
                   if v.kind == v.KEYWORD_ONLY]
        unknown = [k for k in spec if k not in ("name", "weight", *options)]
        if name not in REWARDS or unknown:
            raise TunelabError(f"reward '{name}': " + (f"unknown option '{unknown[0]}' (options: {', '.join(options)})"
                                                       if name in REWARDS else "unknown reward"))
    names = {r.get("name") for r in cfg.rl.rewards if r.get("weight", 1.0) != 0}
    if opts.sft and opts.sft_threshold is None and names and names <= set(VERIFIERS):
        raise TunelabError("generate.sft_threshold: set it (e.g. 1.0) — with a verifier as the only reward, the "
                           "best sample of a group that is all wrong is a wrong answer")


def finished(out: Path, opts: GenerateOptions) -> bool:
    """Written completely before (data.json is written last), and the files are still there."""
    return (out / MARKER).is_file() and all((out / f).is_file() for f in opts.files())


def summary(out: Path) -> dict:
    """The finished stage's data.json."""
    return json.loads((out / MARKER).read_text())


def run_data_stage(name: str, cfg: RunConfig, opts: GenerateOptions, source_stage: str | None) -> dict:
    """Sample, score and write the stage's files into ``cfg.output_dir`` (rank 0; see the module docstring);
    returns its data.json. Every rank calls it; the others wait for rank 0 and learn whether it succeeded."""
    out = Path(cfg.output_dir)
    if not is_main():
        if not main_says(0):
            raise TunelabError(f"stage {name}: rank 0 could not write its data")
        return summary(out)
    try:
        result = _write(name, cfg, opts, source_stage, out)
    except BaseException:
        main_says(0)
        raise
    main_says(1)
    return result


def _write(name: str, cfg: RunConfig, opts: GenerateOptions, source_stage: str | None, out: Path) -> dict:
    t0 = time.perf_counter()
    sampling = cfg.rl
    # built first (a reward model loads on first use) so that the stage says at once what it is doing
    rewards = _rewards(sampling.rewards, cfg)
    console.print(f"[bold]stage {name}[/]: {sampling.group_size} samples per prompt of {cfg.data.train_paths()} "
                  f"from {cfg.model.name}, scored by {', '.join(k for k, _, _ in rewards.entries)}")
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code,
                            cfg.model.attn_implementation, cfg.model.allow_pickle)
    template = get_template(cfg.data.template, tok)
    records = mix(load_sources(cfg.data.train_sources(), cfg.data.columns, cfg.data.split, cfg.data.limit),
                  cfg.train.seed)
    prompts = data_kind("prompts").encode(tok, template, records, [], cfg).train
    stop_ids, stop_strings = stop_tokens(tok, template, sampling.stop)
    included = [r.data for path in opts.include_pairs for r in load_records(path)]  # earlier rounds' pairs
    source = {"source_policy": cfg.model.name, "source_stage": source_stage}
    tally, pairs, sft = GroupTally(), [], []
    chunk = sampling.prompts_per_step
    n_chunks = -(-len(prompts) // chunk)
    with claim_run_dir(out, overwrite=False, resume=True):
        save_config(cfg, out / "config.yaml")
        console.print(f"  {name}: {len(prompts)} prompts in chunks of rl.prompts_per_step={chunk}"
                      + (f"; {len(included)} earlier pairs included" if included else ""))
        for k in range(n_chunks):
            part = prompts[k * chunk:(k + 1) * chunk]
            with torch.no_grad():
                scored = score_chunk(model, tok, part, rewards, sampling, stop_ids=stop_ids,
                                     stop_strings=stop_strings, seed=cfg.train.seed * 1000003 + k,
                                     batch_size=max(cfg.train.batch_size, sampling.group_size))
            tally.add(scored)
            for p, texts, scores in zip(part, scored.texts, scored.scores):
                pair, kept = group_rows(p, texts, scores, opts, source, tally)
                pairs += [pair] if pair else []
                sft += kept
            console.print(f"  {name}: {tally.prompts}/{len(prompts)} prompts, mean score "
                          f"{tally.score_sum / tally.samples:.3f}, {tally.pairs} pairs ({tally.tied_groups} tied "
                          f"groups skipped), {tally.sft_kept} SFT rows [{time.perf_counter() - t0:.0f} s]")
        written = {"pairs": included + pairs, "sft": sft}
        for key in ("pairs", "sft"):
            if getattr(opts, key) and not written[key]:
                raise TunelabError(f"stage {name}: no {key} row from {tally.prompts} prompts × "
                                   f"{sampling.group_size} samples ({_why(key, tally, opts)}); sample more "
                                   "(rl.group_size, data.limit, rl.temperature) or change the reward")
        for key in ("pairs", "sft"):
            if getattr(opts, key):
                _write_jsonl(out / DATA_FILES[key], written[key])
        result = {"stage": name, **source, "files": opts.files(), **tally.as_dict(),
                  "pairs_included": len(included), "group_size": sampling.group_size, "seed": cfg.train.seed,
                  "rewards": [dict(r) for r in sampling.rewards], "generate": opts.model_dump(),
                  "seconds": time.perf_counter() - t0}
        _write_text(out / MARKER, json.dumps(result, indent=1))
    return result


def _rewards(specs, cfg: RunConfig):
    """`build_rewards` with the run's code-execution opt-in (the one place this module builds rewards)."""
    return build_rewards(specs, allow_code_execution=cfg.eval.allow_code_execution, sandbox=cfg.eval.sandbox)


def _why(key: str, tally: GroupTally, opts: GenerateOptions) -> str:
    if key == "pairs":
        return f"{tally.tied_groups} groups tied, {tally.identical_groups} with identical texts"
    return f"none scored ≥ generate.sft_threshold={opts.sft_threshold}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)
