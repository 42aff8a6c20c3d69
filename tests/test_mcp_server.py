"""The MCP server through real MCP clients.

`imageloop mcp --profile openai` runs as a subprocess behind the SDK's stdio and streamable-HTTP
clients, with its models served by a local fake of the OpenAI API; finer points (image queries,
the result size cap, models loaded once, runs taking turns on one generator) run in process over
the SDK's memory transport with scripted `fake:` backends.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import numpy as np
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.memory import create_connected_server_and_client_session
from mcp.types import CallToolResult, ImageContent, TextContent
from PIL import Image

import imageloop.backends as backends
from imageloop import limits
from imageloop.app import App
from imageloop.cli import main
from imageloop.config import Settings
from imageloop.mcp import build_server
from imageloop.thumbnails import RESULT_IMAGE_BUDGET
from tests.fake_openai_server import FakeOpenAIServer, Fault, RecordedRequest, chat_completion
from tests.fakes import FakeHashEmbedder, ScriptedGenerator, ScriptedVLM

REPO = Path(__file__).resolve().parents[1]
TOOLS = {
    "index_images", "retrieve_images", "generate_with_references", "genir_round", "genir_feedback", "get_run",
    "compose_retrieve", "rage_retrieve", "rage_generate",
}  # fmt: skip
CAPTIONS = {
    "jay": "a blue jay with a blue crest on a branch",
    "snow": "a snowy branch in winter",
    "cat": "a tabby cat asleep on a sofa",
}
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["Cyanocitta cristata"]}
CAPTIONS_ANSWER = {"captions": [{"concept": "Cyanocitta cristata", "caption": CAPTIONS["jay"]}]}
ALIGNED = {"aligned": True, "missing_concepts": []}
TOKEN = "s3cret-token-for-tests-0123456789"


# A synchronous facade over the SDK's async client, so module-scoped servers can serve many tests.


class Client:
    """One initialised MCP ClientSession, driven from test code through an anyio portal thread."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, session: ClientSession) -> None:
        self.portal = portal
        self.session = session

    def tool_names(self) -> set[str]:
        return {tool.name for tool in self.portal.call(self.session.list_tools).tools}

    def call(self, name: str, arguments: dict[str, Any], progress: list[str] | None = None) -> CallToolResult:
        return self.call_soon(name, arguments, progress).result(timeout=60)

    def call_soon(
        self, name: str, arguments: dict[str, Any], progress: list[str] | None = None
    ) -> Future[CallToolResult]:
        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            if progress is not None:
                progress.append(message or "")

        async def call() -> CallToolResult:
            return await self.session.call_tool(name, arguments, progress_callback=on_progress)

        return self.portal.start_task_soon(call)


@contextmanager
def connect(streams: Callable[[], AbstractAsyncContextManager[Any]]) -> Iterator[Client]:
    """A Client over the transport `streams` opens (its first two values are the read and write streams)."""

    @asynccontextmanager
    async def session() -> AsyncIterator[ClientSession]:
        async with streams() as opened, ClientSession(opened[0], opened[1]) as client:
            await client.initialize()
            yield client

    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(session()) as s:
        yield Client(portal, s)


def stdio_server(openai: FakeOpenAIServer, *args: str, errlog: Any = None) -> Callable[[], Any]:
    """`imageloop mcp --profile openai ARGS` as the SDK's stdio client starts it."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "imageloop.cli", "mcp", "--profile", "openai", *args],
        env={
            "OPENAI_BASE_URL": openai.base_url,
            "OPENAI_API_KEY": "sk-test",
            "PYTHONPATH": str(REPO),
            "IMAGELOOP_SESSIONS": os.environ["IMAGELOOP_SESSIONS"],
        },
        cwd=REPO,
    )
    return lambda: stdio_client(params, errlog=errlog or sys.stderr)


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.isError, text_of(result)
    assert result.structuredContent is not None
    return result.structuredContent


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def images_of(result: CallToolResult) -> list[Image.Image]:
    blocks = [block for block in result.content if isinstance(block, ImageContent)]
    assert all(block.mimeType == "image/png" for block in blocks)
    return [Image.open(io.BytesIO(base64.b64decode(block.data))) for block in blocks]


def maximum(schema: dict[str, Any]) -> Any:
    """A JSON schema's maximum, also inside an optional's anyOf."""
    return schema.get("maximum", next((s["maximum"] for s in schema.get("anyOf", []) if "maximum" in s), None))


def image_bytes(result: CallToolResult) -> int:
    return sum(len(block.data) for block in result.content if isinstance(block, ImageContent))


# The library every subprocess server serves: photos/ (indexed) and links that try to leave it.


@pytest.fixture(scope="module")
def openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("library")
    photos = root / "photos"
    photos.mkdir()
    for shade, (name, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (48, 32), (60 * (shade + 1), 200 - 50 * shade, 90)).save(photos / f"{name}.png")
        (photos / f"{name}.txt").write_text(caption)
    noise = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photos / "noise.png")  # ~3 MB of incompressible pixels
    (photos / "noise.txt").write_text("television static")
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(outside / "secret.png")
    (photos / "leak.png").symlink_to(outside / "secret.png")  # points outside the root: never indexed
    (photos / "leak.txt").write_text("a secret kept outside the roots")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def stdio(openai: FakeOpenAIServer, library: Path) -> Iterator[Client]:
    """A running `imageloop mcp` over stdio, rooted at the library, with photos/ indexed through it."""
    with connect(stdio_server(openai, "--root", str(library))) as client:
        indexed = structured(client.call("index_images", {"folder": "photos"}))
        assert indexed["status"] == "done" and indexed["result"]["indexed"] == 4, indexed
        yield client


# stdio: the contract.


def test_lists_the_tools_with_bounded_arguments(stdio: Client) -> None:
    tools = {tool.name: tool for tool in stdio.portal.call(stdio.session.list_tools).tools}
    assert set(tools) == TOOLS
    k = tools["retrieve_images"].inputSchema["properties"]["k"]
    assert (k["minimum"], k["maximum"]) == (1, 50)
    generate = tools["generate_with_references"].inputSchema["properties"]
    bounds = limits.BOUNDS  # the one table every face takes its bounds from
    assert maximum(generate["max_iterations"]) == bounds["max_iterations"].high
    assert maximum(generate["steps"]) == bounds["steps"].high
    assert (
        generate["size"]["anyOf"][0]["prefixItems"][0] == {"type": "integer"}
        and maximum(generate["wait_seconds"]) <= 55
    )
    assert tools["get_run"].outputSchema is not None  # the run view's shape is declared


def test_retrieve_images_returns_ranked_paths_and_png_thumbnails(stdio: Client, library: Path) -> None:
    result = stdio.call("retrieve_images", {"index": str(library / "photos"), "query": CAPTIONS["jay"], "k": 3})

    found = structured(result)
    assert [hit["position"] for hit in found["results"]] == [1, 2, 3]
    top = found["results"][0]
    assert Path(top["path"]) == library / "photos" / "jay.png" and top["caption"] == CAPTIONS["jay"]
    assert top["score"] == pytest.approx(1.0, abs=1e-4)  # the fake embeds identical texts identically
    thumbnails = images_of(result)
    outside = sum(hit["path"].endswith("leak.png") for hit in found["results"])  # never shown (see below)
    assert len(thumbnails) == 3 - outside
    assert thumbnails[0].size == (48, 32)  # small images come back as they are
    assert "base64" not in json.dumps(found) and len(json.dumps(found)) < 5000  # paths, never pixels


def test_a_large_image_is_downscaled_under_the_result_cap(stdio: Client, library: Path) -> None:
    result = stdio.call("retrieve_images", {"index": "photos", "query": "television static", "k": 1})

    [hit] = structured(result)["results"]
    assert Path(hit["path"]).name == "noise.png"
    [thumbnail] = images_of(result)
    assert max(thumbnail.size) < 1200 and image_bytes(result) <= RESULT_IMAGE_BUDGET


def test_a_symlink_out_of_the_roots_is_never_indexed_so_never_returned(stdio: Client) -> None:
    result = stdio.call("retrieve_images", {"index": "photos", "query": "a secret kept outside the roots", "k": 10})

    assert not any(hit["path"].endswith("leak.png") for hit in structured(result)["results"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"index": "../outside", "query": "x"}, "'..' is not allowed"),
        ({"index": "/etc", "query": "x"}, "is outside the folders"),
        ({"index": "escape", "query": "x"}, "is outside the folders"),  # a symlink out
        ({"index": "photos", "image": "photos/leak.png"}, "is outside the folders"),
        ({"index": "photos", "image": "/etc/passwd"}, "is outside the folders"),
        ({"index": "nowhere", "query": "x"}, "no imageloop index at"),
    ],
)
def test_paths_outside_the_roots_are_refused(stdio: Client, arguments: dict[str, Any], message: str) -> None:
    result = stdio.call("retrieve_images", arguments)
    assert result.isError and message in text_of(result), text_of(result)
    assert "Traceback" not in text_of(result)


FIND = {"index": "photos", "query": "x"}
BOUNDS = limits.BOUNDS
TOO_MANY_ITERATIONS, TOO_MANY_ROUNDS = BOUNDS["max_iterations"].high + 1, BOUNDS["rounds"].high + 1
DRAW = {"prompt": "a jay", "index": "photos"}


@pytest.mark.parametrize(
    ("tool", "arguments", "message"),
    [
        ("retrieve_images", {**FIND, "k": 51}, "invalid k: Input should be less than or equal to 50"),
        ("retrieve_images", {**FIND, "k": "ten"}, "invalid k:"),
        ("retrieve_images", {"query": "x"}, "invalid index: Field required"),
        ("retrieve_images", {**FIND, "top": 3}, "unknown argument 'top'"),
        ("retrieve_images", {"index": "photos"}, "give exactly one of query (text) or image (a path)"),
        ("retrieve_images", {"index": "photos", "query": "x" * (limits.PROMPT_CHARS + 1)}, "invalid query:"),
        ("generate_with_references", {**DRAW, "max_iterations": TOO_MANY_ITERATIONS}, "invalid max_iterations"),
        ("generate_with_references", {**DRAW, "steps": BOUNDS["steps"].high + 1}, "invalid steps"),
        ("generate_with_references", {**DRAW, "size": [limits.MAX_SIDE + 1, 64]}, "is out of range: each side"),
        ("generate_with_references", {**DRAW, "wait_seconds": 600}, "invalid wait_seconds"),
        ("genir_round", {"index": "photos", "query": "a jay", "rounds": TOO_MANY_ROUNDS}, "invalid rounds"),
        ("genir_round", {"index": "photos", "query": "a jay", "max_rounds": 3}, "unknown argument 'max_rounds'"),
        ("genir_feedback", {"session_id": "../../etc", "feedback": "bluer"}, "invalid session_id"),
        ("get_run", {"run_id": "nope"}, "invalid run_id"),
        ("get_run", {"run_id": "0123456789ab"}, "no run '0123456789ab'"),
    ],
)  # fmt: skip
def test_oversized_and_malformed_arguments_are_refused_naming_the_field(
    stdio: Client, tool: str, arguments: dict[str, Any], message: str
) -> None:
    result = stdio.call(tool, arguments)
    assert result.isError and f"{tool}: " in text_of(result) and message in text_of(result), text_of(result)


def test_generate_with_references_returns_the_final_image_its_record_and_progress(
    stdio: Client, openai: FakeOpenAIServer, library: Path
) -> None:
    for answer in (NOT_ALIGNED, CAPTIONS_ANSWER, ALIGNED):
        openai.push("/v1/chat/completions", 200, chat_completion(json.dumps(answer)))
    progress: list[str] = []

    result = stdio.call(
        "generate_with_references",
        {"prompt": "a Cyanocitta cristata on a snowy branch", "index": "photos", "size": [256, 256]},
        progress=progress,
    )

    run = structured(result)
    assert (run["kind"], run["status"], run["poll"]) == ("generate", "done", None)
    record = run["result"]
    assert (record["aligned"], record["iterations"], record["stop_reason"]) == (True, 1, "aligned")
    assert record["references"][0]["path"].endswith("jay.png")
    final, draft = images_of(result)
    assert final.size == draft.size == (8, 8)  # what the fake Images API draws
    run_dir = Path(record["final_image"]).parent
    assert run_dir.parent == library / ".imageloop-runs" and run_dir.name == run["run_id"]
    assert json.loads((run_dir / "run.json").read_text()) == record
    assert any(message.startswith("[critic]") for message in progress)


def test_concurrent_calls_are_all_answered_each_with_its_own_result(stdio: Client, library: Path) -> None:
    queries = [CAPTIONS[name] for name in ("jay", "snow", "cat")] * 4
    futures = [stdio.call_soon("retrieve_images", {"index": "photos", "query": q, "k": 1}) for q in queries]

    tops = [structured(f.result(timeout=30))["results"][0]["caption"] for f in futures]

    assert tops == queries


def test_a_genir_session_continues_across_calls_until_found(stdio: Client, openai: FakeOpenAIServer) -> None:
    first = structured(
        stdio.call("genir_round", {"index": "photos", "query": "a bird", "feedback": "visual", "k": 2, "rounds": 3})
    )
    round0 = first["result"]
    session = round0["session_id"]
    assert (round0["status"], round0["round"], len(round0["retrieved"])) == ("awaiting_feedback", 0, 2)
    assert Path(round0["synthetic_image"]).is_file()  # visual feedback: what the system understood

    openai.push("/v1/chat/completions", 200, chat_completion(json.dumps({"query": CAPTIONS["snow"]})))
    second = structured(stdio.call("genir_feedback", {"session_id": session, "feedback": "in winter, no bird"}))
    round1 = second["result"]
    assert (round1["round"], round1["query"]) == (1, CAPTIONS["snow"])
    assert round1["retrieved"][0]["caption"] == CAPTIONS["snow"]

    shown = stdio.call("genir_round", {"session_id": session})  # the same round again, nothing recomputed
    assert structured(shown)["result"]["retrieved"] == round1["retrieved"]
    assert len(images_of(shown)) == 3  # the synthetic image and two results

    done = structured(stdio.call("genir_feedback", {"session_id": session, "feedback": "found: 1"}))["result"]
    assert (done["status"], done["found_id"]) == ("finished", round1["retrieved"][0]["id"])
    again = stdio.call("genir_feedback", {"session_id": session, "feedback": "bluer"})
    assert again.isError and "is finished (found)" in text_of(again)


# stdio: a client that goes away in the middle of a run.


def slow_images(server: FakeOpenAIServer, seconds: float) -> None:
    """Make the fake Images API take `seconds` per picture."""
    answer = server._answer

    def slowly(request: RecordedRequest) -> Fault:
        if request.path.startswith("/v1/images"):
            time.sleep(seconds)
        return answer(request)

    server._answer = slowly  # type: ignore[method-assign]


def test_a_client_that_disconnects_mid_run_leaves_a_cancelled_run_with_a_whole_record(
    stdio: Client, library: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    with FakeOpenAIServer() as slow:
        slow_images(slow, 1.5)
        for answer in (NOT_ALIGNED, CAPTIONS_ANSWER, ALIGNED):
            slow.push("/v1/chat/completions", 200, chat_completion(json.dumps(answer)))
        with connect(stdio_server(slow, "--root", str(library), "--runs", str(runs))) as client:
            started = structured(
                client.call("generate_with_references", {"prompt": "a jay", "index": "photos", "wait_seconds": 0.3})
            )
        # Leaving the block closed stdin: the server let the run go on for a second, then cancelled it
        # at the next step boundary and exited before the client had to kill it.

    run_dir = runs / started["run_id"]
    status = json.loads((run_dir / "status.json").read_text())
    record = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "cancelled" and "shut down" in status["error"]
    assert record["stop_reason"] == "cancelled" and record["error"] == status["error"]
    assert record["steps"] and record["draft_image"] and Path(record["draft_image"]).is_file()

    app = App(Settings(), roots=[library], runs_dir=runs)  # a later server reads the run from disk
    try:
        view = app.run_state(started["run_id"])
    finally:
        app.close()
    assert (view.status, view.error, view.result) == ("cancelled", status["error"], record)


# Streamable HTTP.


@contextmanager
def http_server(openai: FakeOpenAIServer, library: Path, bind: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`imageloop mcp --http BIND` as a subprocess; yields its URL on 127.0.0.1."""
    process = subprocess.Popen(
        [sys.executable, "-m", "imageloop.cli", "mcp", "--profile", "openai", "--root", str(library), "--http", bind],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "OPENAI_BASE_URL": openai.base_url,
             "IMAGELOOP_SESSIONS": os.environ["IMAGELOOP_SESSIONS"],
             "OPENAI_API_KEY": "sk-test", **(env or {})},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        seen = ""
        while not (match := re.search(r"serving http://\S+:(\d+)/mcp", seen)):
            line = process.stderr.readline()
            assert line, seen + "(the server exited)"
            seen += line
        yield f"http://127.0.0.1:{match.group(1)}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stderr.close()
        assert process.stdout is not None and process.stdout.read() == ""  # nothing but the protocol, ever
        process.stdout.close()


INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}  # fmt: skip
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def test_http_on_localhost_serves_the_tools_and_checks_host_and_origin(
    stdio: Client, openai: FakeOpenAIServer, library: Path
) -> None:
    with http_server(openai, library, "127.0.0.1:0") as url:
        with connect(lambda: streamable_http_client(url)) as client:
            assert client.tool_names() == TOOLS
            result = client.call("retrieve_images", {"index": "photos", "query": CAPTIONS["cat"], "k": 2})
            assert structured(result)["results"][0]["caption"] == CAPTIONS["cat"] and len(images_of(result)) == 2
            assert structured(result)["results"][0]["path"] == "imageloop://roots/0/photos%2Fcat.png"  # no path

        foreign_origin = httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": "http://evil.example"})
        foreign_host = httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Host": "evil.example"})
        other_local_site = httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": "http://localhost:3000"})
        own_origin = httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Origin": url.removesuffix("/mcp")})
    assert foreign_origin.status_code == 403 and foreign_host.status_code == 421
    assert other_local_site.status_code == 403  # a page on another localhost port is another site
    assert own_origin.status_code == 200


def test_http_beyond_localhost_requires_a_bearer_token(
    stdio: Client, openai: FakeOpenAIServer, library: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["mcp", "--profile", "openai", "--root", str(library), "--http", "0.0.0.0:0"]) == 2
    assert "--token or IMAGELOOP_MCP_TOKEN" in capsys.readouterr().err

    with http_server(openai, library, "0.0.0.0:0", env={"IMAGELOOP_MCP_TOKEN": TOKEN}) as url:
        missing = httpx.post(url, json=INITIALIZE, headers=MCP_HEADERS)
        wrong = httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": "Bearer guess"})
        auth = {"Authorization": f"Bearer {TOKEN}"}
        foreign = httpx.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **auth, "Origin": "http://evil.example"})
        with connect(lambda: streamable_http_client(url, http_client=httpx.AsyncClient(headers=auth))) as client:
            assert client.tool_names() == TOOLS
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert foreign.status_code == 403


# In process, over the SDK's memory transport, with scripted backends.


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """`fake:*` roles: an image-embedding hash embedder, a scripted VLM and a generator; builds are counted."""
    made: dict[str, Any] = {"builds": 0, "embedder": FakeHashEmbedder(embeds_images=True), "vlm": ScriptedVLM([])}
    made["generator"] = ScriptedGenerator()

    def factory(role: str) -> Callable[..., Any]:
        def build(model: str, *where: object) -> Any:
            made["builds"] += 1
            return made[role]

        return build

    for table, role in [
        (backends.VLM_PROVIDERS, "vlm"),
        (backends.GENERATOR_PROVIDERS, "generator"),
        (backends.EMBEDDER_PROVIDERS, "embedder"),
    ]:
        monkeypatch.setitem(table, "fake", factory(role))
    backends.clear_backends()
    yield made
    backends.clear_backends()


@contextmanager
def in_process(root: Path, remote: bool = False) -> Iterator[tuple[App, Callable[[], Any]]]:
    """An App confined to `root` with fake backends, its MCP server (as served over HTTP to a `remote` client), and
    a way to open client sessions to it."""
    settings = Settings.model_validate({"vlm": "fake:vlm", "generator": "fake:generator", "embedder": "fake:hash"})
    app = App(settings, roots=[root], runs_dir=root / ".runs", sessions_db=root / ".runs" / "sessions.sqlite")
    server = build_server(app, remote=remote)
    try:
        yield app, lambda: create_connected_server_and_client_session(server)
    finally:
        app.close()


@contextmanager
def memory_client(open_session: Callable[[], Any]) -> Iterator[Client]:
    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(open_session()) as s:
        yield Client(portal, s)


def photo_folder(root: Path, count: int, side: int = 40, noise: bool = False) -> Path:
    folder = root / "photos"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        if noise:
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        else:
            pixels = np.full((side, side, 3), (20 * i % 256, 255 - 20 * i % 256, 7 * i % 256), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:02d}.png")
        (folder / f"p{i:02d}.txt").write_text(f"photo number {i}")
    return folder


def test_an_image_query_finds_the_same_image_first(fakes: dict[str, Any], tmp_path: Path) -> None:
    folder = photo_folder(tmp_path, 6)
    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as client:
        assert structured(client.call("index_images", {"folder": "photos"}))["result"]["indexed"] == 6

        found = structured(client.call("retrieve_images", {"index": "photos", "image": "photos/p03.png", "k": 3}))

    assert Path(found["results"][0]["path"]) == folder / "p03.png"
    assert found["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_one_result_stays_under_the_size_cap_however_many_images(fakes: dict[str, Any], tmp_path: Path) -> None:
    photo_folder(tmp_path, 16, side=480, noise=True)  # 16 x ~0.7 MB of incompressible PNG
    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as client:
        client.call("index_images", {"folder": "photos"})

        result = client.call("retrieve_images", {"index": "photos", "query": "anything", "k": 16, "max_images": 16})

    thumbnails = images_of(result)
    assert len(thumbnails) == 16 and all(max(t.size) < 480 for t in thumbnails)
    assert image_bytes(result) <= RESULT_IMAGE_BUDGET < 2**20


def test_models_load_once_per_process_not_per_session(fakes: dict[str, Any], tmp_path: Path) -> None:
    photo_folder(tmp_path, 3)
    with in_process(tmp_path) as (_, open_session):
        with memory_client(open_session) as first:
            first.call("index_images", {"folder": "photos"})
            first.call("retrieve_images", {"index": "photos", "query": "a", "k": 1})
        with memory_client(open_session) as second:
            second.call("retrieve_images", {"index": "photos", "query": "b", "k": 1})
    assert fakes["builds"] == 1  # the embedder; the second session reused it


def test_concurrent_runs_on_one_generator_all_finish_with_their_own_records(
    fakes: dict[str, Any], tmp_path: Path
) -> None:
    photo_folder(tmp_path, 3)
    fakes["generator"] = ScriptedGenerator(latency_s=0.05)
    fakes["vlm"].answers.extend([ALIGNED] * 4)
    with in_process(tmp_path) as (app, open_session), memory_client(open_session) as client:
        client.call("index_images", {"folder": "photos"})
        calls = [
            client.call_soon("generate_with_references", {"prompt": f"picture {i}", "index": "photos"})
            for i in range(4)
        ]
        runs = [structured(call.result(timeout=30)) for call in calls]

    assert [run["status"] for run in runs] == ["done"] * 4
    assert len({run["run_id"] for run in runs}) == 4
    assert len(fakes["generator"].requests) == 4
    assert all((app.runs_dir / run["run_id"] / "run.json").is_file() for run in runs)


def test_a_run_longer_than_the_wait_returns_a_run_id_to_poll(fakes: dict[str, Any], tmp_path: Path) -> None:
    photo_folder(tmp_path, 3)
    fakes["generator"].latency_s = 0.3
    fakes["vlm"].answers.append(ALIGNED)
    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as client:
        client.call("index_images", {"folder": "photos"})

        started = structured(client.call("generate_with_references", {**DRAW, "wait_seconds": 0}))
        assert started["status"] in ("queued", "running") and started["run_id"] in started["poll"]

        finished = client.call("get_run", {"run_id": started["run_id"], "wait_seconds": 30})
    assert structured(finished)["status"] == "done" and structured(finished)["result"]["stop_reason"] == "aligned"
    assert len(images_of(finished)) == 2  # the final image and the draft
