"""Issue #16 item 11: the static batch source builds batches on demand, so what it holds before (and during)
training does not grow with the dataset — and it still gives the same batches as the eager construction."""

import dataclasses
import types

import torch

from tunelab.data.batches import shuffled_batches
from tunelab.data.collate import collate
from tunelab.data.kinds import SFTData
from tunelab.data.masking import Encoded


def ex(n, tag):
    return Encoded([tag % 900 + i for i in range(n)], [i > 0 for i in range(n)], False, n - 1, "")


def dataset(n):
    return [ex(20 + (i * 37) % 200, i) for i in range(n)]


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from `obj` through attributes, containers and closures."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (int, float, str, bool, type(None), type)):
        return 0
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if isinstance(obj, types.FunctionType):
        return sum(tensor_bytes(c.cell_contents, seen) for c in obj.__closure__ or ())
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def source(examples, packing=True):
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(packing=packing, max_length=256),
                                train=types.SimpleNamespace(batch_size=8, seed=3))
    return SFTData().batches(examples, cfg, pad_id=0)


def test_held_tensors_do_not_grow_with_the_dataset():
    for packing in (True, False):
        held = []
        for n in (100, 1000):
            src = source(dataset(n), packing)
            src.get(0, 0)  # the first training step's batch
            src.get(0, src.per_epoch - 1)
            held.append(tensor_bytes(src))
        assert held == [0, 0]  # collated batches are not kept: nothing to grow


def test_lazy_epoch_gives_the_eager_batches_in_the_same_order():
    items = dataset(50)
    collate_fn = lambda chunk: collate(chunk, 0, packed=False)  # noqa: E731
    src = shuffled_batches(items, 8, seed=5, collate_fn=collate_fn)
    for epoch in (0, 1):
        g = torch.Generator().manual_seed(5 * 1000003 + epoch)
        order = torch.randperm(len(items), generator=g).tolist()
        eager = [collate_fn([items[i] for i in order[k:k + 8]]) for k in range(0, len(order), 8)]
        assert src.per_epoch == len(eager) == 7
        for i, batch in enumerate(eager):
            got = src.get(epoch, i)
            assert got.keys() == batch.keys() and all(torch.equal(got[k], batch[k]) for k in batch)


def test_group_by_length_keeps_every_item_once_and_cuts_padding():
    items = [[e] for e in dataset(400)]
    lengths = [len(r[0]) for r in items]
    fn = lambda chunk: collate(chunk, 0, packed=False)  # noqa: E731
    plain = shuffled_batches(items, 8, seed=1, collate_fn=fn)
    grouped = shuffled_batches(items, 8, seed=1, collate_fn=fn, lengths=lengths, group=8)
    for epoch in (0, 1):
        order = grouped.make(epoch).order
        assert sorted(order) == list(range(400))  # an epoch is an epoch
        assert order == grouped.make(epoch).order  # a pure function of (seed, epoch): resume is exact
    padded = [sum(src.get(0, i)["input_ids"].numel() for i in range(src.per_epoch)) for src in (plain, grouped)]
    assert padded[1] < 0.8 * padded[0]
