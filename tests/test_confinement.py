"""One confinement rule on every face: each path input refuses a path outside the roots, a path written with
`..` and a symlink out of a root (the CLI with its opt-in `--root`, MCP, the LangChain tools, every graph
`langgraph.json` exports, and the browser UI, confined to its `--index` and `--root`s); and a sidecar caption
or metadata file is read under its image's confinement on every face that reads one.

Every face runs in process on the scripted `fake:` backends. The world: `library/` is the root (its
`photos/` indexed), `outside/` lies beside it (its own indexed `photos/`, a run, a secret), and
`library/escape` is a symlink to `outside/`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from PIL import Image

from imageloop.app import App
from imageloop.app.deployment import close_deployed_app
from imageloop.cli import main
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FAKE_SETTINGS, FakeBackends, captioned_folder, fake_backends

FAKE = [option for role, model in FAKE_SETTINGS.items() for option in (f"--{role}", model)]
MODELS = {"report": [], "query": ["--embedder", FAKE_SETTINGS["embedder"]]}
"""The model options of commands that take fewer than all (`query` runs the embedder alone), else FAKE."""
REFUSED = r"outside the folders|'\.\.' is not allowed"
SECRET = "root:x:0:0:SECRET"
VARIANTS = ["outside", "dotdot", "symlink"]


@dataclass
class World:
    """The root, the folder beside it, and the scripted backends."""

    library: Path
    outside: Path
    fakes: FakeBackends

    def variant(self, name: str, relative: str) -> str:
        """`outside/relative` reached directly, through `..`, or through the symlink in the root."""
        if name == "outside":
            return str(self.outside / relative)
        if name == "dotdot":
            return str(self.library / ".." / self.outside.name / relative)
        return str(self.library / "escape" / relative)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[World]:
    with fake_backends(monkeypatch) as fakes:
        library, outside = tmp_path / "library", tmp_path / "outside"
        for folder in (library, outside):
            index_folder(captioned_folder(folder / "photos"), fakes.embedder, None, progress=False)
        (library / "escape").symlink_to(outside, target_is_directory=True)
        (outside / "run").mkdir()
        (outside / "run" / "run.json").write_text(json.dumps({"prompt": "p", "index": str(outside / "photos")}))
        for name in ("objects.txt", "prompts.txt", "targets.txt"):
            (outside / name).write_text("jay\n")
        (outside / "model").mkdir()
        yield World(library, outside, fakes)
        close_deployed_app()


class Refused(Exception):
    """A face refused the call; the message is what its user saw."""


# The command line, confined with --root.

CLI_INPUTS: dict[str, tuple[str, Callable[[str], list[str]]]] = {
    "index folder": ("photos", lambda p: ["index", p]),
    "query index": ("photos", lambda p: ["query", p, "a jay"]),
    "query image": ("photos/jay.png", lambda p: ["query", "photos", "--image", p]),
    "generate index": ("photos", lambda p: ["generate", "a jay", "--index", p, "--out", "runs/g"]),
    "generate out": ("run-new", lambda p: ["generate", "a jay", "--index", "photos", "--out", p]),
    "generate resume": ("run", lambda p: ["generate", "--resume", p]),
    "search index": ("photos", lambda p: ["search", "--index", p, "--query", "a jay", "--feedback", "verbal"]),
    "rage index": ("photos", lambda p: ["rage", "a jay", "--index", p, "--auto", "1", "--out", "runs/r"]),
    "cir index": ("photos", lambda p: ["cir", "--index", p, "--reference", "photos/jay.png", "--change", "red"]),
    "cir reference": ("photos/jay.png", lambda p: ["cir", "--index", "photos", "--reference", p, "--change", "red"]),
    "cir model": (
        "model",
        lambda p: ["cir", "--index", "photos", "--reference", "photos/jay.png", "--change", "red", "--cir-model", p],
    ),
    "eval genir targets": ("targets.txt", lambda p: ["eval", "genir", "--index", "photos", "--targets", p]),
    "eval genir out": ("eval", lambda p: ["eval", "genir", "--index", "photos", "--targets", "photos", "--out", p]),
    "eval cir annotations": (
        "photos",
        lambda p: ["eval", "cir", "--index", "photos", "--annotations", p, "--format", "cirr", "--out", "runs/c"],
    ),
    "eval imagerag prompts": (
        "prompts.txt",
        lambda p: ["eval", "imagerag", "--prompts", p, "--index", "photos", "--out", "runs/i"],
    ),
    "triplets objects": (
        "objects.txt",
        lambda p: ["triplets", "--objects", p, "--edits", "add", "--n", "1", "--out", "runs/t"],
    ),
    "triplets out": (
        "set",
        lambda p: ["triplets", "--objects", "photos/jay.txt", "--edits", "add", "--n", "1", "--out", p],
    ),
    "train triplets": ("photos", lambda p: ["train", "cir", "--triplets", p, "--out", "runs/m"]),
    "report run": ("run", lambda p: ["report", p]),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CLI_INPUTS)
def test_the_cli_with_a_root_refuses_a_path_out_of_it(
    world: World, name: str, variant: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    relative, command = CLI_INPUTS[name]
    monkeypatch.chdir(world.library)

    args = command(world.variant(variant, relative))
    code = main([*args, "--root", str(world.library), *MODELS.get(args[0], FAKE)])

    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and re.search(REFUSED, last), last


# The agent-facing tools: MCP (in process, over the SDK's memory transport) and LangChain, both over an App
# confined to the library.

TOOL_INPUTS: dict[str, tuple[str, str, Callable[[str], dict[str, Any]]]] = {
    "index_images folder": ("index_images", "photos", lambda p: {"folder": p}),
    "retrieve_images index": ("retrieve_images", "photos", lambda p: {"index": p, "query": "a jay"}),
    "retrieve_images image": ("retrieve_images", "photos/jay.png", lambda p: {"index": "photos", "image": p}),
    "generate_with_references index": ("generate_with_references", "photos", lambda p: {"prompt": "a", "index": p}),
    "genir_round index": ("genir_round", "photos", lambda p: {"index": p, "query": "a jay"}),
    "compose_retrieve index": (
        "compose_retrieve",
        "photos",
        lambda p: {"index": p, "reference": "photos/jay.png", "change": "red"},
    ),
    "compose_retrieve reference": (
        "compose_retrieve",
        "photos/jay.png",
        lambda p: {"index": "photos", "reference": p, "change": "red"},
    ),
    "rage_retrieve index": ("rage_retrieve", "photos", lambda p: {"prompt": "a jay", "index": p}),
}


def confined_app(world: World) -> App:
    runs = world.library / ".runs"
    return App(world.fakes.settings, roots=[world.library], runs_dir=runs, sessions_db=runs / "sessions.sqlite")


def call_mcp(app: App, tool: str, arguments: dict[str, Any]) -> None:
    from mcp.shared.memory import create_connected_server_and_client_session
    from mcp.types import TextContent

    from imageloop.mcp import build_server
    from tests.test_mcp_server import memory_client

    server = build_server(app)
    with memory_client(lambda: create_connected_server_and_client_session(server)) as client:
        waits = {} if tool == "retrieve_images" else {"wait_seconds": 5}
        result = client.call(tool, {**arguments, **waits})
    text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
    if result.isError:
        raise Refused(text)
    if (result.structuredContent or {}).get("status") == "error":
        raise Refused(str(result.structuredContent["error"]))  # type: ignore[index]


def call_langchain(app: App, tool: str, arguments: dict[str, Any]) -> None:
    from imageloop.langchain_tools import imageloop_tools

    [found] = [t for t in imageloop_tools(app=app) if t.name == tool]
    message = found.invoke({"type": "tool_call", "id": "1", "name": tool, "args": arguments})
    if message.status == "error":
        raise Refused(str(message.content))


TOOL_FACES = {"mcp": call_mcp, "langchain": call_langchain}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", TOOL_INPUTS)
@pytest.mark.parametrize("face", TOOL_FACES)
def test_each_agent_tool_refuses_a_path_out_of_the_roots(world: World, face: str, name: str, variant: str) -> None:
    tool, relative, arguments = TOOL_INPUTS[name]
    app = confined_app(world)
    try:
        with pytest.raises(Refused, match=REFUSED):
            TOOL_FACES[face](app, tool, arguments(world.variant(variant, relative)))
    finally:
        app.close()


# LangGraph Server: every graph of langgraph.json, as the server runs it (its checkpointer, a run context).


@pytest.fixture
def deployed(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.delenv("IMAGELOOP_PROFILE", raising=False)
    for role, spec in FAKE_SETTINGS.items():
        monkeypatch.setenv(f"IMAGELOOP_{role.upper()}", spec)
    monkeypatch.setenv("IMAGELOOP_INDEX", str(world.library / "photos"))
    monkeypatch.setenv("IMAGELOOP_ROOTS", str(world.library))
    monkeypatch.setenv("IMAGELOOP_RUNS", str(world.library / "runs"))
    close_deployed_app()
    return world


SIMULATED = {"target_id": "jay", "feedback": "verbal"}
SERVER_INPUTS: dict[str, tuple[str, str, Callable[[str], tuple[dict[str, Any], dict[str, Any]]]]] = {
    "imagerag index": ("imagerag", "photos", lambda p: ({"prompt": "a jay"}, {"index": p})),
    "imagerag artifacts_dir": ("imagerag", "art", lambda p: ({"prompt": "a jay"}, {"artifacts_dir": p})),
    "genir index": ("genir", "photos", lambda p: ({"query": "a jay"}, {"index": p, "feedback": "verbal"})),
    "genir target_path": ("genir", "photos/jay.png", lambda p: ({}, {**SIMULATED, "target_path": p})),
    "genir artifacts_dir": ("genir", "art", lambda p: ({"query": "a jay"}, {"artifacts_dir": p})),
    "cir reference": ("cir", "photos/jay.png", lambda p: ({"reference": p, "change": "red"}, {})),
    "cir index": ("cir", "photos", lambda p: ({"reference": "photos/jay.png", "change": "red"}, {"index": p})),
    "cir cir_model": ("cir", "model", lambda p: ({"reference": "photos/jay.png", "change": "red"}, {"cir_model": p})),
    "rage index": ("rage", "photos", lambda p: ({"prompt": "a jay"}, {"index": p})),
    "rage artifacts_dir": ("rage", "art", lambda p: ({"prompt": "a jay"}, {"auto_select": 1, "artifacts_dir": p})),
}


def run_on_server(graph_name: str, inputs: dict[str, Any], context: dict[str, Any]) -> None:
    from imageloop import langgraph_server

    graph = getattr(langgraph_server, graph_name)().copy(update={"checkpointer": InMemorySaver()})
    try:
        graph.invoke(inputs, {"configurable": {"thread_id": "t"}}, version="v2", context=context)
    except Exception as e:  # the server hands a run's error message to its client
        raise Refused(str(e)) from None


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", SERVER_INPUTS)
def test_every_deployed_graph_refuses_a_path_out_of_the_roots(
    deployed: World, name: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph_name, relative, given = SERVER_INPUTS[name]
    monkeypatch.chdir(deployed.library)  # where a relative reference lies whether or not the graph resolves it
    deployed.fakes.vlm.answers.extend([{"aligned": True, "missing_concepts": []}] * 3)
    inputs, context = given(deployed.variant(variant, relative))

    with pytest.raises(Refused, match=REFUSED):
        run_on_server(graph_name, inputs, context)


# The browser UI: confined to its --index (and --roots), so a session started elsewhere on another folder
# is refused when opened by id.


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_ui_refuses_a_session_whose_index_lies_out_of_its_index_and_roots(world: World, variant: str) -> None:
    pytest.importorskip("streamlit", reason="pip install 'imageloop[ui]'")
    from tests.test_ui import page, texts

    elsewhere = App(world.fakes.settings)  # another face, unconfined: a terminal
    started = elsewhere.start_search(world.variant(variant, "photos"), "a jay", knobs={"feedback": "verbal"})
    elsewhere.close()
    app = App.serving(world.fakes.settings, world.library / "photos", runs_dir=world.library / "runs")
    try:
        test = page(app, world.library / "photos")
        test.text_input(key="search_open_id").input(started.session_id)
        test.button(key="search_open").click().run()
        shown = texts(test)
    finally:
        app.close()
    assert re.search(REFUSED, shown), shown


# Sidecars: read under their image's confinement (inside the index root, or the reference's own folder),
# on every face that indexes or composes; a link out is refused and its target never read.


@pytest.fixture
def side(world: World) -> World:
    """library/side/ref.png, a real image, beside links out: ref.txt -> outside/secret.txt, ref.json -> .json."""
    folder = world.library / "side"
    folder.mkdir()
    Image.new("RGB", (24, 24), (10, 200, 30)).save(folder / "ref.png")
    (world.outside / "secret.txt").write_text(SECRET)
    (world.outside / "secret.json").write_text(json.dumps({"tags": [SECRET]}))
    return world


def link_sidecar(world: World, suffix: str) -> None:
    """ref.SUFFIX links to the secret; the other sidecar (a caption the caption route needs) is a plain file."""
    folder = world.library / "side"
    (folder / f"ref{suffix}").symlink_to(world.outside / f"secret{suffix}")
    if suffix == ".json":
        (folder / "ref.txt").write_text("a green square")


def secret_seen(world: World) -> bool:
    """Whether the secret reached a model: the embedder's texts or the VLM's messages."""
    texts = [text for call in world.fakes.embedder.text_calls for text in call]
    texts += [message.text for messages, _ in world.fakes.vlm.calls for message in messages]
    return any(SECRET in text for text in texts)


def index_with(face: str, world: World) -> dict[str, Any]:
    if face == "cli":
        assert main(["index", str(world.library / "side"), "--json", *FAKE]) == 0
        return {}
    app = confined_app(world)
    try:
        if face == "mcp":
            call_mcp(app, "index_images", {"folder": "side"})
        else:
            call_langchain(app, "index_images", {"folder": "side"})
    finally:
        app.close()
    return {}


@pytest.mark.parametrize("suffix", [".txt", ".json"])
@pytest.mark.parametrize("face", ["cli", "mcp", "langchain"])
def test_indexing_on_every_face_refuses_a_sidecar_linking_out_and_never_reads_it(
    side: World, face: str, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    link_sidecar(side, suffix)

    index_with(face, side)

    app = App(side.fakes.settings)
    try:
        records = app.index(side.library / "side").store.get(list(app.index(side.library / "side").store.ids()))
    finally:
        app.close()
    assert records == [] and not secret_seen(side)
    assert f"ref{suffix}: links outside" in capsys.readouterr().err or face != "cli"


COMPOSE_FACES = ["cli", "mcp", "langchain", "server"]


@pytest.mark.parametrize("face", COMPOSE_FACES)
def test_composing_on_every_face_refuses_a_reference_whose_caption_links_out(
    side: World, face: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    link_sidecar(side, ".txt")
    side.fakes.vlm.answers.append("Edited Description: a red square")
    reference, change = str(side.library / "side" / "ref.png"), "make it red"

    if face == "cli":
        code = main(
            ["cir", "--index", str(side.library / "photos"), "--reference", reference, "--change", change, *FAKE]
        )
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2
    else:
        with pytest.raises(Refused) as refused:
            if face == "server":
                for variable, value in {"IMAGELOOP_INDEX": "photos", "IMAGELOOP_ROOTS": str(side.library)}.items():
                    monkeypatch.setenv(variable, value)
                for role, spec in FAKE_SETTINGS.items():
                    monkeypatch.setenv(f"IMAGELOOP_{role.upper()}", spec)
                close_deployed_app()
                run_on_server("cir", {"reference": reference, "change": change}, {})
            else:
                app = confined_app(side)
                try:
                    TOOL_FACES[face](
                        app, "compose_retrieve", {"index": "photos", "reference": reference, "change": change}
                    )
                finally:
                    app.close()
        message = str(refused.value)
    assert "ref.txt: links outside" in message and SECRET not in message
    assert not secret_seen(side)
