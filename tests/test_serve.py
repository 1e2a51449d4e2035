"""`tunelab serve`: the `openai` package as the client (chat streamed and not, completions, models); greedy text
equals `tunelab.generate` on the same prompt; bad requests get 4xx JSON errors (raw urllib); localhost by default."""

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import save_tiny_model
from tunelab.generate import generate
from tunelab.serve import Engine, make_server

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[1]
N = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def server(model_dir):
    from tunelab.export import load_run

    model, tok, template = load_run(model_dir, device="cpu")
    engine = Engine(model, tok, template, str(model_dir), max_tokens_limit=64)
    srv = make_server(engine, "127.0.0.1", 0, verbose=False)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def _expected_chat(engine, messages=MESSAGES, n=N):
    prompt = engine.template.generation_prompt(messages)
    return generate(engine.model, engine.tok, [prompt], max_new_tokens=n, stop=engine.template.stop_strings)[0]


def test_models_list(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server[0].model_id]


def test_chat_equals_generate_streamed_and_not(client, server):
    engine = server[0]
    expected = _expected_chat(engine)
    assert expected  # the tiny model says something
    res = client.chat.completions.create(model=engine.model_id, messages=MESSAGES, temperature=0, max_tokens=N)
    assert res.choices[0].message.content == expected
    assert res.choices[0].message.role == "assistant" and res.choices[0].finish_reason in ("stop", "length")
    assert res.usage.completion_tokens <= N and res.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(model=engine.model_id, messages=MESSAGES, temperature=0,
                                                 max_tokens=N, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected  # streamed piece by piece, same text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == res.choices[0].finish_reason


def test_sampling_with_a_seed_is_reproducible(client, server):
    args = dict(model=server[0].model_id, messages=MESSAGES, temperature=1.0, top_p=0.9, max_tokens=N, seed=7)
    a = client.chat.completions.create(**args).choices[0].message.content
    b = client.chat.completions.create(**args).choices[0].message.content
    assert a == b


def test_completions_raw_prompt_and_stop(client, server):
    engine = server[0]
    prompt = "The capital of France is"
    expected = generate(engine.model, engine.tok, [prompt], max_new_tokens=N, strip=False)[0]
    res = client.completions.create(model=engine.model_id, prompt=prompt, temperature=0, max_tokens=N)
    assert res.choices[0].text == expected  # verbatim: no template, no stripping
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=engine.model_id, prompt=prompt, temperature=0, max_tokens=N, stream=True))
    assert streamed == expected
    stop = expected.strip()[:2]
    cut = client.completions.create(model=engine.model_id, prompt=prompt, temperature=0, max_tokens=N, stop=[stop])
    assert cut.choices[0].text == expected[:expected.find(stop)] and cut.choices[0].finish_reason == "stop"


def _raw(url, body=None, method=None, data=None):
    data = data if data is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, culprit", [
    (None, 400, "not valid JSON"),
    ({"model": "x"}, 404, "model 'x' is not served here"),
    ({}, 400, "'messages' is required"),
    ({"messages": "hi"}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": MESSAGES, "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"messages": MESSAGES, "temperature": 3}, 400, "'temperature' = 3 is out of range"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, "'max_tokens' = 0 is out of range"),
    ({"messages": MESSAGES, "max_tokens": 65}, 400, "'max_tokens' = 65 is out of range"),
    ({"messages": MESSAGES, "max_tokens": 2.5}, 400, "'max_tokens' must be an integer"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "'top_p' = 0 is out of range"),
    ({"messages": MESSAGES, "n": 2}, 400, "'n' = 2"),
    ({"messages": MESSAGES, "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"messages": MESSAGES, "stop": [1]}, 400, "'stop' must be a string"),
])
def test_bad_chat_requests_get_4xx_json(server, body, status, culprit):
    url = server[1] + "/chat/completions"
    code, err = _raw(url, body, data=b"{not json" if body is None else None)
    assert code == status and culprit in err["error"]["message"], err
    assert err["error"]["type"]


def test_bad_completion_unknown_paths_and_wrong_method(server):
    code, err = _raw(server[1] + "/completions", {"prompt": "word " * 500, "max_tokens": 64})  # context: 512
    assert code == 400 and "exceeds the model's context of 512 tokens" in err["error"]["message"]
    assert err["error"]["code"] == "context_length_exceeded"
    code, err = _raw(server[1] + "/completions", {"prompt": 3})
    assert code == 400 and "'prompt' must be a non-empty string" in err["error"]["message"]
    code, err = _raw(server[1] + "/nope", {"prompt": "x"})
    assert code == 404 and err["error"]["type"] == "not_found_error"
    code, err = _raw(server[1] + "/chat/completions")  # GET
    assert code == 404 and "GET" in err["error"]["message"]
    code, err = _raw(server[1] + "/models", [1, 2])
    assert code == 404


def test_cli_help_says_localhost_and_a_busy_port_is_one_line(server, model_dir):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "tunelab", "serve", "--help"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "127.0.0.1" in res.stdout and "this machine only" in res.stdout
    port = server[1].split(":")[2].split("/")[0]  # already taken by the test server
    res = subprocess.run([sys.executable, "-m", "tunelab", "serve", str(model_dir), "--port", port],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: serve: cannot listen on 127.0.0.1:" + port)
    assert "Traceback" not in res.stderr
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="--port 70000 is not a port"):
        make_server(None, "127.0.0.1", 70000)


def test_a_loreft_run_is_served(tmp_path, model_dir):
    """LoReFT (which vLLM cannot serve) answers through the server with the run's edit, not the base model's."""
    from tests.helpers import train_loreft_run
    from tunelab.export import load_run

    model, tok, template = train_loreft_run(tmp_path, model_dir)
    srv = make_server(Engine(model, tok, template, "loreft-run"), "127.0.0.1", 0, verbose=False)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "Add the numbers. 2 + 3"}]
        answer = client.chat.completions.create(model="loreft-run", messages=messages, temperature=0,
                                                max_tokens=8).choices[0].message.content
    finally:
        srv.shutdown()
        srv.server_close()
    prompt = template.generation_prompt(messages)
    assert answer == generate(model, tok, [prompt], max_new_tokens=8, stop=template.stop_strings)[0]
    base, btok, btemplate = load_run(model_dir, device="cpu")
    assert answer != generate(base, btok, [btemplate.generation_prompt(messages)], max_new_tokens=8,
                              stop=btemplate.stop_strings)[0]


def test_concurrent_requests_are_served_one_generation_at_a_time(client, server):
    """Requests arrive on threads; the engine's lock serialises generation, so each gets the text it asked for."""
    engine = server[0]
    expected = _expected_chat(engine)
    results = []

    def ask():
        results.append(client.chat.completions.create(model=engine.model_id, messages=MESSAGES, temperature=0,
                                                       max_tokens=N).choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected] * 3


def test_a_failure_inside_the_model_is_a_500_and_the_server_goes_on(server, monkeypatch):
    engine, url = server
    real = engine.run
    monkeypatch.setattr(engine, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
    code, err = _raw(url + "/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert code == 500 and err["error"] == {"message": "generation failed: RuntimeError: device lost",
                                            "type": "server_error", "param": None, "code": None}
    monkeypatch.setattr(engine, "run", real)
    code, ok = _raw(url + "/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "temperature": 0})
    assert code == 200 and ok["choices"][0]["message"]["role"] == "assistant"


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    engine, url = server
    req = urllib.request.Request(url + "/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": MESSAGES, "max_tokens": N, "temperature": 0,
                                                  "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]" and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == _expected_chat(engine) and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
