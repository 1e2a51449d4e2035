"""Trackers: a missing one is reported before the run writes anything; one that fails to start never stops
training."""

import sys
import types

from tunelab.train import log


def test_a_missing_tracker_is_warned_about_before_the_run(monkeypatch, capsys):
    monkeypatch.setitem(log.TRACKER_MODULES, "wandb", "tunelab_no_such_module")
    assert log.check_trackers(["wandb"]) == []
    assert "tracker 'wandb' is not installed" in capsys.readouterr().err


def test_a_tracker_that_cannot_start_is_skipped(monkeypatch, tmp_path, capsys):
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)\nmore")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(log.importlib.util, "find_spec", lambda name: object())
    metrics = log.MetricsLog(tmp_path / "metrics.jsonl", trackers=["wandb"], run_dir=tmp_path)
    metrics.write({"step": 1, "loss": 1.0})
    assert metrics.trackers == []
    assert "tracker 'wandb' could not start (RuntimeError: api_key not configured" in capsys.readouterr().err
