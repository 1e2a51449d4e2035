"""Online RL: rollouts (rollout.py), rewards (rewards.py), advantages (advantages.py). May import every layer above
train/ (data, models, adapters, objectives, sampling, eval); never train/ or lab/."""

from . import prompts  # noqa: F401,E402  (registers the `prompts` data kind)
