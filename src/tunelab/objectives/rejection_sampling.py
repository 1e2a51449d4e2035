"""Rejection sampling (best-of-N fine-tuning), as in Llama 2 (Touvron et al. 2023, arXiv:2307.09288, §3.2.3)
and the Llama 3 post-training recipe (Dubey et al. 2024, arXiv:2407.21783, §4.2):

    for each round:  y_1..y_N ~ π_θ(· | x)  for each prompt x;
                     keep y* = argmax_i r(x, y_i) if r(x, y*) ≥ τ   (``rejection_sampling.keep: best``, the default)
                     or every y_i with r(x, y_i) ≥ τ                 (``rejection_sampling.keep: threshold``)
                     minimise  −log π_θ(y | x)  over the kept completions (plain SFT, prompt masked)

τ = ``rejection_sampling.keep_threshold`` (default 1.0: "correct" for a 0/1 verifiable reward such as ``exact_match``), so a
prompt the policy never solves adds nothing instead of its least bad wrong answer. The sampling and scoring
happen in the rollout source, the selection in this objective's row builder (`rl/rows/best_of_n.py`), which
reports ``kept`` of ``kept_of`` candidates per round and appends every kept completion to ``selected.jsonl`` in
the run directory (prompt, completion, reward, round), so the selected set can be inspected and reused as an
SFT dataset. The loss is SFT's, unchanged.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from ..config import Strict
from .sft import SFT


class RejectionSamplingOptions(Strict):
    """The ``rejection_sampling:`` section: which of a prompt's G completions are kept."""

    moved_from: ClassVar[dict[str, str]] = {"rl.keep": "keep", "rl.keep_threshold": "keep_threshold"}

    keep: Literal["best", "threshold"] = "best"  # best of G, or every one with reward ≥ keep_threshold
    keep_threshold: float = 1.0  # a reward threshold: any finite value (rewards may be negative)


class RejectionSampling(SFT):
    name = "rejection_sampling"
    data_kind = "prompts"
    row_builder = "best_of_n"  # rl/rows/best_of_n.py
    Options = RejectionSamplingOptions

    def __init__(self, chunk_size: int = 1024, keep: str = "best", keep_threshold: float = 1.0):
        super().__init__(chunk_size)
        self.keep, self.keep_threshold = keep, keep_threshold  # read by the row builder when it selects

    @classmethod
    def from_config(cls, cfg, reference=None):
        o = cls.options(cfg)
        return cls(cfg.train.loss_chunk_size, o.keep, o.keep_threshold)
