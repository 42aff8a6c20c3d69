"""The README's agent recipe, run: langchain-mcp-adapters with one persistent `client.session()`, so one
server process serves the whole conversation and a background run outlives the call that started it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from tests.fake_openai_server import FakeOpenAIServer, chat_completion

adapters = pytest.importorskip("langchain_mcp_adapters.client", reason="pip install 'imageloop[agent]'")
from langchain_mcp_adapters.tools import load_mcp_tools  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALIGNED = {"aligned": True, "missing_concepts": []}


def result_json(content: Any) -> dict[str, Any]:
    """The JSON text an imageloop tool answers first (the adapters hand back content blocks)."""
    first = content[0]["text"] if isinstance(content, list) else content
    parsed: dict[str, Any] = json.loads(first)
    return parsed


def test_one_session_serves_every_call_and_a_run_started_in_one_call_finishes_for_the_next(
    openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32), (40, 90, 200)).save(photos / "jay.png")
    (photos / "jay.txt").write_text("a blue jay on a branch")
    openai_server.push("/v1/chat/completions", 200, chat_completion(json.dumps(ALIGNED)))
    client = adapters.MultiServerMCPClient({
        "imageloop": {
            "transport": "stdio",
            "command": sys.executable,
            "args": ["-m", "imageloop", "mcp", "--profile", "openai", "--root", str(tmp_path)],
            "env": {"OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test", "PYTHONPATH": str(REPO),
                    "IMAGELOOP_SESSIONS": os.environ["IMAGELOOP_SESSIONS"], "PATH": os.environ["PATH"]},
        }
    })  # fmt: skip

    async def conversation() -> tuple[dict[str, Any], dict[str, Any]]:
        async with client.session("imageloop") as session:
            tools = {tool.name: tool for tool in await load_mcp_tools(session)}
            await tools["index_images"].ainvoke({"folder": "photos"})
            started = result_json(
                await tools["generate_with_references"].ainvoke(
                    {"prompt": "a blue jay", "index": "photos", "wait_seconds": 0}
                )
            )
            finished = result_json(await tools["get_run"].ainvoke({"run_id": started["run_id"], "wait_seconds": 30}))
            return started, finished

    started, finished = anyio.run(conversation)
    assert started["status"] in ("queued", "running", "done")
    assert finished["status"] == "done" and finished["result"]["stop_reason"] == "aligned"
