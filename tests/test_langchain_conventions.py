"""The LangChain tools for vision models and long runs: pictures as standard image content blocks, and a
generation that hands back its run id to poll instead of blocking the agent."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage, convert_to_openai_messages
from langchain_core.tools import StructuredTool
from PIL import Image

from imageloop.app import App
from imageloop.langchain_tools import imageloop_tools
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FakeBackends, captioned_folder
from tests.test_search_session import fakes

ALIGNED = {"aligned": True, "missing_concepts": []}
__all__ = ["fakes"]  # the scripted backends, a fixture shared with the session tests


@pytest.fixture
def app(fakes: FakeBackends, tmp_path: Path) -> Iterator[App]:
    photos = captioned_folder(tmp_path / "photos")
    index_folder(photos, fakes.embedder, None, progress=False)
    app = App(fakes.settings, roots=[tmp_path], runs_dir=tmp_path / "runs")
    yield app
    app.close()


def invoke(tools: list[StructuredTool], name: str, **args: Any) -> ToolMessage:
    tool = next(t for t in tools if t.name == name)
    message = tool.invoke({"type": "tool_call", "id": "1", "name": name, "args": args})
    assert isinstance(message, ToolMessage) and message.status == "success", message.content
    return message


def pictures(message: ToolMessage) -> list[Image.Image]:
    blocks = message.content if isinstance(message.content, list) else []
    images = [b for b in blocks if isinstance(b, dict) and b.get("type") == "image"]
    assert all(b["mime_type"] == "image/png" for b in images)
    return [Image.open(io.BytesIO(base64.b64decode(b["base64"]))) for b in images]


def test_with_images_search_results_come_back_as_image_blocks_after_the_text(app: App) -> None:
    tools = imageloop_tools(app=app, images=True)
    message = invoke(tools, "retrieve_images", index="photos", query="a blue jay", k=2)
    assert isinstance(message.content, list) and message.content[0]["type"] == "text"
    assert "2 image(s) for 'a blue jay'" in message.content[0]["text"]
    assert [image.size for image in pictures(message)] == [(24, 24), (24, 24)]


def test_a_chat_model_integration_reads_the_blocks_as_images(app: App) -> None:
    message = invoke(imageloop_tools(app=app, images=True), "retrieve_images", index="photos", query="a jay", k=1)
    [converted] = convert_to_openai_messages([message])
    parts = converted["content"]
    assert any(part.get("type") == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
               for part in parts)  # fmt: skip


def test_without_images_answers_stay_short_text(app: App) -> None:
    message = invoke(imageloop_tools(app=app), "retrieve_images", index="photos", query="a blue jay", k=2)
    assert isinstance(message.content, str)


def test_with_images_a_finished_run_shows_its_final_image_and_draft(app: App, fakes: FakeBackends) -> None:
    fakes.vlm.answers.append(ALIGNED)
    tools = imageloop_tools(app=app, images=True)
    message = invoke(tools, "generate_with_references", prompt="a blue jay", index="photos")
    assert message.artifact["status"] == "done" and len(pictures(message)) == 2
    labels = [b["text"] for b in message.content if isinstance(b, dict) and b["type"] == "text"]
    assert [label.split(":")[0] for label in labels[1:]] == ["final_image", "draft_image"]  # as MCP labels them


def test_a_long_run_answers_with_its_id_and_get_run_polls_it_to_the_end(app: App, fakes: FakeBackends) -> None:
    fakes.generator.latency_s = 0.5
    fakes.vlm.answers.append(ALIGNED)
    tools = imageloop_tools(app=app)
    started = invoke(tools, "generate_with_references", prompt="a blue jay", index="photos", wait_seconds=0)
    run_id = started.artifact["run_id"]
    assert started.artifact["status"] in ("queued", "running")
    assert f"Call get_run with run_id '{run_id}'" in str(started.content)

    finished = invoke(tools, "get_run", run_id=run_id, wait_seconds=30)
    assert finished.artifact["status"] == "done" and finished.artifact["result"]["stop_reason"] == "aligned"
    assert str(finished.content).startswith(f"Run {run_id}: aligned with the prompt")


def test_a_run_from_another_process_is_read_from_its_folder(app: App, fakes: FakeBackends, tmp_path: Path) -> None:
    fakes.vlm.answers.append(ALIGNED)
    record = app.generate("a blue jay", "photos")  # e.g. the command line's run, never a background job here
    answer = invoke(imageloop_tools(app=app), "get_run", run_id=record["run_id"])
    assert answer.artifact["result"]["run_id"] == record["run_id"] and answer.artifact["status"] == "done"
