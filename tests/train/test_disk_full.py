"""A full disk (simulated: the writer raises ENOSPC, as an OSError or wrapped the way safetensors reports it)
stops with one line saying what needed how much space where; the partial checkpoint/folder is removed and the
previous checkpoints are kept, so a rerun after freeing space resumes."""

import errno
import json

import pytest
from safetensors import SafetensorError

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main
from tunelab.config import TrainConfig, load_config
from tunelab.data.batches import StaticBatches
from tunelab.data.collate import collate
from tunelab.data.masking import Encoded
from tunelab.errors import TunelabError
from tunelab.objectives.sft import SFT
from tunelab.train import artifacts, checkpoint as ckpt
from tunelab.train.checkpoint_files import damage
from tunelab.train.launch import train
from tunelab.train.log import MetricsLog
from tunelab.train.loop import fit

ERRORS = {"oserror": lambda path: OSError(errno.ENOSPC, "No space left on device", path),
          "safetensors": lambda path: SafetensorError("Error while serializing: I/O error: No space left on device "
                                                      "(os error 28)")}


def _batches():
    examples = [Encoded(list(range(5, 15 + i)), [False] * 2 + [True] * (8 + i), False, 8 + i) for i in range(4)]
    return StaticBatches(lambda e: [collate(examples[k:k + 2], pad_id=0) for k in (0, 2)], 2)


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_full_disk_during_a_checkpoint(tiny, tmp_path, monkeypatch, kind):
    real = ckpt.save_file

    def save_file(tensors, path, *a, **k):
        if "step-000004" in path:
            (ckpt.Path(path)).write_bytes(b"partial")  # what a real full disk leaves: a cut-off file
            raise ERRORS[kind](path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    cfg = TrainConfig(max_steps=6, save_every=2, keep_last=1, lr=1e-3)
    with pytest.raises(TunelabError) as e:
        fit(tiny("llama"), SFT(), _batches(), cfg, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"disk full: writing checkpoint step-000004 to {tmp_path / 'checkpoints'} needs about ")
    assert "MB free there" in msg and "the partial checkpoint was removed, earlier checkpoints are kept" in msg
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-000002"]  # no .tmp-step-000004 filling the disk, keep_last=1 did not prune step 2
    assert damage(tmp_path / "checkpoints" / "step-000002") is None
    monkeypatch.undo()  # space freed: the rerun resumes from step 2 and finishes
    assert fit(tiny("llama"), SFT(), _batches(), cfg, tmp_path).resumed_from == 2


@pytest.fixture
def run_config(tmp_path, tokenizer):
    model_dir = save_tiny_model(tmp_path / "tiny", tokenizer)
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))

    def make(method):
        return write_config(tmp_path / f"{method}.yaml", output_dir=str(tmp_path / method), method=method,
                            model={"name": str(model_dir)}, data={"train": str(data), "max_length": 64},
                            train={"max_steps": 3, "batch_size": 2, "save_every": 2}, samples={"n_heldout": 0})
    return make


def test_full_disk_writing_the_adapter_is_one_cli_line(run_config, monkeypatch, capsys):
    def export_method(model, method, options, tmp, **kw):
        tmp.mkdir(parents=True)
        (tmp / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "export_method", export_method)
    config = run_config("lora")
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    out = config.parent / "lora"
    assert err[-1].startswith(f"error: disk full: writing adapter/ to {out} needs about ")
    assert "Traceback" not in "\n".join(err)
    assert not (out / ".tmp-adapter").exists() and not (out / "adapter").exists()
    # the checkpoints stay, the final step's too (save_every is set: a finished run can be extended), so the
    # rerun, with space freed, only measures and saves
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    monkeypatch.undo()
    assert main(["train", str(config)]) == 0
    assert "(step 3)" in "".join(capsys.readouterr()) and (out / "adapter").is_dir()


def test_full_disk_writing_the_model_folder(run_config, monkeypatch):
    def save_pretrained(self, path, *a, **k):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    from transformers import PreTrainedModel
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    with pytest.raises(TunelabError, match=r"^disk full: writing model/ to .* needs about [\d.]+ MB"):
        train(load_config(run_config("full")))
    out = run_config("full").parent / "full"
    assert not (out / ".tmp-model").exists() and not (out / "results.json").exists()
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").exists()


def test_full_disk_appending_metrics_leaves_no_torn_row(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 2.0})
    import tunelab.train.log as log_module
    real_write = log_module.os.write

    def write(fd, data):
        if b'"step": 2' not in bytes(data):
            return real_write(fd, data)
        real_write(fd, bytes(data[:7]))  # the disk fills up part-way through the row
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log_module.os, "write", write)
    with pytest.raises(TunelabError, match=f"^disk full: writing a row of metrics.jsonl to {tmp_path} needs about 25 bytes"):
        log.write({"step": 2, "loss": 1.5})
    monkeypatch.undo()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 1, "loss": 2.0}]


def test_full_disk_on_any_other_run_file_is_one_line(run_config, monkeypatch):
    from tunelab.train import run as run_module

    def save_config(cfg, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_module, "save_config", save_config)
    config = run_config("lora")
    with pytest.raises(TunelabError, match=f"^disk full: writing config.yaml to {config.parent / 'lora'}, "):
        train(load_config(config))
