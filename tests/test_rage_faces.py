"""RAGE on every face: the CLI (in process and as a subprocess), MCP, LangChain tools and LangGraph Server.

Each face parses, calls the application layer and renders: the same picks are accepted (positions as
shown, ids, file names), the same bad pick is refused before anything is generated, and a session
started on one face continues on another by its id.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from mcp.shared.memory import create_connected_server_and_client_session

from imageloop.app import App
from imageloop.app.deployment import close_deployed_app
from imageloop.cli import main
from imageloop.langchain_tools import imageloop_tools
from imageloop.mcp import build_server
from tests.fake_openai_server import FakeOpenAIServer
from tests.fake_providers import FAKE_SETTINGS, FakeBackends, fake_backends
from tests.image_folders import product_catalogue
from tests.test_langgraph_server import load_graph
from tests.test_mcp_server import images_of, memory_client, structured, text_of

REPO = Path(__file__).resolve().parents[1]
PROMPT = "the red canvas sneaker and the canvas backpack on a beach at sunset"
FAKE_ROLES = [option for role, spec in FAKE_SETTINGS.items() for option in (f"--{role}", spec)]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as fakes:
        yield fakes


@pytest.fixture
def catalogue(tmp_path: Path, fakes: FakeBackends) -> Path:
    """The product catalogue, indexed (caption route) with the fake embedder."""
    folder = product_catalogue(tmp_path / "catalogue")
    app = App(fakes.settings)
    app.index_folder(folder)
    app.close()
    return folder


def reference_names(fakes: FakeBackends) -> list[list[str]]:
    return [[r.path.name for r in request.references] for request in fakes.generator.requests]


def last_json(out: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# The CLI, in process.


def rage(catalogue: Path, out: Path, *options: str) -> int:
    return main(["rage", PROMPT, "--index", str(catalogue), "--out", str(out), *FAKE_ROLES, *options])


def test_cli_select_generates_with_the_picks_in_order_and_prints_the_json_last(
    fakes: FakeBackends, catalogue: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"

    assert rage(catalogue, out, "--select", "backpack.png,red-sneaker", "--json") == 0

    printed = capsys.readouterr()
    result = last_json(printed.out)
    assert set(result) == {"final_image", "selected", "stop_reason"} and printed.out.count("\n") == 1
    assert [Path(c["path"]).name for c in result["selected"]] == ["backpack.png", "red-sneaker.png"]
    assert result["stop_reason"] == "generated" and result["final_image"] == str((out / "final.png").resolve())
    assert reference_names(fakes) == [["backpack.png", "red-sneaker.png"]]
    assert fakes.generator.requests[0].prompt == PROMPT
    assert (out / "run.json").is_file() and (out / "report.html").is_file()
    assert "1. " in printed.err and f"thumbnails: {out / 'report.html'}" in printed.err


def test_cli_a_pick_that_matches_nothing_exits_2_before_any_generation(
    fakes: FakeBackends, catalogue: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rage(catalogue, tmp_path / "run", "--select", "1,boots", "--json") == 2

    printed = capsys.readouterr()
    error = printed.err.strip().splitlines()[-1]
    assert error.startswith("imageloop: error: pick 'boots' is not a candidate shown: pick by position")
    assert "1 " in error and "backpack.png" in error
    assert fakes.generator.requests == [] and printed.out == ""


def test_cli_auto_picks_the_top_n_without_asking(
    fakes: FakeBackends, catalogue: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rage(catalogue, tmp_path / "run", "--auto", "2", "--where", "tags=bag", "--json") == 0

    result = last_json(capsys.readouterr().out)
    assert sorted(Path(c["path"]).name for c in result["selected"]) == ["backpack.png", "tote.png"]


def test_cli_asks_for_picks_and_a_review_and_asks_again_after_a_bad_answer(
    fakes: FakeBackends,
    catalogue: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    answers = ["boots", "tote.png mug.png", "regenerate", "on a kitchen table", "maybe", "accept"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(answers) + "\n"))

    assert rage(catalogue, tmp_path / "run", "--review", "person", "--json") == 0

    printed = capsys.readouterr()
    assert last_json(printed.out)["stop_reason"] == "accepted" and printed.out.count("\n") == 1
    assert "pick 'boots' is not a candidate shown" in printed.err and "review 'maybe'" in printed.err
    assert reference_names(fakes) == [["tote.png", "mug.png"]] * 2
    assert [r.prompt for r in fakes.generator.requests] == [PROMPT, "on a kitchen table"]


def test_cli_picking_nothing_then_giving_no_prompt_ends_without_an_image(
    fakes: FakeBackends,
    catalogue: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n"))

    assert rage(catalogue, tmp_path / "run", "--json") == 0

    assert last_json(capsys.readouterr().out) == {"final_image": None, "selected": [], "stop_reason": "no_selection"}
    assert fakes.generator.requests == []


def test_cli_a_session_left_at_the_picks_is_resumed_by_its_id(
    fakes: FakeBackends,
    catalogue: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the person walks away: EOF at the picks
    assert rage(catalogue, tmp_path / "run") == 130
    err = capsys.readouterr().err
    session = err.split("imageloop rage --resume ")[1].split(")")[0]
    assert "continue it with: imageloop rage --resume SESSION_ID" in err

    assert main(["rage", "--resume", session, "--select", "2", "--json", *FAKE_ROLES]) == 0

    assert last_json(capsys.readouterr().out)["stop_reason"] == "generated"
    assert len(fakes.generator.requests) == 1
    assert main(["rage", "--resume", session, "--k", "3"]) == 2
    assert "was started with k 10, not 3: continue it without those" in capsys.readouterr().err


# The CLI against an OpenAI-compatible server.


def test_the_cli_sends_the_picks_to_images_edit_and_refuses_a_bad_pick_first(
    openai_server: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = product_catalogue(tmp_path / "catalogue")
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def imageloop(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--profile", "openai"])
        out, err = capsys.readouterr()
        return code, out, err

    assert imageloop("index", str(folder))[0] == 0
    run = ["rage", PROMPT, "--index", str(folder), "--out"]

    code, out, err = imageloop(*run, str(tmp_path / "a"), "--select", "tote.png,9", "--json")
    assert code == 2 and out == ""
    assert "imageloop: error: pick '9' is not a position shown (1..5)" in err
    assert openai_server.requests_to("/v1/images/edits") == []

    code, out, err = imageloop(*run, str(tmp_path / "b"), "--select", "tote.png,mug.png", "--json")
    assert code == 0, err
    result = last_json(out)
    assert [Path(c["path"]).name for c in result["selected"]] == ["tote.png", "mug.png"]
    [edit] = openai_server.requests_to("/v1/images/edits")
    assert edit.fields("prompt")[0].content.decode() == PROMPT and len(edit.fields("image[]")) == 2
    assert Path(result["final_image"]).is_file()


# MCP, over the SDK's memory transport.


@pytest.fixture
def mcp_app(fakes: FakeBackends, catalogue: Path, tmp_path: Path) -> Iterator[App]:
    app = App(fakes.settings, roots=[tmp_path], runs_dir=tmp_path / ".runs")
    yield app
    app.close()


def test_mcp_rage_retrieve_shows_candidates_and_rage_generate_returns_the_image(
    fakes: FakeBackends, catalogue: Path, mcp_app: App
) -> None:
    server = build_server(mcp_app)
    with memory_client(lambda: create_connected_server_and_client_session(server)) as client:
        retrieved = client.call("rage_retrieve", {"prompt": PROMPT, "index": str(catalogue), "k": 3})
        view = structured(retrieved)["result"]
        assert len(view["candidates"]) == 3 and len(images_of(retrieved)) == 3
        assert "#1 " in text_of(retrieved) and view["status"] == "awaiting_selection"

        second = Path(view["candidates"][1]["path"]).name
        generated = client.call("rage_generate", {"session_id": view["session_id"], "selected": [2, "1"]})

    run = structured(generated)
    assert run["status"] == "done" and run["kind"] == "rage"
    result = run["result"]
    assert [c["position"] for c in result["selected"]] == [2, 1] and result["stop_reason"] == "generated"
    assert Path(result["final_image"]).is_file() and len(images_of(generated)) == 1
    assert reference_names(fakes)[0][0] == second


def test_mcp_rage_generate_refuses_a_pick_naming_nothing_before_generating(
    fakes: FakeBackends, catalogue: Path, mcp_app: App
) -> None:
    server = build_server(mcp_app)
    with memory_client(lambda: create_connected_server_and_client_session(server)) as client:
        view = structured(client.call("rage_retrieve", {"prompt": PROMPT, "index": str(catalogue), "k": 2}))["result"]
        refused = client.call("rage_generate", {"session_id": view["session_id"], "selected": ["mug.png"]})
        too_many = client.call("rage_generate", {"session_id": view["session_id"], "selected": list(range(17))})

    assert refused.isError and "rage_generate: pick 'mug.png' is not a candidate shown" in text_of(refused)
    assert too_many.isError and "selected" in text_of(too_many)
    assert fakes.generator.requests == []


def test_an_agent_asking_for_a_persons_review_is_told_which_reviews_it_can_have(
    fakes: FakeBackends, catalogue: Path, mcp_app: App
) -> None:
    server = build_server(mcp_app)
    with memory_client(lambda: create_connected_server_and_client_session(server)) as client:
        refused = client.call("rage_retrieve", {"prompt": PROMPT, "index": str(catalogue), "review": "person"})
    assert refused.isError and "from an agent, review none or critic" in text_of(refused)


# LangChain tools; a session started there continues in the CLI.


def invoke(tools: list[Any], name: str, **args: Any) -> Any:
    tool = next(t for t in tools if t.name == name)
    return tool.invoke({"type": "tool_call", "id": name, "name": name, "args": args})


def test_langchain_rage_tools_then_the_cli_continue_one_session(
    fakes: FakeBackends, catalogue: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tools = imageloop_tools(fakes.settings, roots=[tmp_path], runs_dir=tmp_path / "runs")

    retrieved = invoke(tools, "rage_retrieve", prompt=PROMPT, index=str(catalogue), where={"brand": "acme"})
    session = retrieved.artifact["result"]["session_id"]
    assert retrieved.status == "success" and "1. " in retrieved.content and str(tmp_path) not in retrieved.content
    assert {Path(c["path"]).name for c in retrieved.artifact["result"]["candidates"]} == {
        "red-sneaker.png", "backpack.png", "tote.png",
    }  # fmt: skip

    refused = invoke(tools, "rage_generate", session_id=session, selected=["mug.png"])
    assert refused.status == "error" and "is not a candidate shown" in refused.content

    generated = invoke(tools, "rage_generate", session_id=session, selected=["tote.png", 1])
    assert generated.status == "success" and "generated with tote.png" in generated.content
    result = generated.artifact["result"]
    assert Path(result["final_image"]).is_file() and result["status"] == "finished"

    assert main(["rage", "--resume", session, "--json", *FAKE_ROLES]) == 0  # shows the finished session
    assert last_json(capsys.readouterr().out)["final_image"] == result["final_image"]
    assert len(fakes.generator.requests) == 1


# LangGraph Server: Studio shows the interrupt; the server's checkpointer resumes it.


@pytest.fixture
def server_env(monkeypatch: pytest.MonkeyPatch, fakes: FakeBackends, catalogue: Path, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv("IMAGELOOP_PROFILE", raising=False)
    for role, spec in FAKE_SETTINGS.items():
        monkeypatch.setenv(f"IMAGELOOP_{role.upper()}", spec)
    monkeypatch.setenv("IMAGELOOP_INDEX", str(catalogue))
    monkeypatch.setenv("IMAGELOOP_ROOTS", str(tmp_path))
    monkeypatch.setenv("IMAGELOOP_RUNS", str(tmp_path / "runs"))
    close_deployed_app()
    yield
    close_deployed_app()


@pytest.mark.usefixtures("server_env")
def test_the_server_graph_interrupts_with_the_candidates_and_resumes_with_the_picks(
    fakes: FakeBackends, tmp_path: Path
) -> None:
    served = load_graph("rage").copy(update={"checkpointer": InMemorySaver()})
    thread = {"configurable": {"thread_id": "t1"}}
    context = {"artifacts_dir": str(tmp_path / "art"), "where": {"tags": "sneaker"}, "k": 4}

    asked = served.invoke({"prompt": PROMPT}, thread, version="v2", context=context)
    [question] = asked.interrupts
    names = [Path(c["path"]).name for c in question.value["candidates"]]
    assert sorted(names) == ["blue-sneaker.png", "red-sneaker.png"] and fakes.generator.requests == []

    done = served.invoke(Command(resume={"selected": ["2", "1"]}), thread, version="v2", context=context).value

    assert done["stop_reason"] == "generated" and reference_names(fakes) == [[names[1], names[0]]]
    assert done["final_image"].startswith("/imageloop/roots/0/art/")  # named by its address on the server's route
    assert (tmp_path / "art" / Path(done["final_image"]).name).is_file()
    [record] = (tmp_path / "runs" / "server").glob("*/run.json")
    written = json.loads(record.read_text())
    assert (written["loop"], written["prompt"], written["stop_reason"]) == ("rage", PROMPT, "generated")
    assert Path(written["final_image"]).is_file() and (record.parent / "report.html").is_file()

    again = served.invoke({"prompt": "a white ceramic mug"}, thread, version="v2", context={"auto_select": 1})
    assert again.interrupts == () and again.value["images"][0]["iteration"] == 1  # a fresh run on the same thread
