"""`tunelab chat`: answers stream through tunelab's sampler and equal `generate` on the same conversation;
history, /reset, /system; Ctrl-C stops an answer without ending the session (in-process, via a script on
stdin, and in a real terminal under tmux); Ctrl-D exits."""

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import save_tiny_model
from tunelab.chat import ChatSession, chat_loop
from tunelab.generate import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from tunelab.export import load_run

    return load_run(model_dir, device="cpu")


def _expected(model, tok, template, messages, n=10):
    prompt = template.generation_prompt(messages)
    return generate(model, tok, [prompt], max_new_tokens=n, stop=template.stop_strings)[0]


def test_answers_equal_generate_with_history_system_and_reset(loaded):
    model, tok, template = loaded
    session = ChatSession(model, tok, template, max_new_tokens=10)
    out = io.StringIO()
    script = io.StringIO("/system Be brief.\nHello there\nAnd then?\n/reset\nHello there\n")
    assert chat_loop(session, script, out) == 0
    text = out.getvalue()
    sys_msg = [{"role": "system", "content": "Be brief."}]
    first = _expected(model, tok, template, sys_msg + [{"role": "user", "content": "Hello there"}])
    second = _expected(model, tok, template, sys_msg + [{"role": "user", "content": "Hello there"},
                                                        {"role": "assistant", "content": first},
                                                        {"role": "user", "content": "And then?"}])
    answers = [ln[len("assistant> "):].strip() for ln in text.splitlines() if ln.startswith("assistant> ")]
    assert answers == [first, second, first]  # /reset forgets the turns and keeps the system prompt
    assert first != _expected(model, tok, template, [{"role": "user", "content": "Hello there"}])  # system used
    assert "(history cleared)" in text and "(system prompt set; history cleared)" in text


def test_streaming_writes_pieces_and_ctrl_c_stops_only_the_answer(loaded):
    model, tok, template = loaded
    session = ChatSession(model, tok, template, max_new_tokens=40)
    pieces = []
    answer, interrupted = session.reply("Hello there", pieces.append)
    assert not interrupted and len(pieces) > 3 and "".join(pieces).strip() == answer  # streamed, not at once

    calls = []

    def ctrl_c_after_three(text):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt

    session.reset()
    partial, interrupted = session.reply("Hello there", ctrl_c_after_three)
    assert interrupted and partial and answer.startswith(partial) and len(partial) < len(answer)
    assert session.history[-1] == {"role": "assistant", "content": partial}  # kept, as far as it got
    again, interrupted = session.reply("Go on", pieces.append)  # the session goes on
    assert not interrupted and again


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}


def test_cli_with_a_stdin_script(model_dir):
    script = "Hello there\n/system Talk like a pirate.\nHi\n"
    res = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(model_dir), "--max-new-tokens", "6"],
                         input=script, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("tunelab chat · ") and sum(ln.startswith("assistant> ") for ln in lines) == 2
    assert "you> /system Talk like a pirate." in res.stdout


def _pane(session):
    return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", session, "-S", "-200"], capture_output=True,
                          text=True).stdout


def _wait(session, predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        text = _pane(session)
        if predicate(text):
            return text
        time.sleep(0.3)
    raise AssertionError("timed out; pane:\n" + _pane(session))


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_terminal_ctrl_c_and_ctrl_d(model_dir, tmp_path):
    name = f"tunelab-chat-{os.getpid()}"
    cmd = (f"cd {ROOT} && PYTHONPATH={ROOT / 'src'} TOKENIZERS_PARALLELISM=false {sys.executable} -m tunelab chat "
           f"{model_dir} --max-new-tokens 100000; echo CHAT-EXIT=$?; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "50", cmd], check=True)
    try:
        _wait(name, lambda t: "you>" in t)  # capture-pane drops trailing spaces
        subprocess.run(["tmux", "send-keys", "-t", name, "Hello there", "Enter"], check=True)
        _wait(name, lambda t: "assistant> " in t and len(t.split("assistant> ")[-1].strip()) > 20)
        subprocess.run(["tmux", "send-keys", "-t", name, "C-c"], check=True)  # stop the (endless) answer
        _wait(name, lambda t: "[stopped]" in t and t.rstrip().endswith("you>"))
        subprocess.run(["tmux", "send-keys", "-t", name, "/reset", "Enter"], check=True)
        _wait(name, lambda t: "(history cleared)" in t)
        subprocess.run(["tmux", "send-keys", "-t", name, "C-d"], check=True)
        text = _wait(name, lambda t: "CHAT-EXIT=" in t)
        assert "CHAT-EXIT=0" in text and "Traceback" not in text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_chat_with_a_loreft_run(tmp_path, model_dir):
    """LoReFT intervenes on prompt positions at the prefill: the chat answer is the run's, not the base's."""
    from tests.helpers import train_loreft_run
    from tunelab.export import load_run

    model, tok, template = train_loreft_run(tmp_path, model_dir)
    session = ChatSession(model, tok, template, max_new_tokens=8)
    answer, _ = session.reply("Add the numbers. 2 + 3")
    messages = [{"role": "user", "content": "Add the numbers. 2 + 3"}]
    assert answer == _expected(model, tok, template, messages, n=8)
    base, btok, btemplate = load_run(model_dir, device="cpu")
    assert answer != _expected(base, btok, btemplate, messages, n=8)


def test_streaming_holds_back_only_what_could_start_a_stop_string():
    from tunelab.chat import held_back

    stops = ["### Instruction", "</s>"]
    assert held_back("The answer is 5.\n###", stops) == 3      # might become "### Instruction": wait
    assert held_back("The answer is 5.\n### Ins", stops) == 7
    assert held_back("The answer is 5. <", stops) == 1
    assert held_back("The answer is 5.", stops) == 0          # nothing pending: print it all now
    assert held_back("anything", []) == 0


class _Recorder(ChatSession):
    """A session that records what would be sent to the model instead of generating."""

    def reply(self, user, write=lambda text: None):
        self.sent = getattr(self, "sent", []) + [user]
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]
        write("ok")
        return "ok", False


@pytest.mark.parametrize("leave", ["/bye", "/exit", "/quit"])
def test_commands_are_never_sent_to_the_model(loaded, leave):
    from tunelab.chat import COMMANDS_HELP

    session = _Recorder(*loaded)
    out = io.StringIO()
    script = f"/help\n/?\nHello there\n/clear\n/nope\n/usr/bin is a folder\n{leave}\nnever read\n"
    assert chat_loop(session, io.StringIO(script), out) == 0
    assert session.sent == ["Hello there", "/usr/bin is a folder"]  # a path is a message, not a command
    assert out.getvalue().count(COMMANDS_HELP) == 2  # /help and Ollama's /?
    assert "(history cleared)" in out.getvalue() and "(unknown command /nope; /help lists the commands)" in \
        out.getvalue()
    assert session.history == [{"role": "user", "content": "/usr/bin is a folder"},
                                {"role": "assistant", "content": "ok"}]  # /clear forgot "Hello there"
    assert "never read" not in out.getvalue()


def test_multi_line_messages(loaded):
    session = _Recorder(*loaded)
    out = io.StringIO()
    script = ('first line \\\nsecond line\n"""\nblock one\n/help inside a block\n"""\n"""inline"""\n'
              '"""start\nend"""\none more\n')
    assert chat_loop(session, io.StringIO(script), out) == 0
    assert session.sent == ["first line \nsecond line", "block one\n/help inside a block", "inline",
                            "start\nend", "one more"]
    assert out.getvalue().count("... ") == 5  # the continuation prompt


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_real_terminal_line_editing_and_history(model_dir):
    """With readline, Up recalls the previous line and Left/Backspace edit it (no `^[[A` sent to the model)."""
    name = f"tunelab-chat-rl-{os.getpid()}"
    cmd = (f"cd {ROOT} && PYTHONPATH={ROOT / 'src'} TOKENIZERS_PARALLELISM=false {sys.executable} -m tunelab chat "
           f"{model_dir} --max-new-tokens 3; echo CHAT-EXIT=$?; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "50", cmd], check=True)
    try:
        text = _wait(name, lambda t: t.rstrip().endswith("you>"))
        assert "line editing on" in text
        subprocess.run(["tmux", "send-keys", "-t", name, "/system Hello therX", "Enter"], check=True)
        _wait(name, lambda t: "(system prompt set" in t and t.rstrip().endswith("you>"))
        subprocess.run(["tmux", "send-keys", "-t", name, "Up", "BSpace", "e", "Left", "Left", "BSpace", "Enter"],
                       check=True)  # recall, fix the typo, then delete the first "e" of "there"
        text = _wait(name, lambda t: t.count("(system prompt set") == 2 and t.rstrip().endswith("you>"))
        lines = [ln.strip() for ln in text.splitlines()]
        assert "you> /system Hello therX" in lines and "you> /system Hello thre" in lines  # recalled and edited
        assert "[A" not in text and "[D" not in text
        subprocess.run(["tmux", "send-keys", "-t", name, "/bye", "Enter"], check=True)
        assert "CHAT-EXIT=0" in _wait(name, lambda t: "CHAT-EXIT=" in t)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
