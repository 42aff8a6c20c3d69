"""A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API to test our backends end to end.

openai 3.x sends through httpx2, which respx cannot intercept; a real socket exercises the client's own
serialisation (JSON bodies, multipart uploads), retries and error handling exactly as production does.

Besides scripted JSON answers it plays the faults a real endpoint shows (`Fault`): an HTML page with
status 200 (a proxy's login or error page), 500, 429 with Retry-After, a hang, a truncated image, an
answer with extra keys, a refusal. A fault is queued for one request (`push_fault`) or kept for every
request to a route until cleared (`always`).
"""

from __future__ import annotations

import base64
import contextlib
import email.parser
import email.policy
import hashlib
import io
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_EMBEDDING_DIM = 8
# Real widths for the models the `openai` profile names, so profile runs see what OpenAI would send.
MODEL_EMBEDDING_DIMS = {"text-embedding-3-small": 1536}


@dataclass(frozen=True)
class MultipartPart:
    """One field of a multipart/form-data body: its form name, file name (None for plain fields), bytes."""

    name: str
    filename: str | None
    content: bytes


@dataclass(frozen=True)
class RecordedRequest:
    """What one request carried: parsed JSON body, or multipart parts, plus headers (lower-case names)."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    parts: list[MultipartPart] = field(default_factory=list)

    def fields(self, name: str) -> list[MultipartPart]:
        """The multipart parts sent under form name `name`, in order."""
        return [part for part in self.parts if part.name == name]


def png_b64(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> str:
    """A small solid PNG, base64-encoded as the Images API returns it."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def hash_vector(text: str, dim: int) -> list[float]:
    """A deterministic pseudo-embedding of `text` (not normalised, so callers' normalisation shows)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32) * 3.0
    return [float(x) for x in vector]


def chat_completion(
    content: str | None, refusal: str | None = None, usage: tuple[int, int] | None = None
) -> dict[str, Any]:
    """A chat.completion body with one assistant choice (and `usage`: prompt and completion tokens, if given)."""
    message = {"role": "assistant", "content": content, "refusal": refusal}
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return body


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


@dataclass(frozen=True)
class Fault:
    """An answer sent as is, after `delay_s`: any status, content type, headers and bytes.

    A delay longer than the client waits is a hung endpoint: the client gives up, the server thread
    sleeps on until the delay ends or the server closes.
    """

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0


def _json_fault(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Fault:
    return Fault(status, json.dumps(body).encode(), headers=headers)


def html_page(status: int = 200) -> Fault:
    """What a captive portal, a login wall or a misrouted proxy sends: HTML, often with status 200."""
    page = b"<!doctype html><html><head><title>Sign in</title></head><body>Please sign in</body></html>"
    return Fault(status, page, content_type="text/html; charset=utf-8")


def server_error(message: str = "upstream model crashed") -> Fault:
    """HTTP 500 with the OpenAI error envelope."""
    return _json_fault(500, error_body(message, "server_error"))


def rate_limited(retry_after_s: float) -> Fault:
    """HTTP 429 asking the client to come back after `retry_after_s` seconds."""
    return _json_fault(
        429, error_body("Rate limit reached", "rate_limit_exceeded"), (("Retry-After", f"{retry_after_s:g}"),)
    )


def hung(seconds: float = 3600.0) -> Fault:
    """No answer for `seconds` (then an empty 200 nobody waits for any more)."""
    return Fault(200, b"{}", delay_s=seconds)


def truncated_image() -> Fault:
    """An Images API answer whose PNG stops half-way."""
    data = base64.b64decode(png_b64(size=64))
    return _json_fault(
        200, {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(data[: len(data) // 2]).decode()}]}
    )


def with_extra_keys(answer: dict[str, Any]) -> Fault:
    """A chat answer holding the JSON asked for plus keys nobody asked for."""
    return _json_fault(200, chat_completion(json.dumps({**answer, "confidence": 0.9, "notes": {"why": "extra"}})))


def refusal(text: str = "I can't help with that.") -> Fault:
    """A chat answer that refuses (no content, `refusal` set), as OpenAI sends for unsafe requests."""
    return _json_fault(200, chat_completion(None, refusal=text))


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input", [])
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    dim = int(body.get("dimensions") or MODEL_EMBEDDING_DIMS.get(body.get("model", ""), DEFAULT_EMBEDDING_DIM))
    data = []
    for index, text in enumerate(texts):
        vector: Any = hash_vector(str(text), dim)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "model": body.get("model", "fake"),
        "data": data,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def _image(_: Any) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": png_b64()}]}


_DEFAULTS = {
    "/v1/chat/completions": lambda _: chat_completion("{}"),
    "/v1/images/generations": _image,
    "/v1/images/edits": _image,
    "/v1/embeddings": _embeddings,
}


def _parse_multipart(content_type: str, body: bytes) -> list[MultipartPart]:
    """Split a multipart/form-data body with the stdlib MIME parser (it reads the boundary from the header)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        parts.append(MultipartPart(str(name), part.get_filename(), payload if isinstance(payload, bytes) else b""))
    return parts


class FakeOpenAIServer:
    """Records every request and answers from per-route scripted queues, else with sensible defaults."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.latency_s = 0.0
        """How long every answer takes (requests overlap in the server's threads)."""
        self.in_flight = 0
        self.max_in_flight = 0
        """The most requests the server was answering at one time."""
        self._scripted: defaultdict[str, deque[Fault]] = defaultdict(deque)
        self._always: dict[str, Fault] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval: shutdown() waits for the loop to notice, which is 0.5 s per test by default.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True)

    @property
    def base_url(self) -> str:
        """What to pass as the client's base_url."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def push(self, path: str, status: int, body: Any) -> None:
        """Queue one JSON answer for `path` (e.g. "/v1/chat/completions"); queued answers go first, in order."""
        self.push_fault(path, _json_fault(status, body))

    def push_fault(self, path: str, fault: Fault) -> None:
        """Queue one answer sent as is (see `Fault` and the fault makers above)."""
        with self._lock:
            self._scripted[path].append(fault)

    def always(self, path: str, fault: Fault | None) -> None:
        """Answer every request to `path` with `fault` once the queue is empty (None: back to the defaults)."""
        with self._lock:
            if fault is None:
                self._always.pop(path, None)
            else:
                self._always[path] = fault

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests for `path`, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def start(self) -> FakeOpenAIServer:
        """Serve in a daemon thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port (hung answers end now)."""
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _answer(self, request: RecordedRequest) -> Fault:
        with self._lock:
            self.requests.append(request)
            if self._scripted[request.path]:
                return self._scripted[request.path].popleft()
            if request.path in self._always:
                return self._always[request.path]
        default = _DEFAULTS.get(request.path)
        if default is None:
            return _json_fault(404, error_body(f"fake server has no route {request.method} {request.path}"))
        return _json_fault(200, default(request.json))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                content_type = self.headers.get("Content-Type", "")
                recorded = RecordedRequest(
                    method="POST",
                    path=self.path.split("?", 1)[0],
                    headers={k.lower(): v for k, v in self.headers.items()},
                    json=json.loads(raw) if content_type.startswith("application/json") and raw else None,
                    parts=_parse_multipart(content_type, raw) if content_type.startswith("multipart/") else [],
                )
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.latency_s and server._closing.wait(server.latency_s):
                        return
                    answer = server._answer(recorded)
                    if answer.delay_s and server._closing.wait(answer.delay_s):
                        return  # the server closed while this answer hung
                finally:
                    with server._lock:
                        server.in_flight -= 1
                # The client may have given up waiting (a hang it timed out on): nobody reads this.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(answer.status)
                    self.send_header("Content-Type", answer.content_type)
                    self.send_header("Content-Length", str(len(answer.body)))
                    for name, value in answer.headers:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                """Keep test output clean."""

        return Handler


class ScriptedOpenAIServer(FakeOpenAIServer):
    """The fake OpenAI API answering each chat request with `answer(request)`: a function of what was asked, not
    of arrival order, so concurrent clients (a cluster's workers, however scheduled) get the answers one
    process would. Other routes answer as `FakeOpenAIServer` does."""

    def __init__(self, answer: Callable[[RecordedRequest], str]) -> None:
        super().__init__()
        self.answer = answer

    def _answer(self, request: RecordedRequest) -> Fault:
        if request.path != "/v1/chat/completions":
            return super()._answer(request)
        with self._lock:
            self.requests.append(request)
        return _json_fault(200, chat_completion(self.answer(request)))
