"""`train.trackers`: TensorBoard, MLflow (local file store) and W&B (offline) receive exactly the rows of
metrics.jsonl, read back with each tool's own reader; a tracker that is missing or fails to start is one line
before training, with nothing left behind. Each tracker's test is skipped when it is not installed
(`pip install -e .[trackers]`)."""

import json
import struct

import pytest

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("trk") / "tiny", tokenizer)


def _train(tmp_path, model_dir, trackers, expect=0):
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(8))
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "run"), model={"name": str(model_dir)},
                       data={"train": str(data), "max_length": 64, "eval_fraction": 0.25},
                       train={"max_steps": 3, "batch_size": 2, "eval_every": 2, "trackers": trackers},
                       samples={"n_heldout": 0})
    assert main(["train", str(cfg)]) == expect
    return tmp_path / "run"


def _jsonl(run, key):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_tensorboard_event_files_hold_the_metrics(tmp_path, model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path, model_dir, ["tensorboard"])
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for key in ("loss", "lr", "grad_norm", "eval_loss"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        want = _jsonl(run, key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2, key
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, want)), key


def test_mlflow_local_store_holds_the_metrics(tmp_path, model_dir, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = _train(tmp_path, model_dir, ["mlflow"])
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    [info] = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert info.info.status == "FINISHED" and info.info.run_name == "run"
    for key in ("loss", "eval_loss"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(info.info.run_id, key))
        want = _jsonl(run, key)
        assert [s for s, _ in got] == [s for s, _ in want] and len(want) >= 2, key
        assert [v for _, v in got] == pytest.approx([v for _, v in want]), key


def _wandb_records(path, block=32768):
    """The records of a .wandb file: LevelDB's log format (7-byte header: crc32, length, type; 32 KiB blocks;
    FULL=1, FIRST=2, MIDDLE=3, LAST=4) after a 7-byte ':W&B' file header — wandb ≥ 0.2x no longer ships a
    Python reader for its own files."""
    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # zero padding to the block's end
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            yield buf
            buf = b""


def test_wandb_offline_run_holds_the_metrics(tmp_path, model_dir, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _train(tmp_path, model_dir, ["wandb"])
    [path] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    history = {}
    for data in _wandb_records(path):
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[row["_step"]] = row
    for key in ("loss", "lr", "eval_loss"):
        want = _jsonl(run, key)
        assert len(want) >= 2 and [history[s][key] for s, _ in want] == pytest.approx([v for _, v in want]), key


def test_missing_tracker_is_one_line_before_anything(tmp_path, model_dir, capsys, monkeypatch):
    import tunelab.train.log as log

    monkeypatch.setitem(log.TRACKERS, "wandb", ("no_such_tracker_module", "wandb"))
    _train(tmp_path, model_dir, ["wandb"], expect=2)
    err = capsys.readouterr().err.strip().splitlines()  # the error is all: nothing was loaded or printed
    assert err == ["error: train.trackers: 'wandb' is not installed (pip install wandb, or pip install "
                   "'tunelab[trackers]')"]
    assert not (tmp_path / "run").exists()


def test_tracker_failing_to_start_is_one_line_and_leaves_nothing(tmp_path, model_dir, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    (tmp_path / "a_file").write_text("")  # a store "inside" a file cannot be created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "a_file" / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _train(tmp_path, model_dir, ["mlflow"], expect=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train.trackers: mlflow failed to start: "), err  # one line, no traceback
    assert not any("Traceback" in ln for ln in err)
    assert not (tmp_path / "run").exists()
