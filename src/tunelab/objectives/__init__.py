"""Training objectives: `Objective.loss(model, batch) -> (loss_sum, n, metrics)` and the run hooks each one
declares (base.py). May import: torch, transformers, tunelab.config, tunelab.errors, tunelab.console,
tunelab.data, tunelab.adapters.base (never a specific method), tunelab.models; never train/, eval/ or lab/.

Each objective describes itself: a class with its ``Options`` (the config section named like the objective) and
``from_config(cfg, reference)``, registered by one line in `registry.py`. `build_objective(cfg)` is
``objective_class(cfg.objective).from_config(cfg, reference)``; `run_config_schema()` is the run config's
schema with every registered objective's section:

==================  =======================================  ==================================  ==============================
objective           class (options section)                  data kind                           reference model
==================  =======================================  ==================================  ==============================
sft                 sft.SFT (none)                           sft                                 —
dpo                 dpo.DPO (dpo: loss sigmoid/ipo/cdpo/…)   pairs                               yes
simpo               simpo.SimPO (simpo:)                     pairs                               none (reference-free)
orpo                orpo.ORPO (orpo:)                        pairs                               none (reference-free)
kto                 kto.KTO (kto:)                           unpaired                            yes
reward              reward.RewardModelObjective (reward:)    pairs                               none
rejection_sampling  rejection_sampling.RejectionSampling     prompts (best of G → SFT)           —
online_dpo          online_dpo.OnlineDPO (online_dpo: DPO's) prompts (best vs worst → DPO)       yes
grpo                grpo.GRPO (grpo:)                        prompts                             yes (used when grpo.beta > 0)
rloo                grpo.RLOO (rloo: grpo's options)         prompts                             yes (used when rloo.beta > 0)
ppo                 ppo.PPO (ppo: grpo's clip options + …)   prompts (+ value model)             yes (used when ppo.beta > 0)
==================  =======================================  ==================================  ==============================

The online objectives (data kind ``prompts``) also read the shared ``rl:`` section (the rollouts' sampling).
Measuring a model (held-out loss, perplexity, choice scores, preference metrics, reference log-probs) goes
through one batched no-grad loop, `scoring.score_batches`, run inside `scoring.eval_mode`.
"""

from __future__ import annotations

from .registry import (OBJECTIVES, build_objective, load_run_config, objective_class, objective_names,  # noqa: F401
                       register, run_config_schema, unregister, validate_run_config)
