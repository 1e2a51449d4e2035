"""Lab tests: tiny models on a shared 2-core machine, so one intra-op thread (no spin-wait oversubscription:
a 3-step tiny run drops from ~8 s to ~2 s under load); and hand-made run directories for report tests."""

import pytest
import torch
from lab_helpers import fake_runs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_run(tmp_path):
    return fake_runs(tmp_path)
