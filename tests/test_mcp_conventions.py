"""The MCP server's manners: titled tools with described parameters and explicit hints, progress that counts
toward a total, run outputs as resources, and no traceback when a client simply goes away."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp.types import BlobResourceContents, CallToolResult, TextContent
from PIL import Image
from pydantic import AnyUrl

from imageloop import __version__
from imageloop.app.jobs import Note
from imageloop.mcp.server import ProgressClock, build_server
from imageloop.progress import report_progress
from imageloop.protocols import GenerationRequest, GenerationResult
from imageloop.tools.indexing.image_index import open_index
from tests.fake_openai_server import FakeOpenAIServer
from tests.fakes import ScriptedGenerator
from tests.test_index_sources import write_shards
from tests.test_mcp_server import (
    ALIGNED,
    REPO,
    Client,
    connect,
    fakes,
    in_process,
    library,
    memory_client,
    photo_folder,
    streamable_http_client,
    structured,
    text_of,
)

__all__ = ["fakes", "library"]  # fixtures shared with the server's own tests

DENOISING_STEPS = 3


@dataclass
class FakeDenoisingGenerator(ScriptedGenerator):
    """A scripted generator that reports its denoising steps, as the diffusers backends do."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for step in range(1, DENOISING_STEPS + 1):
            report_progress("denoising", step, DENOISING_STEPS)
        return super().generate(request)


@dataclass
class Tracked:
    """The progress notifications one call received."""

    values: list[tuple[float, float | None, str]]


def call_tracking(client: Client, name: str, arguments: dict[str, Any]) -> tuple[CallToolResult, Tracked]:
    tracked = Tracked([])

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        tracked.values.append((done, total, message or ""))

    async def call() -> CallToolResult:
        return await client.session.call_tool(name, arguments, progress_callback=on_progress)

    return client.portal.call(call), tracked


@pytest.fixture
def client(fakes: dict[str, Any], tmp_path: Path) -> Iterator[Client]:
    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as connected:
        yield connected


def tools(client: Client) -> list[Any]:
    return list(client.portal.call(client.session.list_tools).tools)


def test_every_tool_has_a_title_and_every_parameter_a_description(client: Client) -> None:
    for tool in tools(client):
        assert tool.title and tool.annotations is not None and tool.annotations.title == tool.title
        undescribed = [name for name, schema in tool.inputSchema["properties"].items() if not schema.get("description")]
        assert undescribed == [], tool.name


def test_every_tool_description_is_one_paragraph_without_docstring_indentation(client: Client) -> None:
    for tool in tools(client):
        assert tool.description and "\n" not in tool.description and "  " not in tool.description, tool.name


def test_server_info_names_imageloops_version_not_the_sdks(tmp_path: Path) -> None:
    with in_process(tmp_path) as (app, _):
        options = build_server(app)._mcp_server.create_initialization_options()  # what initialize answers
    assert (options.server_name, options.server_version) == ("imageloop", __version__)


def test_genir_rounds_schema_says_index_and_query_or_a_session_id(client: Client) -> None:
    [genir_round] = [tool for tool in tools(client) if tool.name == "genir_round"]
    properties = genir_round.inputSchema["properties"]
    assert "give with query" in properties["index"]["description"]
    assert "instead of index and query" in properties["session_id"]["description"]
    assert "not both" in str(genir_round.description)


def test_every_tool_states_each_hint_and_none_destroys_anything(client: Client) -> None:
    for tool in tools(client):
        hints = tool.annotations
        assert hints is not None
        assert None not in (hints.readOnlyHint, hints.destructiveHint, hints.idempotentHint, hints.openWorldHint)
        assert hints.destructiveHint is False
    by_name = {tool.name: tool.annotations for tool in tools(client)}
    assert by_name["retrieve_images"].readOnlyHint and by_name["get_run"].readOnlyHint
    assert not by_name["generate_with_references"].readOnlyHint and by_name["index_images"].idempotentHint


def test_indexing_reports_images_handled_out_of_the_folders_total(client: Client, tmp_path: Path) -> None:
    photo_folder(tmp_path, 20)
    result, tracked = call_tracking(client, "index_images", {"folder": "photos", "batch_size": 8})
    assert structured(result)["result"]["indexed"] == 20
    values = [value for value, _, _ in tracked.values]
    assert values == sorted(set(values)) and values[-1] == 20
    assert {total for _, total, _ in tracked.values} == {20}
    assert "8/20 images in photos handled" in [message for _, _, message in tracked.values]


def test_indexing_records_the_search_engine_asked_for_and_refuses_a_thread_count_past_its_bound(
    client: Client, tmp_path: Path
) -> None:
    photo_folder(tmp_path, 3)

    done = structured(client.call("index_images", {"folder": "photos", "ann": "quantized", "threads": 1}))
    refused = client.call("index_images", {"folder": "photos", "threads": 0})

    assert done["status"] == "done"
    index = open_index(tmp_path / "photos")
    assert index.store.get_meta()["ann_engine"] == "quantized"
    index.close()
    assert refused.isError and "threads" in text_of(refused)


def test_a_run_forwards_each_denoising_step_with_a_total_and_never_goes_back(
    fakes: dict[str, Any], tmp_path: Path
) -> None:
    photo_folder(tmp_path, 3)
    fakes["generator"] = FakeDenoisingGenerator()
    fakes["vlm"].answers.append(ALIGNED)
    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as client:
        client.call("index_images", {"folder": "photos"})
        result, tracked = call_tracking(client, "generate_with_references", {"prompt": "a jay", "index": "photos"})
    assert structured(result)["status"] == "done"
    values = [value for value, _, _ in tracked.values]
    assert all(later > earlier for earlier, later in itertools.pairwise(values))
    denoising = [(value, total, message) for value, total, message in tracked.values if "denoising" in message]
    assert [message for _, _, message in denoising] == [f"[generate_draft] denoising {i}/3" for i in (1, 2, 3)]
    [(first, total, _), *_, (last, last_total, _)] = denoising
    assert total == last_total == last and last - first == DENOISING_STEPS - 1


def test_a_finished_run_names_its_images_as_resources_a_client_reads_at_full_size(
    fakes: dict[str, Any], tmp_path: Path
) -> None:
    photo_folder(tmp_path, 3)
    fakes["vlm"].answers.append(ALIGNED)
    with in_process(tmp_path) as (app, open_session), memory_client(open_session) as client:
        client.call("index_images", {"folder": "photos"})
        result = client.call("generate_with_references", {"prompt": "a jay", "index": "photos"})
        run_id = structured(result)["run_id"]
        labels = " ".join(block.text for block in result.content if isinstance(block, TextContent))
        uri = f"imageloop://runs/{run_id}/final.png"
        assert f"(full size: {uri})" in labels
        read = client.portal.call(client.session.read_resource, AnyUrl(uri))
        final = (app.runs_dir / run_id / "final.png").read_bytes()
    [contents] = read.contents
    assert isinstance(contents, BlobResourceContents) and contents.mimeType == "image/png"
    assert base64.b64decode(contents.blob) == final


@pytest.mark.parametrize(
    "uri",
    [
        "imageloop://runs/../photos/p00.png",
        "imageloop://runs/abc/checkpoints.sqlite",
        "imageloop://runs/abc/none.png",
        "imageloop://roots/0/photos%2Fnotes.txt",
        "imageloop://roots/0/..%2F..%2Fsecret.png",
        "imageloop://roots/1/p00.png",
    ],
)
def test_resources_serve_only_run_files_and_images_under_the_roots(client: Client, tmp_path: Path, uri: str) -> None:
    photo_folder(tmp_path, 1)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path.parent / "secret.png").write_bytes(b"png")
    (tmp_path / ".runs" / "abc").mkdir(parents=True)
    (tmp_path / ".runs" / "abc" / "checkpoints.sqlite").write_text("SQLite format 3")
    with pytest.raises(Exception, match=r"no such run file|no such image"):
        client.portal.call(client.session.read_resource, AnyUrl(uri))


def test_an_image_inside_an_indexed_shard_under_a_root_reads_as_a_resource(client: Client, tmp_path: Path) -> None:
    pictures = write_shards(tmp_path / "laion", shards=1, per_shard=1)
    read = client.portal.call(
        client.session.read_resource, AnyUrl("imageloop://roots/0/laion%2F00000.tar%23000000000.jpg")
    )
    [contents] = read.contents
    assert isinstance(contents, BlobResourceContents) and contents.mimeType == "image/png"
    shown = Image.open(io.BytesIO(base64.b64decode(contents.blob)))
    assert shown.size == Image.open(io.BytesIO(pictures["00000.tar#000000000.jpg"])).size


def test_over_http_an_answer_names_every_file_as_a_resource_the_client_reads(
    fakes: dict[str, Any], tmp_path: Path
) -> None:
    photo_folder(tmp_path, 3)
    fakes["vlm"].answers.append(ALIGNED)
    with in_process(tmp_path, remote=True) as (_, open_session), memory_client(open_session) as client:
        client.call("index_images", {"folder": "photos"})
        found = client.call("retrieve_images", {"index": "photos", "query": "a jay", "k": 2})
        run = client.call("generate_with_references", {"prompt": "a jay", "index": "photos"})
        refused = client.call("retrieve_images", {"index": "nowhere", "query": "a jay"})
        said = [text_of(result) + json.dumps(result.structuredContent) for result in (found, run, refused)]
        first = structured(found)["results"][0]["path"]
        record = structured(run)["result"]
        read = [client.portal.call(client.session.read_resource, AnyUrl(uri)) for uri in (first, record["final_image"])]
        report = client.portal.call(
            client.session.read_resource, AnyUrl(record["final_image"].replace("final.png", "report.html"))
        )
    assert not any(str(tmp_path) in text for text in said) and refused.isError
    assert first.startswith("imageloop://roots/0/photos%2Fp0") and record["final_image"].startswith("imageloop://runs/")
    pictures = [Image.open(io.BytesIO(base64.b64decode(r.contents[0].blob))) for r in read]  # type: ignore[union-attr]
    assert [picture.size for picture in pictures] == [(40, 40), (16, 16)]
    assert report.contents[0].mimeType == "text/html" and "a jay" in report.contents[0].text  # type: ignore[union-attr]


def test_progress_values_only_grow_and_count_toward_the_current_tasks_total() -> None:
    clock = ProgressClock()
    notes = [Note("a step"), Note("d", 1, 2), Note("d", 2, 2), Note("next step"), Note("d", 1, 2), Note("d", 2, 2)]
    assert [clock.tick(note) for note in notes] == [(1, None), (2, 3), (3, 3), (4, None), (5, 6), (6, 6)]
    counted = ProgressClock()
    assert [counted.tick(Note("i", done, 20)) for done in (0, 8, 16, 20, 20)] == [
        (0, 20), (8, 20), (16, 20), (20, 20), None,
    ]  # fmt: skip


def test_the_http_server_logs_nothing_when_clients_come_and_go(library: Path) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "IMAGELOOP_SESSIONS": os.environ["IMAGELOOP_SESSIONS"]}
    with FakeOpenAIServer() as openai:
        env |= {"OPENAI_BASE_URL": openai.base_url, "OPENAI_API_KEY": "sk-test"}
        command = ["-m", "imageloop", "mcp", "--profile", "openai", "--root", str(library), "--http", "127.0.0.1:0"]
        process = subprocess.Popen(
            [sys.executable, *command], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stderr is not None
        try:
            announced = process.stderr.readline()
            match = re.search(r"serving (http://\S+/mcp)", announced)
            assert match, announced
            for _ in range(2):  # each client opens its session, calls, and closes it: a normal end
                with connect(lambda: streamable_http_client(match.group(1))) as client:
                    assert structured(client.call("index_images", {"folder": "photos"}))["status"] == "done"
            time.sleep(1.0)  # what a disconnect would log is logged by now
        finally:
            process.terminate()
            process.wait(timeout=20)
        logged = process.stderr.read()
    assert "Traceback" not in logged and "ERROR" not in logged, logged
