"""ImageRAG's paper knobs on every face that runs the loop: the CLI (options and the preset), LangChain and MCP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.shared.memory import create_connected_server_and_client_session
from mcp.types import CallToolResult

from imageloop.app import App
from imageloop.cli import main
from imageloop.langchain_tools import imageloop_tools
from imageloop.mcp import build_server
from imageloop.presets import IMAGERAG_PAPER
from imageloop.prompts import PAPER_CRITIC_DECISION
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import captioned_folder, fake_backends
from tests.fakes import FakeHashEmbedder

PROMPT = "a Cyanocitta cristata perched on a snowy branch"
MODELS = ["--vlm", "fake:vlm", "--generator", "fake:generator", "--embedder", "fake:hash"]
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = captioned_folder(tmp_path / "photos")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    return folder


def test_the_imagerag_paper_preset_runs_the_loop_as_released(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with fake_backends(monkeypatch, ["yes"]) as fakes:
        code = main(
            ["generate", PROMPT, "--index", str(photos), "--out", str(out), "--profile", "imagerag-paper", *MODELS]
        )
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    recorded = {knob: paper.value for knob, paper in IMAGERAG_PAPER.items() if knob in record["settings"]}
    assert {knob: record["settings"][knob] for knob in recorded} == recorded
    assert fakes.vlm.calls[0][0][0].text == PAPER_CRITIC_DECISION.format(prompt=PROMPT)
    assert record["stop_reason"] == "aligned"


def test_the_loop_knobs_are_command_line_options(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    options = ["--retrieval-query", "concept", "--final-image-policy", "last", "--references-policy", "accumulate",
               "--plan-scope", "every", "--rephrase-only"]  # fmt: skip
    with fake_backends(monkeypatch, [NOT_ALIGNED, "a blue jay on a snowy branch", NOT_ALIGNED]) as fakes:
        assert main(["generate", PROMPT, "--index", str(photos), "--out", str(out), *options, *MODELS]) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert (settings["retrieval_query"], settings["final_image_policy"]) == ("concept", "last")
    assert (settings["references_policy"], settings["plan_scope"], settings["rephrase_only"]) == (
        "accumulate", "every", True,
    )  # fmt: skip
    # Rephrase only: the VLM's rephrased prompt is drawn and no reference reaches the generator.
    assert (fakes.generator.requests[-1].prompt, fakes.generator.requests[-1].references) == (
        "a blue jay on a snowy branch", (),
    )  # fmt: skip


def test_the_langchain_tool_takes_the_critic_and_policies(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_backends(monkeypatch, ["yes"]) as fakes:
        app = App(fakes.settings, runs_dir=tmp_path / "runs")
        tool = next(t for t in imageloop_tools(app=app) if t.name == "generate_with_references")
        tool.invoke({"prompt": PROMPT, "index": str(photos), "critic": "paper", "final_image_policy": "last"})
        app.close()
    (record_file,) = (tmp_path / "runs").glob("*/run.json")
    settings = json.loads(record_file.read_text())["settings"]
    assert (settings["critic"], settings["final_image_policy"]) == ("paper", "last")
    assert fakes.vlm.calls[0][0][0].text == PAPER_CRITIC_DECISION.format(prompt=PROMPT)


def test_the_mcp_tool_takes_the_critic_and_policies(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = photos.parent

    async def generate(app: App, arguments: dict[str, Any]) -> CallToolResult:
        async with create_connected_server_and_client_session(build_server(app)) as client:
            return await client.call_tool("generate_with_references", arguments)

    with fake_backends(monkeypatch, [NOT_ALIGNED, CAPTIONS, NOT_ALIGNED]) as fakes:
        app = App(fakes.settings, roots=[root], runs_dir=root / ".runs", sessions_db=root / ".runs" / "s.sqlite")
        arguments = {
            "prompt": PROMPT, "index": "photos", "retrieval_query": "prompt", "references_policy": "accumulate",
            "final_image_policy": "last", "critic": "single_call",
        }  # fmt: skip
        result = anyio.run(generate, app, arguments)
        app.close()
    assert not result.isError
    (record_file,) = (root / ".runs").glob("*/run.json")
    record = json.loads(record_file.read_text())
    assert (record["settings"]["retrieval_query"], record["settings"]["references_policy"]) == ("prompt", "accumulate")
    assert record["retrieval_captions"] == [{"concept": PROMPT, "caption": PROMPT}]  # searched with the raw prompt
