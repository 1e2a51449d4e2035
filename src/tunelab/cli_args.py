"""The `tunelab` command's argument conventions: defaults shown in `--help`, a config given as CONFIG or
`--config FILE`, and the sampling options `generate` and `chat` share (one set of defaults, in generate.py)."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default — except where there is none to show (None, off, empty)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: defaults shown in `--help` (subparsers are made with the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def config_argument(parser, name: str = "config", metavar: str = "CONFIG", help: str = "YAML config") -> None:
    """A positional config that may also be given as `--config FILE` (the convention of TRL, Axolotl, LitGPT)."""
    parser.add_argument(name, nargs="?", metavar=metavar, help=f"{help} (or --config FILE)")
    parser.add_argument("--config", dest=f"{name}_option", metavar="FILE", help=f"the {metavar}, as an option")


def resolve_config(parser, args) -> None:
    """Fold `--config FILE` into the positional: a positional then given is the first override (`key=value`)."""
    for name in ("config", "sweep"):
        if not hasattr(args, f"{name}_option"):
            continue
        option, given = getattr(args, f"{name}_option"), getattr(args, name)
        if option is None:
            if given is None:
                parser.error(f"{args.command}: give the {name} file (as {name.upper()} or --config FILE)")
            continue
        if given is not None:
            if "=" not in given:
                parser.error(f"{args.command}: two {name} files given ({given} and --config {option}); give one")
            args.overrides = [given, *args.overrides]
        setattr(args, name, option)


def sampling_options(parser) -> None:
    """The options `generate` and `chat` share, with the one set of defaults (generate.py)."""
    from .generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P

    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling (when sampling)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="longest answer in tokens")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (the same seed, the same text)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
