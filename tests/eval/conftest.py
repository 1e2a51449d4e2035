"""Eval tests run tiny models on a shared 2-core machine: one intra-op thread avoids spin-wait oversubscription
(a 2-layer forward goes from ~70 ms to ~4 ms under load). Restored afterwards for other test directories."""

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def make_task(tmp_path):
    """make_task(rows, **yaml_fields) -> Task over a JSONL written to tmp_path."""
    from tunelab.eval.tasks import task_from_yaml

    counter = [0]

    def make(rows, **fields):
        counter[0] += 1
        data = tmp_path / f"data{counter[0]}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"name": f"t{counter[0]}", "data": data.name, **fields}
        path = tmp_path / f"task{counter[0]}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(spec))
        return task_from_yaml(Path(path))

    return make
