"""A LangSmith API on 127.0.0.1 that keeps every run a tracer sends: `LangChainTracer(client=server.client())`.

LangSmith's client posts runs as multipart bodies (`POST /runs/multipart`: a part per run field, named
`post.<id>`, `post.<id>.inputs`, `patch.<id>.outputs`, ...) and asks `GET /info` first; any JSON answer will
do. The server merges each run's parts, so a test reads a run as the LangSmith UI would show it.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from langsmith import Client


class FakeLangSmithServer:
    """Runs as LangSmith received them, by id: the fields of the run, `inputs`, `outputs`, `extra`, ..."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def client(self) -> Client:
        """A LangSmith client that sends here (and nowhere else)."""
        return Client(api_url=self.url, api_key="lsv2-test-key")

    def llm_runs(self) -> list[dict[str, Any]]:
        """The model calls received, in the order they started."""
        with self._lock:
            runs = [run for run in self.runs.values() if run.get("run_type") == "llm"]
        return sorted(runs, key=lambda run: str(run["start_time"]))

    def _keep(self, content_type: str, body: bytes) -> None:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        with self._lock:
            for part in message.iter_parts():
                name = str(part.get_param("name", header="content-disposition"))
                _, run_id, *field = name.split(".")
                value = json.loads(part.get_payload(decode=True) or b"null")
                run = self.runs.setdefault(run_id, {})
                if field:
                    run[field[0]] = value if field[0] != "extra" else {**run.get("extra", {}), **value}
                else:
                    run.update(value)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path.startswith("/runs/multipart"):
                    server._keep(self.headers["content-type"], body)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PATCH = _answer

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads what arrived."""

        return Handler

    @contextmanager
    def serving(self) -> Iterator[FakeLangSmithServer]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()
