"""Online (iterative) DPO: DPO on pairs the current policy sampled, labelled by a reward — Xu et al. 2024, "Is DPO
Superior to PPO for LLM Alignment?" (arXiv:2404.10719: iterative DPO beats DPO on a fixed set); Guo et al.
2024, "Direct Language Model Alignment from Online AI Feedback" (arXiv:2402.04792).

    each round:  y_1..y_G ~ π_θ(· | x);   y⁺ = argmax_i r(x, y_i),  y⁻ = argmin_i r(x, y_i)
                 L = DPO(y⁺, y⁻) with the reference π_ref (``reference.*``; ``reference.sync_every`` moves it
                 toward the policy, i.e. refreshes it every τ steps)

Pairing happens in the rollout source (`rl/rollout.py`, mode ``pairs``); the loss is DPO's, unchanged
(the ``online_dpo:`` section has DPO's options: ``online_dpo.loss``, ``online_dpo.beta``…). A group whose completions all score the same gives a pair with no preference
signal; it is kept (the DPO gradient of a pair is not zero even then) and counted as ``tied_groups``.
"""

from __future__ import annotations

from .dpo import DPO, DPOOptions


class OnlineDPOOptions(DPOOptions):
    """The ``online_dpo:`` section: DPO's options (the rollouts' settings are the shared ``rl:`` section)."""


class OnlineDPO(DPO):
    name = "online_dpo"
    Options = OnlineDPOOptions
    data_kind = "prompts"
    rollout = "pairs"
