"""The README's first screen: install, the two make commands, your own data in five lines (run here on a tiny
model, from a folder outside the repository), links that lead to real sections."""

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.helpers import save_tiny_model
from tunelab.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_first_screen_has_install_demo_own_data_and_next_steps():
    first = "\n".join(README.splitlines()[:60])
    for needed in ("pip install -e .", "download.pytorch.org/whl/cpu", "plain `pip install torch`", "make demo",
                   "make test", "tunelab train examples/lora.yaml data.train=mine.jsonl", "## Where to go next"):
        assert needed in first, needed
    assert "| `make test-oldest` |" not in first  # the dependency-set table lives under Contributing
    assert README.index("## Contributing") > README.index("## Reliability")


def test_readme_links_lead_to_sections():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", README, flags=re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert links and not links - anchors, links - anchors


def test_own_data_in_five_lines(tmp_path, tokenizer, monkeypatch):
    block = README.split("## Your own data in five lines", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()
    assert len(lines) == 5
    record = json.loads(lines[0].split("one example per line: ", 1)[1])
    model = save_tiny_model(tmp_path / "tiny", tokenizer)
    monkeypatch.chdir(tmp_path)
    assert main(["examples", "copy", "all"]) == 0  # examples/lora.yaml, as in a clone
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps({**record, "input": f"{i} + 3"}) + "\n" for i in range(8)))
    commands = [ln.split("#")[0].split() for ln in lines[1:]]
    assert [c[:2] for c in commands] == [["tunelab", "data"], ["tunelab", "train"], ["tunelab", "chat"],
                                         ["tunelab", "serve"]]
    tiny = [f"model.name={model}", "train.max_steps=1"]  # the same commands, on a tiny model
    assert main(commands[0][1:] + tiny + ["--n", "1"]) == 0
    assert main(commands[1][1:] + tiny) == 0 and (tmp_path / "runs" / "lora" / "adapter").is_dir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    chat = subprocess.run([sys.executable, "-m", "tunelab", *commands[2][1:], "--max-new-tokens", "4"],
                          input="2 + 3?\n/bye\n", capture_output=True, text=True, env=env, timeout=300)
    assert chat.returncode == 0 and "assistant> " in chat.stdout, chat.stderr
    server = subprocess.Popen([sys.executable, "-m", "tunelab", *commands[3][1:], "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = server.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/v1", banner).group(0)
        with urllib.request.urlopen(url + "/models", timeout=60) as r:
            assert json.loads(r.read())["data"][0]["id"] == "runs/lora"
    finally:
        server.terminate()
        server.wait(timeout=60)
