"""Row builders: how an online objective turns a scored rollout round into the rows it trains on.

The rollout source (`rl/rollout.py`) samples, scores and hands a `Round` to the objective's row builder; it never
asks which objective it serves. An online objective names its builder with a class attribute,
``row_builder = "<name>"`` (objectives/ sit above rl/ in the layer order, so the objective names its builder and
this registry, which may import objectives, maps the name to the class):

==================  ====================================  ===============================  ================
builder             rows of a round                        unit / micro-batch                objectives
==================  ====================================  ===============================  ================
``policy_gradient`` every completion, its advantage         one completion                    grpo, rloo
                    (``rl.advantage`` or the objective's
                    estimator), π_old, π_ref when β > 0
``ppo``             every completion, per-token rewards,   one completion                    ppo
                    values, GAE advantages and returns
``best_of_n``       the completions good enough to imitate  one kept completion (SFT rows)    rejection_sampling
``pairs``           best vs worst completion of a group     one pair (chosen rows, then       online_dpo
                    whose rewards differ                     rejected rows: DPO's layout)
==================  ====================================  ===============================  ================

A builder says how many rows a round yields at most (`units`, which fixes the source's micro-batches per round),
builds them (`build` → `RoundRows`: the rows, how many of them train, the round's metrics) and forms a
micro-batch from row indices (`batch`). Rows that train come first; the source serves only those, and a
micro-batch with none left is a filler that counts for nothing (``zero_weight``), so a round that keeps nothing
still takes its optimizer steps.
"""

from __future__ import annotations

from .base import Round, RoundRows, RowBuilder
from .best_of_n import BestOfNRows
from .pairs import PairRows
from .policy_gradient import PolicyGradientRows
from .ppo import PPORows

from ...errors import TunelabError

ROW_BUILDERS: dict[str, type[RowBuilder]] = {
    "policy_gradient": PolicyGradientRows, "ppo": PPORows, "best_of_n": BestOfNRows, "pairs": PairRows}


def row_builder(objective, cfg, context, micro: int) -> RowBuilder:
    """The row builder `objective` declares (``row_builder``), for this run."""
    name = getattr(objective, "row_builder", None)
    if name not in ROW_BUILDERS:
        raise TunelabError(f"objective {getattr(objective, 'name', objective)!r} does not train on rollouts "
                           f"(no row builder; known: {', '.join(ROW_BUILDERS)})")
    return ROW_BUILDERS[name](cfg, context, micro)


__all__ = ["ROW_BUILDERS", "BestOfNRows", "PairRows", "PPORows", "PolicyGradientRows", "Round", "RoundRows",
           "RowBuilder", "row_builder"]
