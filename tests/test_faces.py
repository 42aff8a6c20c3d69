"""The face contract: the same scenarios through every face with the same outcome, and every face exposing every
knob of every loop the same way (all derived from one declaration per knob, `imageloop.knobs`).

Faces, each through its own protocol and in this process: the CLI (`main([...])`), the MCP server (the
official client over the SDK's in-memory transport, the server built as `imageloop mcp --root` builds it),
the LangChain tools, and the LangGraph Server factories (with the checkpointer the server would bring).
`tests/test_face_smoke.py` runs the CLI and the MCP server once each as real processes. Models are a local
fake of the OpenAI API (the VLM, whose calls are counted, and text embeddings for the caption route) and
the tiny open_clip embedder (the image route), so every face resolves the same backends from the same
settings. A scenario runs on every face that offers the operation; a face that cannot (the server does not
index) is left out by name.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from mcp.shared.memory import create_connected_server_and_client_session
from mcp.types import CallToolResult, TextContent
from PIL import Image

from imageloop import langgraph_server, limits
from imageloop.app import App
from imageloop.app.deployment import close_deployed_app
from imageloop.cli import APPS, build_parser, main
from imageloop.config import load_settings
from imageloop.knobs import CIRKnobs, GenIREvalKnobs, GenIRKnobs, ImageRAGKnobs, Knobs, RAGEKnobs, TripletsKnobs
from imageloop.langchain_tools import imageloop_tools
from imageloop.mcp import build_server
from imageloop.tools.indexing.options import IndexOptions
from imageloop.tools.stores import embedded
from tests.fake_openai_server import FakeOpenAIServer
from tests.test_mcp_server import Client, memory_client

CAPTIONS = {"jay": "a blue jay on a branch", "snow": "a snowy branch in winter", "cat": "a tabby cat on a sofa"}
# The fake's text embeddings (caption route) keep the faces free of torch; the image route uses tiny:clip.
MODELS = {
    "IMAGELOOP_VLM": "openai:gpt-test",
    "IMAGELOOP_EMBEDDER": "openai:embed-test",
    "IMAGELOOP_GENERATOR": "tiny:sd",
}


@pytest.fixture(scope="module")
def openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def env(openai: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The settings every face reads: the same variables in this process and in every subprocess."""
    values = {
        **MODELS,
        "OPENAI_BASE_URL": openai.base_url,
        "OPENAI_API_KEY": "sk-test",
        "IMAGELOOP_SESSIONS": str(tmp_path / "sessions.sqlite"),
        "IMAGELOOP_ROOTS": str(tmp_path / "library"),
        "IMAGELOOP_RUNS": str(tmp_path / "runs"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("IMAGELOOP_PROFILE", "IMAGELOOP_STORE", "IMAGELOOP_CAPTIONER"):
        monkeypatch.delenv(name, raising=False)
    openai.requests.clear()
    close_deployed_app()
    return values


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """library/photos: three images with sidecar captions; library is every confined face's root."""
    photos = tmp_path / "library" / "photos"
    photos.mkdir(parents=True)
    for shade, (name, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (32, 32), (70 * shade + 20, 200 - 60 * shade, 90)).save(photos / f"{name}.png")
        (photos / f"{name}.txt").write_text(caption)
    return tmp_path / "library"


@pytest.fixture
def open_stores(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many embedded-store handles are open right now, in this process, whoever opened them."""
    count = [0]
    opened, closed = embedded.EmbeddedVectorStore.__init__, embedded.EmbeddedVectorStore.close

    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        opened(self, *args, **kwargs)
        count[0] += 1

    def counting_close(self: Any) -> None:
        closed(self)
        count[0] -= 1

    monkeypatch.setattr(embedded.EmbeddedVectorStore, "__init__", counting_init)
    monkeypatch.setattr(embedded.EmbeddedVectorStore, "close", counting_close)
    return count


# The faces, each driven through its own protocol.


class Refused(Exception):
    """A face refused the call; the message is what its user saw."""


class CliFace:
    """`imageloop ...` as `main([...])`, reading the JSON its --json options print last."""

    name = "cli"

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.root = root

    def run(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        given, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = main(list(args))
        except SystemExit as e:  # argparse refusing an option
            code = int(e.code or 0)
        finally:
            sys.stdin = given
        return code, out.getvalue(), err.getvalue()

    def checked(self, *args: str) -> str:
        code, out, err = self.run(*args)
        if code != 0:
            raise Refused(err.strip().splitlines()[-1])
        return out

    def index(self, folder: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.checked("index", folder, "--json").splitlines()[-1])
        return result

    def retrieve(self, index: str, query: str, k: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(self.checked("query", index, query, "--k", str(k), "--json"))[
            "results"
        ]
        return found

    def start_search(self, index: str, query: str) -> str:
        # No answer on stdin: the search pauses at its first question and says how to continue it.
        code, out, err = self.run("search", "--index", index, "--query", query, "--feedback", "verbal")
        match = re.search(r"--resume ([0-9a-f]{12})", out)
        assert code == 130 and match, out + err
        return match.group(1)

    def answer(self, session: str, feedback: str) -> dict[str, Any]:
        _, out, _ = self.run("search", "--resume", session, stdin=feedback + "\n")
        rounds = re.findall(r"^round (\d+):", out, re.M)
        return {"round": int(rounds[-1]) if rounds else None, "finished": "found" in out.splitlines()[-1]}

    def generate(self, index: str, prompt: str, knobs: dict[str, Any]) -> dict[str, Any]:
        options = [f"--{name.replace('_', '-')}={value}" for name, value in knobs.items()]
        out = self.root.parent / "runs" / "cli"
        return dict(
            json.loads(self.checked("generate", prompt, "--index", index, "--out", str(out), *options, "--json"))
        )

    def close(self) -> None:
        """Nothing stays open between commands."""


class McpFace:
    """The MCP server `imageloop mcp --root ROOT` serves, behind the SDK's client over its in-memory transport."""

    name = "mcp"

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.app = APPS["mcp"](build_parser().parse_args(["mcp", "--root", str(root)]))
        server = build_server(self.app)
        self._client = memory_client(lambda: create_connected_server_and_client_session(server))
        self.client: Client = self._client.__enter__()
        self.portal, self.session = self.client.portal, self.client.session

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        waits = {} if tool == "retrieve_images" else {"wait_seconds": 50}
        result: CallToolResult = self.client.call(tool, {**arguments, **waits})
        text = "\n".join(block.text for block in result.content if isinstance(block, TextContent))
        if result.isError:
            raise Refused(text)
        structured: dict[str, Any] = result.structuredContent or {}
        if structured.get("status") == "error":
            raise Refused(str(structured.get("error")))
        return structured

    def index(self, folder: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("index_images", {"folder": folder})["result"]
        return result

    def retrieve(self, index: str, query: str, k: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("retrieve_images", {"index": index, "query": query, "k": k})["results"]
        return found

    def start_search(self, index: str, query: str) -> str:
        started = self.call("genir_round", {"index": index, "query": query, "feedback": "verbal"})
        return str(started["result"]["session_id"])

    def answer(self, session: str, feedback: str) -> dict[str, Any]:
        shown = self.call("genir_feedback", {"session_id": session, "feedback": feedback})["result"]
        return {"round": shown.get("round"), "finished": shown["status"] == "finished"}

    def generate(self, index: str, prompt: str, knobs: dict[str, Any]) -> dict[str, Any]:
        run = self.call("generate_with_references", {"prompt": prompt, "index": index, **knobs})
        return dict(run["result"])

    def close(self) -> None:
        self._client.__exit__(None, None, None)
        self.app.close()


class LangChainFace:
    """The LangChain tools over an App confined to the library."""

    name = "langchain"

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.app = App(load_settings(), roots=[root], runs_dir=root.parent / "runs")
        self.tools = {tool.name: tool for tool in imageloop_tools(app=self.app)}

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        message = self.tools[tool].invoke({"type": "tool_call", "id": "1", "name": tool, "args": arguments})
        if message.status == "error":
            raise Refused(str(message.content))
        artifact: dict[str, Any] = message.artifact
        return artifact

    def index(self, folder: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("index_images", {"folder": folder})["result"]
        return result

    def retrieve(self, index: str, query: str, k: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("retrieve_images", {"index": index, "query": query, "k": k})["results"]
        return found

    def start_search(self, index: str, query: str) -> str:
        started = self.call("genir_round", {"index": index, "query": query, "feedback": "verbal", "wait_seconds": 50})
        return str(started["result"]["session_id"])

    def answer(self, session: str, feedback: str) -> dict[str, Any]:
        shown = self.call("genir_feedback", {"session_id": session, "feedback": feedback, "wait_seconds": 50})["result"]
        return {"round": shown.get("round"), "finished": shown["status"] == "finished"}

    def generate(self, index: str, prompt: str, knobs: dict[str, Any]) -> dict[str, Any]:
        run = self.call("generate_with_references", {"prompt": prompt, "index": index, "wait_seconds": 50, **knobs})
        return dict(run["result"])

    def close(self) -> None:
        self.app.close()


class ServerFace:
    """The graphs `langgraph.json` exports, run as LangGraph Server runs them: its checkpointer, a context."""

    name = "server"

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.genir = langgraph_server.genir().copy(update={"checkpointer": InMemorySaver()})
        self.runs = env["IMAGELOOP_RUNS"]

    def retrieve(self, index: str, query: str, k: int) -> list[dict[str, Any]]:
        thread = {"configurable": {"thread_id": f"retrieve-{k}"}}
        context = {"index": index, "k": k, "feedback": "verbal"}
        try:
            asked = self.genir.invoke({"query": query}, thread, version="v2", context=context)
        except Exception as e:  # the server reports a run's error to its client as the message
            raise Refused(str(e).splitlines()[0]) from None
        found: list[dict[str, Any]] = asked.interrupts[0].value["retrieved"]
        return found

    def generate(self, index: str, prompt: str, knobs: dict[str, Any]) -> dict[str, Any]:
        graph = langgraph_server.imagerag().copy(update={"checkpointer": InMemorySaver()})
        thread = {"configurable": {"thread_id": "generate"}}
        graph.invoke({"prompt": prompt}, thread, version="v2", context={"index": index, **knobs})
        [record] = (Path(self.runs) / "server").glob("*/run.json")  # what the server writes for every finished run
        return dict(json.loads(record.read_text()))

    def close(self) -> None:
        close_deployed_app()


FACES: dict[str, type[Any]] = {"cli": CliFace, "mcp": McpFace, "langchain": LangChainFace, "server": ServerFace}


@pytest.fixture
def face(request: pytest.FixtureRequest, env: dict[str, str], library: Path) -> Iterator[Any]:
    opened = FACES[request.param](env, library)
    yield opened
    if hasattr(opened, "close"):
        opened.close()


def faces(*names: str) -> Any:
    return pytest.mark.parametrize("face", names, indirect=True)


def _index_in_process(library: Path) -> None:
    app = App(load_settings(), roots=[library])
    try:
        app.index_folder(library / "photos")
    finally:
        app.close()


# The scenarios.


@contextmanager
def face_with(
    name: str, env: dict[str, str], library: Path, monkeypatch: pytest.MonkeyPatch, **extra: str
) -> Iterator[Any]:
    """Face `name` with `extra` settings (as variables: in this process too, for the in-process faces)."""
    for variable, value in extra.items():
        monkeypatch.setenv(variable, value)
    opened = FACES[name]({**env, **extra}, library)
    try:
        yield opened
    finally:
        if hasattr(opened, "close"):
            opened.close()


@pytest.mark.parametrize("name", ["cli", "mcp", "langchain"])
def test_image_route_indexing_asks_the_vlm_nothing(
    name: str, env: dict[str, str], openai: FakeOpenAIServer, library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (library / "photos" / "cat.txt").unlink()  # an image without a caption: still no VLM on the image route
    with face_with(name, env, library, monkeypatch, IMAGELOOP_EMBEDDER="tiny:clip") as face:
        summary = face.index(str(library / "photos"))
    assert (summary["indexed"], summary["failed"]) == (3, 0)
    assert openai.requests_to("/v1/chat/completions") == []


@pytest.mark.parametrize("name", ["cli", "mcp", "langchain"])
def test_the_store_setting_is_honoured(
    name: str, env: dict[str, str], library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("chromadb")
    with face_with(name, env, library, monkeypatch, IMAGELOOP_STORE="chroma") as face:
        face.index(str(library / "photos"))
    assert json.loads((library / "photos" / ".imageloop" / "store.json").read_text())["store"] == "chroma"


@faces("mcp", "langchain", "server")
def test_a_path_outside_the_roots_is_refused(face: Any, library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(Refused, match="is outside the folders"):
        face.retrieve(str(outside), "a jay", 3)


@faces("cli", "mcp", "langchain", "server")
def test_a_value_past_a_bound_is_refused_naming_the_bound(face: Any, library: Path) -> None:
    _index_in_process(library)
    too_many = int(limits.BOUNDS["k"].high) + 1
    with pytest.raises(Refused, match=rf"\b{int(limits.BOUNDS['k'].high)}\b"):
        face.retrieve(str(library / "photos"), "a jay", too_many)


@faces("cli", "mcp", "langchain", "server")
def test_every_face_retrieves_the_same_images(face: Any, library: Path) -> None:
    _index_in_process(library)
    expected = [r.id for r in App(load_settings()).retrieve(library / "photos", query="a blue jay", k=3)]
    assert [r["id"] for r in face.retrieve(str(library / "photos"), "a blue jay", 3)] == expected


@faces("cli", "mcp", "langchain")
def test_a_search_starts_with_the_one_default_number_of_rounds(face: Any, library: Path) -> None:
    _index_in_process(library)
    session = face.start_search(str(library / "photos"), "a blue jay")
    shown = App(load_settings(), roots=[library]).show_search(session)
    assert shown.knobs["rounds"] == limits.default("rounds")


@pytest.mark.parametrize(("first", "second"), [("cli", "mcp"), ("mcp", "langchain"), ("langchain", "cli")])
def test_a_search_started_in_one_face_continues_in_another(
    first: str, second: str, env: dict[str, str], library: Path
) -> None:
    _index_in_process(library)
    starting = FACES[first](env, library)
    try:
        session = starting.start_search(str(library / "photos"), "a blue jay")
    finally:
        if hasattr(starting, "close"):
            starting.close()
    continuing = FACES[second](env, library)
    try:
        shown = continuing.answer(session, "bluer, and in the snow")
    finally:
        if hasattr(continuing, "close"):
            continuing.close()
    assert shown["round"] == 1 and not shown["finished"]


def test_two_runs_on_one_server_thread_are_independent(env: dict[str, str], library: Path) -> None:
    _index_in_process(library)
    graph = ServerFace(env, library).genir
    thread = {"configurable": {"thread_id": "reused"}}
    index = str(library / "photos")
    graph.invoke({"query": "a blue jay"}, thread, version="v2", context={"index": index, "k": 1, "feedback": "verbal"})
    second = graph.invoke({"query": "a cat"}, thread, version="v2", context={"index": index, "feedback": "verbal"})
    [asked] = second.interrupts
    assert asked.value["query"] == "a cat" and asked.value["round"] == 0
    assert len(asked.value["retrieved"]) == 3  # k back to its default (3 images), not the first run's 1
    close_deployed_app()


@pytest.mark.parametrize("name", ["langchain", "server"])
def test_closing_a_face_releases_every_index(
    name: str, env: dict[str, str], library: Path, open_stores: list[int]
) -> None:
    _index_in_process(library)
    assert open_stores[0] == 0
    face: AbstractContextManager[Any] | Any = FACES[name](env, library)
    face.retrieve(str(library / "photos"), "a blue jay", 2)
    assert open_stores[0] >= 1
    face.close()
    assert open_stores[0] == 0


# RAGE: the same picks refused, or generated with in pick order, on every face.

RAGE_PROMPT = "a blue jay on a snowy branch"


def rage(face: Any, library: Path, picks: list[str], out: Path) -> list[str]:
    """A RAGE run on `face` picking `picks`; the file names it generated with, in order (a refusal raises)."""
    index = str(library / "photos")
    if face.name == "cli":
        args = ["rage", RAGE_PROMPT, "--index", index, "--out", str(out), "--select", ",".join(picks), "--json"]
        result: dict[str, Any] = json.loads(face.checked(*args).splitlines()[-1])
    elif face.name in ("mcp", "langchain"):
        waits = {"wait_seconds": 50}
        session = face.call("rage_retrieve", {"prompt": RAGE_PROMPT, "index": index, **waits})["result"]["session_id"]
        result = face.call("rage_generate", {"session_id": session, "selected": picks, **waits})["result"]
    else:
        graph = langgraph_server.rage().copy(update={"checkpointer": InMemorySaver()})
        thread, context = {"configurable": {"thread_id": "rage"}}, {"index": index}  # images: the server's runs
        graph.invoke({"prompt": RAGE_PROMPT}, thread, version="v2", context=context)
        answered = graph.invoke(Command(resume={"selected": picks}), thread, version="v2", context=context)
        if answered.interrupts:  # the graph asks again, saying why
            raise Refused(answered.interrupts[0].value["ask"])
        result = answered.value
    assert result["final_image"]
    return [Path(c["path"]).name for c in result["selected"]]


@faces("cli", "mcp", "langchain", "server")
def test_rage_refuses_a_pick_naming_no_candidate_before_anything_is_drawn(
    face: Any, library: Path, tmp_path: Path
) -> None:
    _index_in_process(library)
    with pytest.raises(Refused, match=r"'boots\.png' is not a candidate shown: pick by position"):
        rage(face, library, ["jay.png", "boots.png"], tmp_path / "rage")
    assert list(tmp_path.rglob("artifacts/*.png")) == []


@faces("cli", "mcp", "langchain", "server")
def test_rage_takes_the_same_picks_in_pick_order_on_every_face(face: Any, library: Path, tmp_path: Path) -> None:
    _index_in_process(library)
    assert rage(face, library, ["snow.png", "jay"], tmp_path / "rage") == ["snow.png", "jay.png"]


# Parity: every knob of every loop, exposed the same way on every face (all derived from `imageloop.knobs`).

LOOP_FACES: dict[str, tuple[type[Knobs], list[str], str | None, Any]] = {
    "imagerag": (ImageRAGKnobs, ["generate"], "generate_with_references", langgraph_server.imagerag),
    "genir": (GenIRKnobs, ["search"], "genir_round", langgraph_server.genir),
    "rage": (RAGEKnobs, ["rage"], "rage_retrieve", langgraph_server.rage),
    "cir": (CIRKnobs, ["cir"], "compose_retrieve", langgraph_server.cir),
    "eval-genir": (GenIREvalKnobs, ["eval", "genir"], None, None),
    "eval-imagerag": (ImageRAGKnobs, ["eval", "imagerag"], None, None),
    "eval-cir": (CIRKnobs, ["eval", "cir"], None, None),
    "triplets": (TripletsKnobs, ["triplets"], None, None),
    "index": (IndexOptions, ["index"], "index_images", None),
}


def shape(prop: dict[str, Any]) -> dict[str, Any]:
    """What a schema says of one argument: description, default, bounds and choices (the null branch aside)."""
    inner = next((p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"), {})
    keys = ("minimum", "maximum", "enum", "type", "maxLength")
    return {"description": prop.get("description"), "default": prop.get("default")} | {k: inner.get(k) for k in keys}


def subcommand(path: list[str]) -> Any:
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if a.dest in ("command", "loop", "model")).choices[name]
    return parser


@pytest.mark.parametrize("loop", list(LOOP_FACES))
def test_every_face_exposes_every_knob_with_the_same_name_default_bound_and_description(
    loop: str, library: Path, env: dict[str, str]
) -> None:
    knobs, command, tool, graph = LOOP_FACES[loop]
    declared = {name: shape(prop) for name, prop in knobs.context_schema().model_json_schema()["properties"].items()}
    options = {action.dest: action for action in subcommand(command)._actions}
    for name, info in knobs.model_fields.items():
        option = options[name]
        assert f"--{name.replace('_', '-')}" in option.option_strings and option.default is None, name
        assert option.help == declared[name]["description"], name
        literal = [a for a in get_args(info.annotation) if get_origin(a) is not None] or [info.annotation]
        if get_origin(literal[0]) is not None and str(get_origin(literal[0])) == "typing.Literal":
            assert tuple(option.choices) == get_args(literal[0]), name
    if tool is None:
        return
    mcp = McpFace(env, library)
    try:
        listed = {t.name: t.inputSchema["properties"] for t in mcp.portal.call(mcp.session.list_tools).tools}
    finally:
        mcp.close()
    langchain = LangChainFace(env, library)
    try:
        schemas = {t.name: t.args_schema.model_json_schema()["properties"] for t in langchain.tools.values()}
    finally:
        langchain.close()
    studio = graph().get_context_jsonschema()["properties"] if graph is not None else {}
    for name in knobs.model_fields:
        faces_say = {
            "mcp": shape(listed[tool][name]),
            "langchain": shape(schemas[tool][name]),
            **({"studio": shape(studio[name])} if graph is not None else {}),
        }
        assert faces_say == {face: declared[name] for face in faces_say}, name


@pytest.mark.parametrize("loop", ["imagerag", "genir", "rage", "cir"])
@pytest.mark.parametrize("name", ["cli", "mcp", "langchain", "server"])
def test_every_face_refuses_an_unknown_knob_naming_the_valid_ones(
    loop: str, name: str, env: dict[str, str], library: Path
) -> None:
    _index_in_process(library)
    index, reference = str(library / "photos"), str(library / "photos" / "jay.png")
    asked = {
        "imagerag": {"prompt": "a jay", "index": index},
        "genir": {"query": "a jay", "index": index},
        "rage": {"prompt": "a jay", "index": index},
        "cir": {"index": index, "reference": reference, "change": "in winter"},
    }[loop]
    knobs, command, tool, graph = LOOP_FACES[loop]
    face = FACES[name](env, library)
    try:
        if name == "cli":
            named = [f"--{k}={v}" for k, v in asked.items() if k not in ("prompt", "query")] + ["--query=a jay"] * (
                loop == "genir"
            )
            code, _, err = face.run(
                *command, *([asked["prompt"]] if "prompt" in asked else []), *named, "--top-kk", "2"
            )
            assert code == 2 and "unrecognized arguments: --top-kk" in err
        elif name == "server":
            inputs = {k: v for k, v in asked.items() if k != "index"}
            with pytest.raises(Exception, match=rf"unknown {knobs.LOOP} knob 'top_kk': expected one of .*\bseed\b"):
                graph().invoke(inputs, version="v2", context={"index": index, "top_kk": 2})
        else:
            with pytest.raises(Refused, match=r"unknown argument 'top_kk'; expected some of .*\bseed\b"):
                face.call(tool, {**asked, "top_kk": 2})
    finally:
        face.close()


@pytest.mark.parametrize("name", ["cli", "mcp", "langchain", "server"])
def test_every_face_records_the_knobs_the_run_ran_with(name: str, env: dict[str, str], library: Path) -> None:
    _index_in_process(library)
    face = FACES[name](env, library)
    try:
        record = face.generate(
            str(library / "photos"), "a blue jay on a snowy branch", {"max_iterations": 2, "top_k": 2}
        )
    finally:
        face.close()
    ran = record["settings"]
    assert (ran["max_iterations"], ran["top_k"]) == (2, 2)  # what ran, whichever face started it
    assert set(ran) == set(ImageRAGKnobs.model_fields)
