"""The lab: train many variants of one config and compare what each learned and forgot.

=================  ==========================================================================  =============
what               how                                                                         module
=================  ==========================================================================  =============
sweep file         base config + common overrides + grid (cartesian product) and/or variants   `sweep`
running a sweep    one run directory per variant, finished runs skipped, killed runs resumed   `compare`
reading runs       config.yaml / metrics.jsonl / results.json → `RunInfo`, comparison table    `results`
variants           runs grouped by variant: means over seeds with 95 % t intervals             `seeds`
figures            every logged series vs step (one panel per kind)                            `curves`
figures            learning vs forgetting (Pareto front), metrics vs parameters                `plots`
figure helpers     whole-step ticks, value axes with a minimum span                            `figure`
number format      one rule per kind: losses 3 decimals, rates as %, rewards 3 sig. digits     `numbers`
report             results.md, results.csv and a single-file index.html                        `report`
statistics         seed means with t intervals, paired bootstrap, McNemar / sign-flip, Holm    `stats`
claims, budgets    a study's claims from per-item scores, budget table, provenance check       `claims`
study sections     claims / budgets / provenance as Markdown (README blocks) and HTML          `study`
=================  ==========================================================================  =============

CLI: ``tunelab compare SWEEP.yaml [--dry-run] [--only A,B] [--seeds 0,1]`` and
``tunelab report RUN_DIRS... [--out DIR] [--markdown [README.md]]``.
Ready-made studies (LoRA vs full, loss masking, MoRA vs LoRA, DoRA vs LoRA): ``examples/studies/``.

May import every layer (it trains variants through `train.launch.train`); nothing imports lab/ except the CLI.
"""

from .compare import run_status, run_sweep, write_sweep_report
from .plots import pareto_front, plot_all
from .report import build_report
from .results import RunInfo, build_table, collect, scores
from .sweep import Sweep, Variant, load_sweep

__all__ = ["RunInfo", "Sweep", "Variant", "build_report", "build_table", "collect", "load_sweep", "pareto_front",
           "plot_all", "run_status", "run_sweep", "scores", "write_sweep_report"]
