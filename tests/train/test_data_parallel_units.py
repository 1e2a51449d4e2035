"""The pieces of data parallelism that need no second process: data sharding, resume positions, error
reporting, the `parallel` key. (The 2-process runs are in test_distributed.py.)"""

import pytest
import torch

from tunelab.config import TrainConfig, load_config
from tunelab.data.batches import shuffled_batches
from tunelab.errors import TunelabError
from tunelab.train import distributed
from tunelab.train.loop import _position


def _rows(batch: dict) -> list[int]:
    return batch["ids"].tolist()


def _collate(items: list[int]) -> dict:
    return {"ids": torch.tensor(items)}


@pytest.mark.parametrize("n", [16, 13])
def test_ranks_together_read_the_single_process_batches(n):
    items = list(range(100, 100 + n))
    one = shuffled_batches(items, 4, seed=3, collate_fn=_collate)
    ranks = [shuffled_batches(items, 2, seed=3, collate_fn=_collate, rank=r, world=2) for r in (0, 1)]
    assert one.per_epoch == ranks[0].per_epoch == ranks[1].per_epoch
    for epoch in (0, 1):
        for i in range(one.per_epoch):
            parts = [src.get(epoch, i) for src in ranks]
            real = [p for p in parts if not p.get("zero_weight")]
            assert sum((_rows(p) for p in real), []) == _rows(one.get(epoch, i))
    # 13 rows: the last global batch holds one row, so rank 1 gets a placeholder that counts for nothing
    last = ranks[1].get(0, ranks[1].per_epoch - 1)
    assert last.get("zero_weight", False) == (n == 13)


def test_resume_position_rescales_to_the_new_world_size():
    cfg = TrainConfig(batch_size=4)

    class One:
        world = 1

    class Two:
        world = 2

    # saved at 2 ranks × 2 rows after 6 micro-batches = 24 rows = 6 micro-batches of 4 at one rank
    assert _position({"micro": 6, "rows_per_micro": 4}, cfg, One) == 6
    assert _position({"micro": 6, "rows_per_micro": 4}, TrainConfig(batch_size=2), One) == 12
    assert _position({"micro": 6}, TrainConfig(batch_size=2), Two) == 6  # a checkpoint from before this field
    with pytest.raises(TunelabError, match="same global batch"):
        _position({"micro": 3, "rows_per_micro": 2}, cfg, One)


def test_only_the_first_failing_rank_prints(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.delenv("TUNELAB_ERROR_FILE", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test-run")
    assert not distributed.failed_elsewhere()
    assert distributed.report_error("data.jsonl:2: malformed JSON")
    assert not distributed.report_error("data.jsonl:2: malformed JSON")  # the next rank stays silent
    assert distributed.failed_elsewhere()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-run")
    assert not distributed.failed_elsewhere()


def test_a_single_process_is_a_plain_engine(tiny):
    model = tiny("llama")
    engine = distributed.Engine(model, "fsdp")  # no process group: nothing to shard over
    assert engine.kind == "single" and not engine.distributed and engine.wrapped is None
    assert engine.all_sum(1.5, 2) == [1.5, 2]
    with engine.gathered():
        pass


def test_parallel_key_is_validated(tmp_path):
    assert load_config(None, ["parallel=fsdp"]).parallel == "fsdp"
    with pytest.raises(TunelabError, match="parallel"):
        load_config(None, ["parallel=zero3"])
