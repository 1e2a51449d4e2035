"""CLI conventions users bring from other tools: `--version`, `--config FILE`, defaults in `--help`, `generate` and
`chat` sharing their sampling options and defaults (`generate --system/--device/--seed`), plurals."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import save_tiny_model
from tunelab.cli import build_parser, main
from tunelab.cli_args import resolve_config
from tunelab.console import plural

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("conv") / "tiny", tokenizer)


def test_version(capsys):
    import tunelab

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tunelab {tunelab.__version__}"


def _parse(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_config(parser, args)
    return args


@pytest.mark.parametrize("argv, key", [(["train"], "config"), (["data", "inspect"], "config"),
                                       (["compare"], "sweep")])
def test_config_as_option_wherever_a_positional_config_is(argv, key, capsys):
    plain = _parse([*argv, "a.yaml", "train.lr=1", "lora.r=4"])
    flagged = _parse([*argv, "--config", "a.yaml", "train.lr=1", "lora.r=4"])
    assert getattr(plain, key) == getattr(flagged, key) == "a.yaml"
    assert plain.overrides == flagged.overrides == ["train.lr=1", "lora.r=4"]  # the first override is not the file
    for bad in ([*argv], [*argv, "b.yaml", "--config", "a.yaml"]):  # none, or two
        with pytest.raises(SystemExit) as e:
            _parse(bad)
        assert e.value.code == 2
    assert "two" in capsys.readouterr().err


def test_compare_dry_run_with_config_option_and_plurals(tmp_path, monkeypatch):
    sweep = tmp_path / "one.yaml"
    sweep.write_text(f"base: {ROOT / 'examples' / 'lora.yaml'}\noutput_dir: out\nvariants:\n  - name: only\n")
    monkeypatch.chdir(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tunelab", "compare", "--config", str(sweep), "--dry-run"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin",
                                                               "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "sweep one: 1 variant →" in text and "1 run;" in text and "1 config to" in text
    assert " 1 runs" not in text and "1 variants" not in text and not (tmp_path / "out").exists()
    assert (plural(0, "run"), plural(1, "run"), plural(2, "run"), plural(1000, "entry", "entries")) == \
        ("0 runs", "1 run", "2 runs", "1,000 entries")


def _help(*argv):
    proc = subprocess.run([sys.executable, "-m", "tunelab", *argv, "--help"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin", "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())


def test_help_shows_defaults():
    assert "--top-p TOP_P nucleus sampling (when sampling) (default: 0.95)" in _help("chat")
    assert "(default: 256)" in _help("generate") and "(default: 0.0)" in _help("generate")
    assert "output folder (default: runs/report)" in _help("report")
    assert "GGUF tensor type (default: f16)" in _help("export")
    assert "(default: 8000)" in _help("serve") and "(default: 3)" in _help("data", "inspect")
    assert "(default: None)" not in _help("eval") and "(default: False)" not in _help("compare")


def test_generate_and_chat_share_the_sampling_options_and_defaults():
    from tunelab import generate as g

    gen = vars(_parse(["generate", "m", "--prompt", "x"]))
    chat = vars(_parse(["chat", "m"]))
    shared = ("system", "temperature", "top_p", "max_new_tokens", "seed", "device")
    assert {k: gen[k] for k in shared} == {k: chat[k] for k in shared}
    assert (gen["temperature"], gen["top_p"], gen["max_new_tokens"]) == \
        (g.DEFAULT_TEMPERATURE, g.DEFAULT_TOP_P, g.DEFAULT_MAX_NEW_TOKENS)


def test_generate_system_device_and_seed(model_dir, capsys):
    from tunelab.export import load_run
    from tunelab.generate import generate

    model, tok, template = load_run(model_dir, device="cpu")
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    expected = generate(model, tok, [template.generation_prompt(messages)], max_new_tokens=8,
                        stop=template.stop_strings)[0]
    no_system = generate(model, tok, [template.generation_prompt(messages[1:])], max_new_tokens=8,
                         stop=template.stop_strings)[0]
    assert expected != no_system
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--system", "Answer in French.", "--device", "cpu",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected
    sampled = []
    for _ in range(2):  # a seed reproduces a sampled answer
        assert main(["generate", str(model_dir), "--prompt", "Hello", "--sample", "--seed", "3", "--device", "cpu",
                     "--max-new-tokens", "8"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0].strip() != no_system
    assert main(["generate", str(model_dir), "--prompt", "Hello", "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--device" in err[0]
