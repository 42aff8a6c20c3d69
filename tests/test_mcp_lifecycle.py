"""The MCP server as a service: stopped with SIGTERM while a run is inside a model call, started on a port
already taken, called from browser origins, and sent the bearer scheme in any case."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from mcp.client.streamable_http import streamable_http_client

from imageloop.cli import main
from tests.fake_openai_server import FakeOpenAIServer, Fault, png_b64
from tests.fake_providers import captioned_folder
from tests.test_mcp_server import INITIALIZE, MCP_HEADERS, connect, structured

REPO = Path(__file__).resolve().parents[1]
TOKEN = "a-long-enough-token-0123456789"


@pytest.fixture
def library(openai_server: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A captioned folder indexed with the openai profile against the fake endpoint."""
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    folder = captioned_folder(tmp_path / "library" / "photos")
    assert main(["index", str(folder), "--profile", "openai"]) == 0
    return folder.parent


@contextmanager
def http_service(openai: FakeOpenAIServer, root: Path, *options: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`imageloop mcp --http 127.0.0.1:0 --profile openai --root ROOT OPTIONS` as a subprocess, and its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "imageloop.cli", "mcp", "--profile", "openai", "--root", str(root),
         "--http", "127.0.0.1:0", *options],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "OPENAI_BASE_URL": openai.base_url,
             "OPENAI_API_KEY": "sk-test", "IMAGELOOP_SESSIONS": os.environ["IMAGELOOP_SESSIONS"]},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        seen = ""
        while not (match := re.search(r"serving (http://\S+/mcp)", seen)):
            line = process.stderr.readline()
            assert line, seen + "(the server exited)"
            seen += line
        yield process, match.group(1)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stderr.close()


def post(url: str, headers: dict[str, str]) -> int:
    return httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **headers}).status_code


def slow_draft(openai: FakeOpenAIServer, seconds: float) -> None:
    """The next image takes `seconds` to arrive (a model call still running when the service is stopped)."""
    body = json.dumps({"created": 0, "data": [{"b64_json": png_b64()}]}).encode()
    openai.push_fault("/v1/images/generations", Fault(200, body, delay_s=seconds))


def test_sigterm_records_a_run_inside_a_model_call_and_the_service_exits_without_waiting_for_it(
    openai_server: FakeOpenAIServer, library: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    slow_draft(openai_server, 120.0)  # the draft's model call outlasts any stop timeout (Docker: 10 s)
    with http_service(openai_server, library, "--runs", str(runs)) as (process, url):
        with connect(lambda: streamable_http_client(url)) as client:
            started = structured(
                client.call("generate_with_references", {"prompt": "a jay", "index": "photos", "wait_seconds": 0.5})
            )
            assert started["status"] == "running"
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=30)
        took = time.monotonic() - stopped_at

    run_dir = runs / started["run_id"]
    status = json.loads((run_dir / "status.json").read_text())
    record = json.loads((run_dir / "run.json").read_text())
    assert code == 0 and took < 10
    assert status["status"] == "interrupted" and "stopped during a step" in status["error"]
    # Stopped, not failed: the record says so as every stopped run's does, its error saying who stopped it.
    assert (record["status"], record["stop_reason"], record["error"]) == ("cancelled", "cancelled", status["error"])
    assert [step["node"] for step in record["steps"]] == ["prepare"]  # the draft was still being drawn


def test_sigterm_lets_a_run_reach_its_next_step_and_records_it_cancelled(
    openai_server: FakeOpenAIServer, library: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    slow_draft(openai_server, 1.0)  # the draft arrives within the grace period
    with (
        http_service(openai_server, library, "--runs", str(runs)) as (process, url),
        connect(lambda: streamable_http_client(url)) as client,
    ):
        started = structured(
            client.call("generate_with_references", {"prompt": "a jay", "index": "photos", "wait_seconds": 0.3})
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0

    status = json.loads((runs / started["run_id"] / "status.json").read_text())
    record = json.loads((runs / started["run_id"] / "run.json").read_text())
    assert status["status"] == "cancelled" and record["error"] == status["error"]
    assert record["draft_image"] and Path(record["draft_image"]).is_file()  # the finished step is kept


def test_an_idle_service_stops_at_once_on_sigterm(openai_server: FakeOpenAIServer, library: Path) -> None:
    with http_service(openai_server, library) as (process, url):
        assert post(url, {}) == 200
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0 and time.monotonic() - stopped_at < 10


def test_a_port_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]

        code = main(["mcp", "--root", str(tmp_path), "--http", f"127.0.0.1:{port}"])

    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"imageloop: error: --http 127.0.0.1:{port}: cannot listen there (Address already in use)" in err


@pytest.mark.parametrize("origin", ["app.example.com", "ftp://app.example.com", "https://app.example.com/path"])
def test_a_malformed_allowed_origin_is_one_line(
    origin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["mcp", "--root", str(tmp_path), "--http", "127.0.0.1:0", "--allow-origin", origin])
    assert code == 2 and "expected an origin such as https://" in capsys.readouterr().err


def test_browser_origins_are_the_servers_own_and_those_allowed_and_the_bearer_scheme_is_case_free(
    openai_server: FakeOpenAIServer, library: Path
) -> None:
    allowed = "https://app.example.com"
    with http_service(openai_server, library, "--allow-origin", allowed, "--token", TOKEN) as (_, url):
        own = url.removesuffix("/mcp")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        statuses = {
            "own origin": post(url, {**auth, "Origin": own}),
            "allowed origin": post(url, {**auth, "Origin": allowed}),
            "no origin": post(url, auth),
            "another localhost port": post(url, {**auth, "Origin": "http://localhost:3000"}),
            "another site": post(url, {**auth, "Origin": "https://evil.example"}),
            "lower-case scheme": post(url, {"Authorization": f"bearer {TOKEN}"}),
            "upper-case scheme": post(url, {"Authorization": f"BEARER {TOKEN}"}),
            "wrong token": post(url, {"Authorization": "Bearer guess"}),
        }

    assert statuses == {
        "own origin": 200, "allowed origin": 200, "no origin": 200,
        "another localhost port": 403, "another site": 403,
        "lower-case scheme": 200, "upper-case scheme": 200, "wrong token": 401,
    }  # fmt: skip
