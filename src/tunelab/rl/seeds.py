"""Named random streams of online RL: `seeded(purpose, *keys)` → a `torch.Generator`.

Every random draw of a rollout source comes from a generator that is a pure function of *what it is for* and
the integers that identify it — never of how many draws happened before — which is what makes a run killed in
the middle of a round resume onto the uninterrupted curve:

=================  ======================  ===================================================================
purpose            keys                    draws
=================  ======================  ===================================================================
``prompt_order``   seed, pass              the order of the training prompts in one pass over them
``rollout``        seed, round, rank       the tokens sampled in a round (each rank its own stream)
``minibatch``      seed, round, pass       the order of a round's rows in one of its ``rl.ppo_epochs`` passes
``extra_prompts``  seed, round, pass, rank the prompts of an extra sampling pass (DAPO dynamic sampling)
``extra_rollout``  seed, round, pass, rank the tokens sampled in that extra pass
=================  ======================  ===================================================================

The seed is the first 8 bytes of BLAKE2b over ``purpose`` and the keys (as decimal text), masked to 63 bits:
stable across processes, Python versions and machines (unlike `hash()`), and two purposes never share a
stream by construction (the old scheme salted one polynomial hash with magic constants).
"""

from __future__ import annotations

import hashlib

import torch

PURPOSES = ("prompt_order", "rollout", "minibatch", "extra_prompts", "extra_rollout")


def seed_of(purpose: str, *keys: int) -> int:
    """The 63-bit seed of (`purpose`, `keys`) (see the module docstring)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream {purpose!r}; known: {', '.join(PURPOSES)}")
    text = "\x1f".join([purpose, *(str(int(k)) for k in keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2 ** 63 - 1)


def seeded(purpose: str, *keys: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `seed_of(purpose, *keys)`."""
    return torch.Generator().manual_seed(seed_of(purpose, *keys))
