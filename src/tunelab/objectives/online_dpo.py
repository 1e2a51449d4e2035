"""Online (iterative) DPO: DPO on pairs the current policy sampled, labelled by a reward — Xu et al. 2024, "Is DPO
Superior to PPO for LLM Alignment?" (arXiv:2404.10719: iterative DPO beats DPO on a fixed set); Guo et al.
2024, "Direct Language Model Alignment from Online AI Feedback" (arXiv:2402.04792).

    each round:  y_1..y_G ~ π_θ(· | x);   s_i = r(x, y_i) − p·[y_i did not finish]   (p = online_dpo.missing_eos_penalty)
                 y⁺ = the first y_i with the highest s_i,  y⁻ = the first with the lowest — two different
                 completions — for every prompt whose scores are not all equal
                 L = DPO(y⁺, y⁻) with the reference π_ref (``reference.*``; ``reference.sync_every`` moves it
                 toward the policy, i.e. refreshes it every τ steps)

Pairing happens in this objective's row builder (`rl/rows/pairs.py`); the loss is DPO's, unchanged (the ``online_dpo:``
section has DPO's options: ``online_dpo.loss``, ``online_dpo.beta``…). A group whose completions all score the same carries no preference: it forms no pair, adds
nothing to the loss or to its denominator, and is counted as ``tied_groups`` (``pairs``: the pairs formed). The
missing-EOS penalty is TRL's (`OnlineDPOConfig.missing_eos_penalty`; ``online_dpo.missing_eos_penalty``): unfinished, rambling completions lose.
"""

from __future__ import annotations

from pydantic import Field

from .dpo import DPO, DPOOptions


class OnlineDPOOptions(DPOOptions):
    """The ``online_dpo:`` section: DPO's options (the rollouts' settings are the shared ``rl:`` section) and the
    missing-EOS penalty p."""

    missing_eos_penalty: float = Field(0.0, ge=0.0)  # subtracted from the score of an unfinished completion


class OnlineDPO(DPO):
    name = "online_dpo"
    Options = OnlineDPOOptions
    data_kind = "prompts"
    row_builder = "pairs"  # rl/rows/pairs.py

    @classmethod
    def from_config(cls, cfg, reference=None):
        obj = super().from_config(cfg, reference)
        obj.missing_eos_penalty = cls.options(cfg).missing_eos_penalty  # read by the row builder (rl/rows/pairs.py)
        return obj
