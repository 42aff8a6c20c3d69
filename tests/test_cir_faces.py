"""Composed retrieval on every face: `imageloop cir` (in process and as a subprocess), the MCP and LangChain
`compose_retrieve` tools, and the `cir` graph LangGraph Server loads; all through `App.compose_retrieve`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

import imageloop.backends as backends
from imageloop.app import App
from imageloop.app.deployment import close_deployed_app
from imageloop.cli import main
from imageloop.config import Settings
from tests.cir_world import FakeColourEmbedder, ScriptedColourGenerator, colour_folder
from tests.fake_openai_server import FakeOpenAIServer, chat_completion
from tests.fake_providers import FakeBackends, fake_backends

REPO = Path(__file__).resolve().parents[1]
ROLES = ["--vlm", "fake:vlm", "--embedder", "colour:fake", "--generator", "colour:fake"]
SETTINGS = {"vlm": "fake:vlm", "embedder": "colour:fake", "generator": "colour:fake"}
RED = "Edited Description: a red square"


@dataclass
class Colours:
    """The scripted backends and an indexed colour folder under `root`."""

    fakes: FakeBackends
    embedder: FakeColourEmbedder
    generator: ScriptedColourGenerator
    root: Path
    gallery: Path
    paths: dict[str, Path]


@pytest.fixture
def colours(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Colours]:
    """`colour:fake` embeds by colour and draws the colour a prompt names; `fake:vlm` is scripted."""
    embedder, generator = FakeColourEmbedder("colour:fake"), ScriptedColourGenerator()
    with fake_backends(monkeypatch) as fakes:
        monkeypatch.setitem(backends.EMBEDDER_PROVIDERS, "colour", lambda *args: embedder)
        monkeypatch.setitem(backends.GENERATOR_PROVIDERS, "colour", lambda *args: generator)
        paths = colour_folder(tmp_path / "gallery")
        assert main(["index", str(tmp_path / "gallery"), "--embedder", "colour:fake"]) == 0
        yield Colours(fakes, embedder, generator, tmp_path, tmp_path / "gallery", paths)


def last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return result


# The command line.


def test_cir_prints_the_edited_description_and_ranked_results_last_on_stdout(
    colours: Colours, capsys: pytest.CaptureFixture[str]
) -> None:
    colours.fakes.vlm.answers.append(RED)
    code = main(["cir", "--index", str(colours.gallery), "--reference", str(colours.paths["blue"]),
                 "--change", "make it red", "--k", "3", "--json", *ROLES])  # fmt: skip
    assert code == 0
    answer = last_json(capsys)
    assert set(answer) == {"edited_description", "results"}
    assert answer["edited_description"] == "a red square"
    assert [set(r) for r in answer["results"]] == [{"position", "id", "path", "caption", "score"}] * 3
    assert Path(answer["results"][0]["path"]) == colours.paths["red"]


def test_cir_with_a_proxy_and_verification_shows_each_step_on_stderr(
    colours: Colours, capsys: pytest.CaptureFixture[str]
) -> None:
    colours.fakes.vlm.answers += [RED, {"matches": True, "description": "a red square"}]
    code = main(["cir", "--index", str(colours.gallery), "--reference", str(colours.paths["blue"]),
                 "--change", "make it red", "--proxy", "--verify", "2", "--fusion-lambda", "0.3", *ROLES])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    for node in ("describe_reference", "compose", "generate_proxy", "retrieve", "verify", "finish"):
        assert f"[{node}]" in err
    assert "λ=0.3" in err and "stop: verified" in err
    assert [r.prompt for r in colours.generator.requests] == ["a red square"]


def test_cir_with_a_composed_query_model_loads_it_and_asks_no_language_model(
    colours: Colours, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    from imageloop.training.combiner import Combiner, CombinerConfig, save_cir_model

    torch.manual_seed(0)
    model = colours.root / "model"
    save_cir_model(model, Combiner(CombinerConfig.for_features(colours.embedder.dim)), "colour:fake", {})
    code = main(["cir", "--index", str(colours.gallery), "--reference", str(colours.paths["blue"]), "--change",
                 "make it red", "--cir-model", str(model), "--json", "--embedder", "colour:fake"])  # fmt: skip
    assert code == 0
    answer = last_json(capsys)
    assert answer["edited_description"] is None and len(answer["results"]) == 5
    assert colours.fakes.vlm.calls == []


def test_cir_refuses_a_model_trained_on_another_embedder(colours: Colours, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    from imageloop.training.combiner import Combiner, CombinerConfig, save_cir_model

    save_cir_model(colours.root / "model", Combiner(CombinerConfig.for_features(7)), "tiny:clip", {})
    code = main(["cir", "--index", str(colours.gallery), "--reference", str(colours.paths["blue"]), "--change",
                 "red", "--cir-model", str(colours.root / "model"), "--embedder", "colour:fake"])  # fmt: skip
    assert code == 2 and "trained on features of tiny:clip" in capsys.readouterr().err


def test_cir_keeps_stdout_for_the_json(
    openai_server: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    paths = colour_folder(tmp_path / "gallery")
    assert main(["index", str(tmp_path / "gallery"), "--profile", "openai"]) == 0
    openai_server.push("/v1/chat/completions", 200, chat_completion(RED))
    capsys.readouterr()
    code = main(["cir", "--profile", "openai", "--index", str(tmp_path / "gallery"), "--reference", str(paths["blue"]),
                 "--change", "make it red", "--k", "2", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    [line] = out.strip().splitlines()
    answer = json.loads(line)
    assert answer["edited_description"] == "a red square" and len(answer["results"]) == 2
    embedded = [t for r in openai_server.requests_to("/v1/embeddings") for t in r.json["input"]]
    assert embedded[-1] == "a red square"


# MCP and LangChain.


def colour_app(colours: Colours) -> App:
    root = colours.root
    return App(Settings.model_validate(SETTINGS), roots=[root], runs_dir=root / ".runs",
               sessions_db=root / ".runs" / "s.sqlite")  # fmt: skip


def test_the_mcp_tool_answers_the_description_and_the_results_with_thumbnails(colours: Colours) -> None:
    from imageloop.mcp import build_server
    from tests.test_mcp_server import images_of, memory_client, structured

    colours.fakes.vlm.answers.append(RED)
    app = colour_app(colours)
    try:
        from mcp.shared.memory import create_connected_server_and_client_session

        server = build_server(app)
        with memory_client(lambda: create_connected_server_and_client_session(server)) as client:
            result = client.call(
                "compose_retrieve",
                {"index": "gallery", "reference": "gallery/blue.png", "change": "make it red", "k": 2},
            )
            refused = client.call(
                "compose_retrieve", {"index": "gallery", "reference": "/etc/hostname", "change": "red"}
            )
    finally:
        app.close()
    view = structured(result)
    assert view["status"] == "done" and view["result"]["edited_description"] == "a red square"
    assert Path(view["result"]["results"][0]["path"]).name == "red.png"
    assert len(images_of(result)) == 2
    assert refused.isError and "outside" in refused.content[0].text  # type: ignore[union-attr]


def test_the_langchain_tool_answers_text_for_the_model_and_the_results_as_artifact(colours: Colours) -> None:
    from imageloop.langchain_tools import imageloop_tools

    colours.fakes.vlm.answers.append(RED)
    app = colour_app(colours)
    try:
        [tool] = [t for t in imageloop_tools(app=app) if t.name == "compose_retrieve"]
        message = tool.invoke(
            {"type": "tool_call", "id": "1", "name": tool.name,
             "args": {"index": "gallery", "reference": "gallery/blue.png", "change": "make it red", "k": 3}}
        )  # fmt: skip
    finally:
        app.close()
    assert "'a red square'" in message.content and "1. red.png" in message.content
    assert Path(message.artifact["result"]["results"][0]["path"]).name == "red.png"
    assert message.artifact["result"]["edited_description"] == "a red square"


# LangGraph Server.


@pytest.fixture
def deployed(colours: Colours, monkeypatch: pytest.MonkeyPatch) -> Iterator[Colours]:
    monkeypatch.delenv("IMAGELOOP_PROFILE", raising=False)
    for role, spec in SETTINGS.items():
        monkeypatch.setenv(f"IMAGELOOP_{role.upper()}", spec)
    monkeypatch.setenv("IMAGELOOP_INDEX", str(colours.gallery))
    monkeypatch.setenv("IMAGELOOP_ROOTS", str(colours.root))
    monkeypatch.setenv("IMAGELOOP_RUNS", str(colours.root / "runs"))
    close_deployed_app()
    yield colours
    close_deployed_app()


def test_the_server_graph_compiles_without_a_checkpointer_and_runs_on_the_deployments_backends(
    deployed: Colours,
) -> None:
    from tests.test_langgraph_server import load_graph

    graph = load_graph("cir")
    assert graph.checkpointer is None
    mermaid = graph.get_graph().draw_mermaid()
    for node in ("prepare", "describe_reference", "compose", "generate_proxy", "retrieve", "verify"):
        assert f"\t{node}({node})" in mermaid
    served = graph.copy(update={"checkpointer": InMemorySaver()})
    deployed.fakes.vlm.answers.append(RED)
    state = served.invoke(
        {"reference": str(deployed.paths["blue"]), "change": "make it red"},
        {"configurable": {"thread_id": "t"}},
        context={"k": 2, "proxy": True, "artifacts_dir": str(deployed.root / "proxies")},
    )
    assert state["edited_description"] == "a red square"
    assert Path(state["results"][0]["path"]).name == "red.png"
    assert state["proxy_image"].startswith("/imageloop/roots/0/proxies/")  # named by its address on the server's route
    assert (deployed.root / "proxies" / Path(state["proxy_image"]).name).is_file()


def test_the_reference_is_left_out_by_content_wherever_its_file_lies(colours: Colours) -> None:
    copy = colours.root / "query.png"
    copy.write_bytes(colours.paths["green"].read_bytes())
    copy.with_suffix(".txt").write_text("a green square")
    colours.fakes.vlm.answers.append("Edited Description: a green square")
    app = colour_app(colours)
    try:
        found = app.compose_retrieve("gallery", "query.png", "the same", knobs={"k": 5})
    finally:
        app.close()
    assert "green.png" not in [Path(r.path).name for r in found.results]
