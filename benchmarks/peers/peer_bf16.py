#!/usr/bin/env python
"""Run a peer script with bf16 mixed precision on: what a user of the peer on a bf16-capable CPU would set.

    python benchmarks/peers/peer_bf16.py PEER_SCRIPT [its arguments ...]

The peers (`../shared/peers/peer_sft.py`, `peer_grpo.py`, `benchmarks/peers/peer_dpo.py`) pin `bf16=False` so
that their default rows are fp32 like tunelab's default was. tunelab's `train.compute_dtype: auto` runs bf16
autocast over fp32 weights where the CPU's bf16 matmuls win; the fair peer for that row is the same peer with
`bf16=True`, which in transformers' Trainer is the same thing: `torch.autocast("cpu", torch.bfloat16)` around the
forward, fp32 weights and optimizer state. This wrapper forces `bf16=True, fp16=False` in every
`TrainingArguments` (SFTConfig, DPOConfig and GRPOConfig derive from it) and then runs the peer unchanged, so the
workload stays exactly the one the peer's docstring describes.
"""

import runpy
import sys

import transformers

_post_init = transformers.TrainingArguments.__post_init__


def _bf16_post_init(self) -> None:
    self.bf16, self.fp16 = True, False
    _post_init(self)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: peer_bf16.py PEER_SCRIPT [args ...]")
    transformers.TrainingArguments.__post_init__ = _bf16_post_init
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
