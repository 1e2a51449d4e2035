"""Hostile and broken input costs one line, bounded memory and seconds — never a traceback, never the machine.

YAML alias bombs, deep nesting and huge records run in a subprocess under a 1 GB address-space limit and a
timeout, so a regression fails the test (MemoryError, timeout) instead of swapping the machine: before the bounds,
a 9-level billion-laughs config ran > 300 s at 3.9 GB and a 50 MB JSONL line passed 4 GB.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tunelab
import torch

from tests.helpers import alpaca_rows, save_tiny_model, write_config, write_jsonl
from tunelab.cli import main
from tunelab.data.sources import load_records
from tunelab.errors import TunelabError

SRC = Path(tunelab.__file__).resolve().parents[1]  # the tunelab under test, for the subprocesses
MEMORY_MB = 1000


def limited(*commands: list[str], memory_mb: int = MEMORY_MB, timeout: float = 240, env: dict | None = None):
    """[(exit status, stderr lines)] of the CLI run on each argv in `commands`, one after another in one subprocess
    limited to `memory_mb` of address space (one interpreter start for them all)."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({memory_mb} * 2**20, {memory_mb} * 2**20))
        from tunelab.cli import main
        for argv in {list(commands)!r}:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(argv)
            print(json.dumps([rc, err.getvalue().strip().splitlines()]), flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", **(env or {})}
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"over {timeout} s: {commands}")
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("[")]
    assert p.returncode == 0 and len(results) == len(commands), p.stderr[-3000:]
    return results


def _one_line(err: list[str]) -> str:
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err[-5:]
    return err[0]


def billion_laughs(levels: int = 9) -> str:
    """Nine levels of list aliases: 9⁹ ≈ 387 million strings once expanded."""
    lines = ["lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def mapping_bomb(levels: int = 30) -> str:
    """Nested mappings, each aliasing the previous twice: 2³⁰ leaves (copied by every alias before)."""
    lines = ["m0: &m0 {x: 1.5, y: 1e-4}"]
    lines += [f"m{i}: &m{i} {{a: *m{i - 1}, b: *m{i - 1}}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 9) -> str:
    """YAML merge keys copy the merged mapping's entries: nine levels of nine merges."""
    lines = ["p0: &p0 {x: 1, y: 2, z: 3}"]
    lines += [f"p{i}: &p{i} {{<<: [{', '.join([f'*p{i - 1}'] * 9)}]}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


BOMBS = {"billion_laughs": (billion_laughs(), "aliases expand to over"),
         "mapping_bomb": (mapping_bomb(), "aliases expand to over"),
         "merge_bomb": (merge_bomb(), "aliases expand to over"),
         "self_alias": ("stages: &s [*s]\n", "refers to a node that contains it"),
         "deep_flow": ("train: " + "[" * 200_000 + "]" * 200_000 + "\n", "nested over 100 levels"),
         "deep_block": ("".join(" " * i + f"k{i}:\n" for i in range(300)) + " " * 300 + "v: 1\n",
                        "nested over 100 levels")}


def test_yaml_bombs_are_one_line_in_bounded_memory_everywhere(tmp_path):
    """Each bomb as a run config, a task file and a sweep file (the one loader), in one limited subprocess."""
    commands, expect = [], []
    for name, (text, expected) in sorted(BOMBS.items()):
        folder = tmp_path / name
        folder.mkdir()
        other = text.replace("train:", "extra:").replace("stages:", "more:")
        (folder / "run.yaml").write_text(text if text.startswith(("train", "stages")) else "train:\n  lr: 1e-4\n" + text)
        (folder / "task.yaml").write_text("kind: exact\ndata: d.jsonl\n" + other)
        (folder / "sweep.yaml").write_text("grid: {train.lr: [1, 2]}\n" + other)
        for argv in (["train", str(folder / "run.yaml")], ["eval", "some-model", "--tasks", str(folder / "task.yaml")],
                     ["compare", str(folder / "sweep.yaml"), "--dry-run"]):
            commands.append(argv)
            expect.append(expected)
    for argv, expected, (rc, err) in zip(commands, expect, limited(*commands)):
        line = _one_line(err)
        assert rc == 2 and expected in line and ".yaml:" in line, (argv, line)


def test_aliases_within_the_budget_are_shared_not_copied(tmp_path):
    """Reusing a section through an alias still works; an override changes only the section it names."""
    from tunelab.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora: &o {r: 4, alpha: 8.0}\ndora: *o\ntrain: {lr: 1e-4, betas: [0.9, 0.95]}\n")
    c = load_config(cfg, ["lora.r=16"])
    assert (c.lora.r, c.dora.r, c.lora.alpha, c.train.lr) == (16, 4, 8.0, 1e-4)


def test_plain_1e_floats_but_quoted_strings(tmp_path):
    from tunelab.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lr: 1e-4, weight_decay: 1E-2}\nmodel: {name: '1e5'}\n")
    c = load_config(cfg)
    assert (c.train.lr, c.train.weight_decay, c.model.name) == (1e-4, 1e-2, "1e5")


def _inspect_config(tmp_path, data: Path) -> Path:
    return write_config(tmp_path / "c.yaml", model={"name": "smollm2-135m"}, data={"train": str(data)})


def test_a_50mb_jsonl_record_is_one_line_in_bounded_memory(tmp_path):
    data = tmp_path / "d.jsonl"
    with data.open("w") as f:
        f.write(json.dumps(alpaca_rows(1)[0]) + "\n")
        f.write('{"instruction": "a", "output": [' + "{}," * (50 * 2**20 // 3) + "{}]}\n")
    [(rc, err)] = limited(["data", "inspect", str(_inspect_config(tmp_path, data)), "--n", "2"])
    assert rc == 2 and f"{data}:2: record over the 16 MB limit per record" in _one_line(err)


def test_a_huge_record_in_a_json_array_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_MAX_RECORD_MB", "1")
    data = tmp_path / "d.json"
    data.write_text("[\n" + json.dumps(alpaca_rows(1)[0]) + ",\n" + '{"x": "' + "a" * 2**20 + '"}]')
    with pytest.raises(TunelabError, match=rf"^{data}:3: record of 1.0 MB over the 1 MB limit per record"):
        load_records(str(data))
    monkeypatch.setenv("TUNELAB_MAX_RECORD_MB", "2")
    assert len(load_records(str(data))) == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_record_nested_200000_deep_is_one_line(tmp_path, suffix, capsys):
    deep = "[" * 200_000 + "]" * 200_000
    data = tmp_path / f"d{suffix}"
    row = '{"instruction": "a", "output": ' + deep + "}"
    data.write_text(row + "\n" if suffix == ".jsonl" else "[" + row + "]")
    with pytest.raises(TunelabError, match="nested too deeply"):
        load_records(str(data))
    rc = main(["data", "inspect", str(_inspect_config(tmp_path, data))])
    assert rc == 2 and "nested too deeply" in _one_line(capsys.readouterr().err.strip().splitlines())


def test_a_fifo_or_a_device_as_data_says_what_it_is(tmp_path):
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(TunelabError, match=rf"^{fifo}: not a regular file \(a FIFO\)"):
        load_records(str(fifo))
    with pytest.raises(TunelabError, match=r"^/dev/zero: not a regular file \(a character device\)"):
        load_records("/dev/zero")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", tokenizer)


def test_a_malicious_pickle_refused_by_torch_is_one_line(tmp_path, model_dir, capsys):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(model_dir, evil)
    for p in evil.glob("*.safetensors"):
        p.unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"model.embed_tokens.weight": Payload()}, evil / "pytorch_model.bin")
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(4))
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"),
                       model={"name": str(evil), "allow_pickle": True}, data={"train": str(data)})
    rc = main(["train", str(cfg)])
    line = _one_line(capsys.readouterr().err.strip().splitlines())
    assert rc == 2 and "torch refused to unpickle its weights" in line and "posix.system" in line
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir):
    from tunelab.config import load_config
    from tunelab.train.launch import train

    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "d.jsonl", alpaca_rows(8))
    cfg = write_config(root / "c.yaml", output_dir=str(root / "run"), model={"name": str(model_dir)},
                       data={"train": str(data), "max_length": 64}, train={"max_steps": 1, "batch_size": 2},
                       samples={"n_heldout": 0}, lora={"r": 2})
    return train(load_config(cfg))


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def test_generate_on_a_truncated_adapter_is_one_line(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 3)
    rc = main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"])
    line = _one_line(capsys.readouterr().err.strip().splitlines())
    assert rc == 2 and f"{run / 'adapter'}: cannot read the saved adapter" in line and "truncated" in line


@pytest.mark.parametrize("config, expected", [("model: [1\n", "config.yaml:2: invalid YAML"),
                                              ("model: 5\n", "config.yaml:1: model: expected a mapping"),
                                              ("- a list\n", "not a run config"),
                                              ("method: {lora: 1}\nmodel: {name: x}\n", "method: expected a string")])
def test_chat_on_a_run_with_an_invalid_config_is_one_line(finished_run, tmp_path, capsys, config, expected):
    run = _copy_run(finished_run, tmp_path / "run")
    (run / "config.yaml").write_text(config)
    rc = main(["chat", str(run)])
    assert rc == 2 and expected in _one_line(capsys.readouterr().err.strip().splitlines())
