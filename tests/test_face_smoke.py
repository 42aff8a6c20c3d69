"""One real process per face: the contract suite drives the faces in process; these start them as users do.

The command line as the installed `imageloop` script (index, then query with --json on stdout), and the
MCP server as `imageloop mcp` behind the official client over stdio (its tools listed, one called).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import TextContent

from tests.fake_openai_server import FakeOpenAIServer
from tests.test_faces import CAPTIONS, MODELS

REPO = Path(__file__).resolve().parents[1]


def environment(openai: FakeOpenAIServer, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ, **MODELS, "OPENAI_BASE_URL": openai.base_url, "OPENAI_API_KEY": "sk-test",
        "IMAGELOOP_SESSIONS": str(tmp_path / "sessions.sqlite"), "PYTHONPATH": str(REPO),
    }  # fmt: skip


def photos(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "library" / "photos"
    folder.mkdir(parents=True)
    for shade, (name, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (32, 32), (70 * shade + 20, 90, 90)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder


def test_the_command_line_indexes_and_answers_json_on_stdout(openai_server: FakeOpenAIServer, tmp_path: Path) -> None:
    folder, env = photos(tmp_path), environment(openai_server, tmp_path)

    def imageloop(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "imageloop", *args, "--json"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=True)

    assert json.loads(imageloop("index", str(folder)).stdout.splitlines()[-1])["indexed"] == 3
    found = json.loads(imageloop("query", str(folder), CAPTIONS["jay"], "--k", "1").stdout.splitlines()[-1])
    assert Path(found["results"][0]["path"]).name == "jay.png"


def test_the_mcp_server_serves_its_tools_over_stdio(openai_server: FakeOpenAIServer, tmp_path: Path) -> None:
    folder = photos(tmp_path)
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "imageloop", "mcp", "--root", str(folder.parent)],
        env=environment(openai_server, tmp_path), cwd=folder.parent,
    )  # fmt: skip

    async def session() -> tuple[set[str], dict[str, object]]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            tools = {tool.name for tool in (await client.list_tools()).tools}
            indexed = await client.call_tool("index_images", {"folder": "photos", "wait_seconds": 50})
            text = next(block.text for block in indexed.content if isinstance(block, TextContent))
            return tools, json.loads(text)

    tools, indexed = anyio.run(session)
    assert {"retrieve_images", "generate_with_references", "genir_round", "rage_retrieve"} <= tools
    assert indexed["status"] == "done" and indexed["result"]["indexed"] == 3  # type: ignore[index]
