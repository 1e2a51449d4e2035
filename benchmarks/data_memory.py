#!/usr/bin/env python
"""RSS before training step 1 for N records (issue #16 item 11): encoded examples → the SFT batch source →
the first batch, as a run does. `--eager` also collates the whole epoch up front (the old behaviour).

    PYTHONPATH=src .venv/bin/python benchmarks/data_memory.py 10000 [--eager]

Examples are synthetic (no tokenizer, so 10k records take seconds): lengths 40–250 tokens, packed into rows
of max_length 256, batch 8, like issue #16's report. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import types



def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    import torch

    from tunelab.data.kinds import SFTData
    from tunelab.data.masking import Encoded

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 251, (args.n,), generator=g).tolist()
    examples = [Encoded(list(range(5, 5 + n)), [i > n // 3 for i in range(n)], False, n - n // 3 - 1, "")
                for n in lengths]
    data_mb = rss_mb()
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(packing=True, max_length=256),
                                train=types.SimpleNamespace(batch_size=8, seed=0))
    source = SFTData().batches(examples, cfg, pad_id=0)
    held = []
    if args.eager:  # what StaticBatches cached before: every batch of the epoch, collated
        held = [source.get(0, i) for i in range(source.per_epoch)]
    source.get(0, 0)
    held_mb = sum(t.numel() * t.element_size() for b in held for t in b.values() if torch.is_tensor(t)) / 2**20
    print(json.dumps({"records": args.n, "eager": args.eager, "batches_per_epoch": source.per_epoch,
                      "rss_mb": round(rss_mb(), 1), "rss_after_encoding_mb": round(data_mb, 1),
                      "held_tensor_mb": round(held_mb, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
