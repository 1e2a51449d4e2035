"""Online RL: the rollout source (rollout.py), the sampler seam (sampler.py), row builders per online objective
(rows/), rewards (rewards.py), advantages (advantages.py), named random streams (seeds.py). May import every layer
above train/ (data, models, adapters, objectives, sampling, eval); never train/ or lab/."""

from . import prompts  # noqa: F401,E402  (registers the `prompts` data kind)
