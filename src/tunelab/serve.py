"""`tunelab serve RUN_OR_MODEL`: an OpenAI-compatible HTTP server over tunelab's own sampler.

Any finished run (LoRA, DoRA, LoReFT, full, …) or model reference can be tried from any OpenAI client, editor
plugin or eval harness: the run is loaded with `load_run` (its adapter and its chat template), chat messages are
rendered with that template, and every completion comes from `sampling.sample` — so the text equals
`tunelab generate` / `tunelab chat` on the same prompt (greedy; tested with the `openai` package as the client).

Endpoints (https://platform.openai.com/docs/api-reference):

    GET  /v1/models             the one model served (its id: RUN_OR_MODEL as given)
    POST /v1/chat/completions   messages → the run's chat template; temperature, top_p, max_tokens
                                (or max_completion_tokens), stop, seed, n=1, stream
    POST /v1/completions        a raw prompt string (no template), same parameters

`stream: true` answers with server-sent events, one `data: {json}\\n\\n` chunk per settled piece of text
(`generate.TextStream`, fed by `sample`'s `on_step` callback as in `tunelab chat`), ending with `data: [DONE]`.
Omitted parameters take OpenAI's defaults (temperature 1, top_p 1); max_tokens defaults to 256. A bad request is
answered with a 4xx JSON error `{"error": {"message", "type", "param", "code"}}` naming the culprit.

Only the standard library's `http.server` is used (no new dependency). Requests are handled in threads, but one
lock serialises generation: a model on one device answers one request at a time. The server binds 127.0.0.1 by
default, reachable from this machine only; it has no authentication (any API key is accepted).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import TunelabError
from .generate import DEFAULT_MAX_NEW_TOKENS, TextStream
from .sampling import sample

MAX_BODY_BYTES = 10 * 2**20
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the client must fix: answered with `status` and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}",
                           param=name)
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise RequestError(400, f"'{name}' = {value} is out of range: give {low} and <= {hi}", param=name)
    return value


def sampling_params(body: dict, max_tokens_limit: int) -> dict:
    """The sampler's keyword arguments from an OpenAI request body (validated: 400 on a wrong type or range)."""
    if body.get("n") not in (None, 1):
        raise RequestError(400, f"'n' = {body['n']!r}: this server returns one choice per request (n=1)", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, f"'stream' must be true or false, got {body['stream']!r}", param="stream")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(400, f"'stop' must be a string or a list of strings, got {body['stop']!r}", param="stop")
    return {"temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
            "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
            "max_new_tokens": _number(body, name, min(DEFAULT_MAX_NEW_TOKENS, max_tokens_limit), 1,
                                      max_tokens_limit, integer=True),
            "seed": _number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
            "stop_strings": list(stop or [])}


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # the content-parts form, text parts only
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise RequestError(400, "'messages' is required: a list of {role, content}", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                               param="messages")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


class Engine:
    """The loaded run and how a request becomes a completion; `lock` serialises generation."""

    def __init__(self, model, tokenizer, template, model_id: str, max_tokens_limit: int = 4096):
        self.model, self.tok, self.template, self.model_id = model, tokenizer, template, model_id
        self.max_tokens_limit, self.lock, self.created = max_tokens_limit, threading.Lock(), int(time.time())

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is None:  # the OpenAI API requires it; clients always send it, curl users forget
            return
        if not isinstance(name, str):
            raise RequestError(400, f"'model' must be a string, got {name!r}", param="model")
        if name not in (self.model_id, Path(self.model_id).name):
            raise RequestError(404, f"model '{name}' is not served here; this server serves '{self.model_id}' "
                                    "(GET /v1/models)", param="model", code="model_not_found")

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "tunelab"}]}

    def prepare(self, body: dict, chat: bool) -> tuple[list[int], dict, bool]:
        """(prompt ids, sampler arguments, strip) of a request, or a RequestError."""
        self.check_model(body)
        params = sampling_params(body, self.max_tokens_limit)
        if chat:
            prompt = self.template.generation_prompt(chat_messages(body))
            params["stop_strings"] += [s for s in self.template.stop_strings if s]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError(400, "'prompt' must be a non-empty string", param="prompt")
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError(400, "the prompt renders to no tokens", param="prompt" if not chat else "messages")
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and len(ids) + params["max_new_tokens"] > context:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({params['max_new_tokens']}) "
                                    f"exceeds the model's context of {context} tokens",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        return ids, params, chat  # chat answers are stripped (as `tunelab generate`); completions verbatim

    def run(self, ids: list[int], params: dict, strip: bool, write=lambda text: None) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) of one request, each settled piece passed to `write`."""
        stream = TextStream(self.tok, params["stop_strings"], write, strip=strip)
        with self.lock:
            out = sample(self.model, self.tok, [ids], batch_size=1, on_step=stream.on_step, **params)
        return stream.finish(), out.finish_reason[0], int(out.completion_lengths[0])


def _chunk(kind: str, rid: str, created: int, model: str, *, text=None, delta=None, finish=None) -> dict:
    if kind == "chat":
        choice = {"index": 0, "delta": delta if delta is not None else {}, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


class Handler(BaseHTTPRequestHandler):
    server_version = "tunelab-serve"

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def log_message(self, fmt, *args):  # one quiet line per request on stderr
        if getattr(self.server, "verbose", True):
            super().log_message(fmt, *args)

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._json(err.status, err.body())

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            return self._json(200, self.engine.models())
        self._error(RequestError(404, f"no such endpoint: GET {self.path}", "not_found_error"))

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise RequestError(413, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def do_POST(self):
        path = self.path.rstrip("/")
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
        try:
            if path not in kinds:
                raise RequestError(404, f"no such endpoint: POST {self.path}", "not_found_error")
            body = self._body()
            kind = kinds[path]
            ids, params, strip = self.engine.prepare(body, chat=kind == "chat")
        except RequestError as err:
            return self._error(err)
        except TunelabError as err:  # the sampler's own checks
            return self._error(RequestError(400, str(err)))
        if body.get("stream"):
            return self._stream(kind, ids, params, strip)
        try:
            text, finish, n_out = self.engine.run(ids, params, strip)
        except Exception as e:  # a failure inside the model: 500 with its message; the server keeps serving
            self.log_error("generation failed: %r", e)
            return self._error(RequestError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
        rid, created, model = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), \
            self.engine.model_id
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
        self._json(200, {**obj, "usage": usage})

    def _stream(self, kind: str, ids: list[int], params: dict, strip: bool) -> None:
        rid, created, model = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), \
            self.engine.model_id
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes

        def event(obj) -> None:
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        def piece(text: str) -> None:
            if kind == "chat":
                event(_chunk(kind, rid, created, model, delta={"content": text}))
            else:
                event(_chunk(kind, rid, created, model, text=text))

        try:
            if kind == "chat":
                event(_chunk(kind, rid, created, model, delta={"role": "assistant", "content": ""}))
            _, finish, _ = self.engine.run(ids, params, strip, piece)
            event(_chunk(kind, rid, created, model, finish=finish))
            event(b"[DONE]")
        except (BrokenPipeError, ConnectionResetError):  # the client went away: its generation stops with it
            self.close_connection = True
        except Exception as e:  # headers are sent: the error goes into the stream, which then ends
            self.log_error("generation failed: %r", e)
            event(RequestError(500, f"generation failed: {type(e).__name__}: {e}", "server_error").body())
            self.close_connection = True


def make_server(engine: Engine | None, host: str = "127.0.0.1", port: int = 8000, verbose: bool = True):
    """A ThreadingHTTPServer answering the OpenAI endpoints for `engine` (port 0: a free port). The socket is bound
    here, so a busy port fails before a model is loaded (`serve_main` sets `server.engine` afterwards)."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OverflowError:
        raise TunelabError(f"serve: --port {port} is not a port (0-65535)") from None
    except OSError as e:
        raise TunelabError(f"serve: cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None
    server.daemon_threads = True
    server.engine, server.verbose = engine, verbose
    return server


def serve_main(source: str, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
               max_tokens_limit: int = 4096) -> int:
    from .console import phase
    from .export import load_run

    if max_tokens_limit < 1:
        raise TunelabError(f"serve: --max-tokens-limit {max_tokens_limit}; give at least 1")
    if device != "auto":
        from .models.load import check_device

        check_device(device, "--device")
    server = make_server(None, host, port)  # a busy port is one line before minutes of loading
    try:
        with phase(f"loading {source}", delay=3.0):
            model, tok, template = load_run(source, device=device)
    except BaseException:
        server.server_close()
        raise
    server.engine = engine = Engine(model, tok, template, str(source), max_tokens_limit=max_tokens_limit)
    where = f"http://{host}:{server.server_address[1]}/v1"
    print(f"serving {source} (template {template.name}) at {where} as model '{engine.model_id}'; Ctrl-C stops",
          flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: {host} is reachable from other machines, and the server has no authentication", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
