"""The `tunelab` command. Thin on purpose: parse arguments, call library functions, report user errors.

    tunelab train CONFIG.yaml [key=value ...] [--nproc N]     (or: torchrun --nproc-per-node N -m tunelab train …)
    tunelab data inspect CONFIG.yaml [key=value ...] [--n 3] [--json]
    tunelab --version
    tunelab generate RUN_DIR_OR_MODEL --prompt "..." [--system TEXT] [--temperature 0] [--sample] [--device cpu]
    tunelab export RUN_DIR --merged OUT_DIR [--dtype bf16|f16|f32]
    tunelab export RUN_DIR_OR_MODEL --gguf OUT.gguf [--type f16|q8_0|q4_0|q4_k_m|…]   (+ OUT.Modelfile for Ollama)
    tunelab chat RUN_DIR_OR_MODEL [--system TEXT] [--temperature 0] [--top-p 0.95] [--max-new-tokens 256]
    tunelab serve RUN_DIR_OR_MODEL [--host 127.0.0.1] [--port 8000]   (OpenAI-compatible HTTP API)
    tunelab eval RUN_DIR_OR_MODEL --tasks TASK ... [--limit N] [--allow-code-execution] [--output FILE.json]
    tunelab eval RUN_DIR --pairs PAIRS.jsonl           (a reward-model run: pairwise accuracy)
    tunelab eval --list
    tunelab demo [--out runs/demo]
    tunelab compare SWEEP.yaml [key=value ...] [--dry-run] [--scale]
    tunelab report RUN_OR_SWEEP_DIRS... [--out DIR] [--markdown [README.md]]
    tunelab examples [copy NAME [DEST]]                (the shipped example configs and studies)

A CONFIG (or SWEEP) argument may also be given as `--config FILE`; `--help` shows every option's default.
A `TunelabError` (anything the user can fix) is printed as one line `error: …` and exits with status 2.
Under torchrun the first rank that fails prints it and exits at once; torchrun then stops the other ranks, so
an error on one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .cli_args import Parser, config_argument, resolve_config, sampling_options
from .errors import TunelabError


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_train(args) -> int:
    from .objectives import load_run_config
    from .train.launch import train

    cfg = load_run_config(args.config, args.overrides)  # a config error stops here, before any rank starts
    if args.nproc and args.nproc > 1:
        from .train.launch import relaunch

        return relaunch(args.nproc, ["train", args.config, *args.overrides])
    try:
        out = train(cfg, source=args.config)
    except KeyboardInterrupt as e:  # outside a training step (loading, measuring, saving): name what a rerun uses
        from .train.interrupt import TrainingInterrupted, kept_line

        if isinstance(e, TrainingInterrupted) or cfg.stages:
            raise
        raise TrainingInterrupted(f"interrupted: {kept_line(Path(cfg.output_dir) / 'checkpoints')}") from None
    from .train.distributed import is_main

    if is_main():  # under torchrun: once
        print(f"run directory: {out}")
    return 0


def cmd_inspect(args) -> int:
    from .objectives import load_run_config
    from .train.inspect_data import inspect_data

    inspect_data(load_run_config(args.config, args.overrides), n=args.n, as_json=args.json)
    return 0


def cmd_generate(args) -> int:
    from .export import load_run
    from .generate import SAMPLE_TEMPERATURE, generate

    _check_device(args.device)
    model, tok, template = load_run(args.model, device=args.device)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    temperature = SAMPLE_TEMPERATURE if args.sample and args.temperature == 0 else args.temperature
    out = generate(model, tok, [template.generation_prompt(messages)], max_new_tokens=args.max_new_tokens,
                   do_sample=temperature > 0, temperature=temperature, top_p=args.top_p, stop=template.stop_strings,
                   seed=args.seed)
    print(out[0])
    return 0


def _check_device(device: str) -> None:
    """Before loading anything: a device this machine lacks is one line naming the flag."""
    if device != "auto":
        from .models.load import check_device

        check_device(device, "--device")


def cmd_chat(args) -> int:
    from .chat import chat_main

    _check_device(args.device)
    return chat_main(args.model, system=args.system, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device)


def cmd_serve(args) -> int:
    from .serve import serve_main

    return serve_main(args.model, host=args.host, port=args.port, device=args.device,
                      max_tokens_limit=args.max_tokens_limit)


def cmd_export(args) -> int:
    from .cli_export import cmd_export as export

    return export(args)


def cmd_demo(args) -> int:
    from .objectives import load_run_config
    from .train.launch import train

    cfg_path = Path(__file__).parent / "assets" / "demo.yaml"
    cfg = load_run_config(cfg_path, [f"output_dir={args.out}", "overwrite=true", *args.overrides])
    out = train(cfg)
    res = json.loads((out / "results.json").read_text())
    from .console import console, plural

    console.rule("[bold]demo results")
    before, after = res.get("eval_loss_before"), res.get("eval_loss_after")  # null (NaN) when nothing is held out
    held = f"held-out loss {before:.4f} → {after:.4f}" if before is not None and after is not None else "no held-out set"
    console.print(f"{held} | {plural(res['steps'], 'step')} | {res['tokens_per_s']:,.0f} tokens/s | {res['total_seconds']:.0f} s total")
    for s in res["samples"]:
        console.rule()
        console.print("[bold]prompt:[/] " + s["prompt"].split("user\n")[-1].split("<|im_end|>")[0][:300])
        console.print("[bold]before:[/] " + s.get("before", "-")[:400])
        console.print("[bold green]after:[/]  " + s["after"][:400])
    print(f"run directory: {out}")
    return 0


def cmd_eval(args) -> int:
    from .eval import list_tasks, load_task, print_results, run_tasks, save_results, validate_tasks
    from .export import load_run

    if args.list:
        for name in list_tasks():
            task = load_task(name)
            print(f"{name:14s} {task.kind:10s} {task.spec.description}")
        return 0
    _check_device(args.device)
    if args.pairs:  # a reward-model run: pairwise accuracy on preference pairs
        from .objectives.reward import load_reward_model

        if args.output:
            _check_output(args)
        acc = load_reward_model(args.model, device=args.device).accuracy(args.pairs, limit=args.limit)
        print(json.dumps(acc))
        if args.output:
            from .userfiles import write_file

            write_file(Path(args.output), json.dumps(acc, indent=2), "--output", args.overwrite)
        return 0
    if not args.model or not args.tasks:
        raise TunelabError("eval: give MODEL_OR_RUN and --tasks (see --list for the bundled tasks)")
    tasks = [t for s in args.tasks for t in s.split(",") if t]
    validate_tasks(tasks, args.allow_code_execution, args.sandbox)  # fail before loading the model
    if args.output:
        _check_output(args)
    model, tok, template = load_run(args.model, device=args.device, dtype=args.dtype)
    res = run_tasks(model, tok, template, tasks, allow_code_execution=args.allow_code_execution, limit=args.limit,
                    sandbox=args.sandbox)
    print_results(res, title=f"evaluation of {args.model}")
    if args.output:
        save_results(res, args.output, model=args.model, overwrite=args.overwrite)
    return 0


def cmd_sandbox(args) -> int:
    from .eval.sandbox import self_check

    return self_check()


def _check_output(args) -> None:
    """eval --output, before the model is loaded: a file tunelab did not write (without --overwrite), a folder
    nothing can be written in."""
    from .userfiles import check_can_create, check_replaceable

    check_replaceable(Path(args.output), "--output", args.overwrite)
    check_can_create(Path(args.output), "--output")


def cmd_compare(args) -> int:
    from .lab.compare import compare_main

    return compare_main(args.sweep, args.overrides, dry_run=args.dry_run, scale=args.scale, only=args.only,
                        seeds=args.seeds, claimed=args.claimed)


def cmd_examples(args) -> int:
    from .examples import copy_example, list_examples

    if args.examples_command == "copy":
        print(f"copied {args.name} to {copy_example(args.name, args.dest)}")
        return 0
    rows = list_examples()
    width = max(len(n) for n, _ in rows)
    for name, text in rows:
        print(f"{name:{width}s}  {text}")
    print("\ncopy one: tunelab examples copy NAME [DEST]; everything (the studies need it): tunelab examples copy all")
    return 0


def cmd_report(args) -> int:
    from .lab.report import report_main

    return report_main(args.run_dirs, args.out, markdown=args.markdown, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    import tunelab

    p = Parser(prog="tunelab", description="Fine-tune open LLMs; measure what they learn and forget.")
    p.add_argument("--version", action="version", version=f"tunelab {tunelab.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config (+ key=value overrides)")
    config_argument(t)
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 lora.r=16")
    t.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this machine: re-launches itself through torchrun")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser("inspect", help="show which tokens count in the loss")
    config_argument(i)
    i.add_argument("overrides", nargs="*", help="dotted overrides")
    i.add_argument("--n", type=int, default=3, help="examples to show")
    i.add_argument("--json", action="store_true", help="print token ids, strings and loss flags as JSON")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("generate", help="generate with a run (adapter applied, run's template) or a model")
    g.add_argument("model", help="run directory or model reference")
    g.add_argument("--prompt", required=True, help="the user message")
    sampling_options(g)
    g.add_argument("--sample", action="store_true", help="sample (at temperature 0.7 unless --temperature is given)")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat with a run (adapter, chat template), streamed")
    ch.add_argument("model", help="run directory or model reference")
    sampling_options(ch)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat/completions, streaming) over a run")
    sv.add_argument("model", help="run directory or model reference")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind; the default 127.0.0.1 is reachable from this machine only (no auth)")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    sv.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    sv.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    sv.set_defaults(func=cmd_serve)

    e = sub.add_parser("export", help="export a run (adapter merged) as an HF folder or a GGUF file")
    e.add_argument("run_dir", help="run directory, merged HF folder or model reference")
    to = e.add_mutually_exclusive_group(required=True)
    to.add_argument("--merged", help="output folder for the merged HF model")
    to.add_argument("--gguf", help="output .gguf file (llama.cpp, Ollama, LM Studio)")
    from .gguf_export.quantize import NATIVE, QTYPES

    e.add_argument("--type", choices=QTYPES, metavar="TYPE",
                   help=f"GGUF tensor type (default: f16); {', '.join(NATIVE)} written by tunelab, "
                        f"{', '.join(QTYPES[len(NATIVE):])} by llama.cpp's quantizer (llama-quantize on PATH "
                        "or llama-cpp-python)")
    e.add_argument("--dtype", choices=["bf16", "f16", "f32"],
                   help="--merged: save the merged weights in this dtype (merged in f32, then cast); default: "
                        "the dtype the run loads in")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing --gguf file (or its .Modelfile) tunelab did not write")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", help="the demo: LoRA on SmolLM2-135M with bundled math data, offline on CPU")
    m.add_argument("--out", default="runs/demo", help="run directory")
    m.add_argument("overrides", nargs="*", help="dotted overrides")
    m.set_defaults(func=cmd_demo)

    v = sub.add_parser("eval", help="evaluate a model or run on tasks (loss, multiple choice, exact match, code)")
    v.add_argument("model", nargs="?", help="run directory or model reference")
    v.add_argument("--tasks", nargs="+", default=[], help="bundled task names or task YAML files (comma-separated ok)")
    v.add_argument("--limit", type=int, default=None, help="items per task")
    v.add_argument("--allow-code-execution", action="store_true",
                   help="code tasks EXECUTE MODEL-WRITTEN CODE (in a bubblewrap sandbox); opt in explicitly")
    v.add_argument("--sandbox", default="bwrap", choices=["bwrap", "unsafe_inprocess"],
                   help="where that code runs: bwrap (default), or a Python-level guard that hostile code defeats")
    v.add_argument("--output", help="write results as JSON here")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --output file tunelab did not write")
    v.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    v.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    v.add_argument("--list", action="store_true", help="list the bundled tasks")
    v.add_argument("--pairs", help="reward-model run: pairwise accuracy on this preference file")
    v.set_defaults(func=cmd_eval)

    s = sub.add_parser("sandbox", help="check the sandbox model-written code runs in (bubblewrap) on this machine")
    s.set_defaults(func=cmd_sandbox)

    c = sub.add_parser("compare", help="train every variant of a sweep file (resumable), then write a report")
    config_argument(c, "sweep", "SWEEP", "sweep YAML (base config + grid/variants), e.g. examples/studies/masking.yaml")
    c.add_argument("overrides", nargs="*", help="dotted overrides applied to every variant, e.g. model.name=...")
    c.add_argument("--dry-run", action="store_true", help="validate and list the variants; train nothing")
    c.add_argument("--scale", action="store_true", help="apply the sweep's `scale:` section (real-model sizes)")
    c.add_argument("--only", metavar="NAME", action="append",
                   help="train only this variant now (repeatable; a study in parts)")
    c.add_argument("--claimed", action="store_true", help="train only the variants the study's claims name")
    c.add_argument("--seeds", metavar="K,...", help="train only these of the study's seeds now, e.g. --seeds 0")
    c.set_defaults(func=cmd_compare)

    x = sub.add_parser("examples", help="list the shipped example configs and studies, or copy one")
    xsub = x.add_subparsers(dest="examples_command")
    xc = xsub.add_parser("copy", help="copy a shipped example here (never overwrites)")
    xc.add_argument("name", help="an example's name (lora.yaml or lora), or `all` for the whole folder")
    xc.add_argument("dest", nargs="?", help="file or folder to copy to (default: here; `all`: ./examples)")
    x.set_defaults(func=cmd_examples)

    r = sub.add_parser("report", help="comparison report (table, figures, HTML) of run directories or sweeps")
    r.add_argument("run_dirs", nargs="+", help="run directories and/or sweep folders")
    r.add_argument("--out", default="runs/report", help="output folder")
    r.add_argument("--markdown", nargs="?", const="-", default=None, metavar="README.md",
                   help="a study's generated README block (claims, budgets, provenance): printed, or replaced "
                        "between its <!-- study:NAME --> markers in the given file")
    r.add_argument("--overwrite", action="store_true", help="replace report files in --out that tunelab did not write")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_config(parser, args)
    _quiet()
    # a rank started by torchrun (or by another env:// launcher with several ranks)
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank0 = os.environ.get("RANK", "0") == "0"  # from the environment: the process group may not be up yet
    try:
        if launched:
            from .train.distributed import init

            init()
        code = args.func(args)
    except TunelabError as e:
        lines = "\n".join(f"error: {m}" for m in getattr(e, "messages", None) or [e])  # several: one line each
        if not launched:
            print(lines, file=sys.stderr)
            return 2
        from .train.distributed import report_error

        if report_error(str(e)):
            print(lines, file=sys.stderr)
        sys.stderr.flush()
        # leave at once: the other ranks may be blocked in a collective; torchrun stops them when it sees this exit
        os._exit(2)
    except Exception as e:
        if launched:
            from .train.distributed import failed_elsewhere
            from .train.interrupt import stopping

            if failed_elsewhere():  # a peer's user error broke this rank's collective: that error is the news
                os._exit(2)
            # a Ctrl-C is under way and a collective failed (gloo, NCCL: RuntimeError): a peer aborted or was killed
            if stopping() is not None and isinstance(e, RuntimeError):
                if rank0:
                    print(stopping().abort_line(), file=sys.stderr)
                sys.stderr.flush()
                os._exit(130)
        raise
    except KeyboardInterrupt as e:  # training's own line says where it stopped and what was kept (train/interrupt.py)
        if not launched or rank0:  # under torchrun every rank stops with it; one says so
            print(str(e) or "interrupted", file=sys.stderr)
        return 130
    if launched:
        from .train.distributed import shutdown

        shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
