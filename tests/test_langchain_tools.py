"""The LangChain tools, called by the example's LangGraph agent driven by a scripted chat model.

The tools run against a real index built here, with scripted backends registered as the `fake:`
provider; the model sees short texts, while paths, scores and ids travel in the tool artifacts.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from imageloop.langchain_tools import imageloop_tools
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FakeBackends, captioned_folder, fake_backends

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent.py"
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}
Turn = AIMessage | Callable[[Sequence[BaseMessage]], AIMessage]


class ScriptedChatModel(BaseChatModel):
    """Replays scripted turns; a callable turn reads the conversation so far (to quote an id a tool returned)."""

    turns: list[Any]
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    bound: list[str] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:  # type: ignore[override]
        self.bound = [convert_to_openai_tool(tool)["function"]["name"] for tool in tools]
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **_: Any) -> ChatResult:
        self.seen.append(list(messages))
        if not self.turns:
            raise AssertionError("ScriptedChatModel ran out of turns")
        turn = self.turns.pop(0)
        message = turn(messages) if callable(turn) else turn
        return ChatResult(generations=[ChatGeneration(message=message)])


_calls = iter(range(10_000))


def call(name: str, **args: Any) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": name, "args": args, "id": f"call_{next(_calls)}", "type": "tool_call"}])


def quoting(pattern: str, name: str, key: str, **args: Any) -> Turn:
    """A turn that calls `name` with the id the last tool's text gave (as a model would read it)."""

    def turn(messages: Sequence[BaseMessage]) -> AIMessage:
        last = next(m for m in reversed(messages) if isinstance(m, ToolMessage))
        found = re.search(pattern, str(last.content))
        assert found, f"no id in {last.content!r}"
        return call(name, **{key: found.group(1)}, **args)

    return turn


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imageloop_example_agent", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def converse(fakes: FakeBackends, tmp_path: Path, turns: list[Turn], request: str) -> list[BaseMessage]:
    """One user request through the example agent; returns every message of the conversation."""
    model = ScriptedChatModel(turns=turns)
    agent = load_example().build_agent(model, fakes.settings, tmp_path / "photos", tmp_path / "runs")
    state = agent.invoke({"messages": [{"role": "user", "content": request}]})
    assert model.turns == [], "the agent stopped before the script ended"
    assert model.bound == [
        "index_images", "retrieve_images", "generate_with_references", "compose_retrieve", "genir_round",
        "genir_feedback", "get_run", "rage_retrieve", "rage_generate",
    ]  # fmt: skip
    return list(state["messages"])


def tool_messages(messages: list[BaseMessage]) -> dict[str, ToolMessage]:
    return {str(m.name): m for m in messages if isinstance(m, ToolMessage)}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return captioned_folder(tmp_path / "photos")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as backends:
        yield backends


def test_an_agent_indexes_searches_and_draws_with_references(fakes: FakeBackends, photos: Path, tmp_path: Path) -> None:
    fakes.vlm.answers.extend([NOT_ALIGNED, CAPTIONS, ALIGNED])
    turns: list[Turn] = [
        call("index_images", folder=str(photos)),
        call("retrieve_images", index=str(photos), query="a blue jay on a branch", k=2),
        call("generate_with_references", prompt="a blue jay on a snowy branch", index="."),  # relative: in the root
        quoting(r"Run (\S+):", "get_run", "run_id"),
        AIMessage("Here is your blue jay."),
    ]
    messages = converse(fakes, tmp_path, turns, "Draw a blue jay from my photos")
    tools = tool_messages(messages)
    assert all(m.status == "success" for m in tools.values()), [m.content for m in tools.values()]
    for message in tools.values():  # short text for the model: no paths, no long listings
        assert len(str(message.content)) < 600 and str(tmp_path) not in str(message.content)

    indexed = tools["index_images"].artifact["result"]
    assert (indexed["indexed"], indexed["failed"], indexed["folder"]) == (3, 0, str(photos.resolve()))
    assert "Indexed 3 new image(s)" in str(tools["index_images"].content)

    results = tools["retrieve_images"].artifact["results"]
    assert len(results) == 2 and Path(results[0]["path"]) == photos.resolve() / "jay.png"
    assert (
        results[0]["score"] >= results[1]["score"]
        and "a blue jay with a blue crest" in tools["retrieve_images"].content
    )

    run = tools["generate_with_references"].artifact["result"]
    run_dir = tmp_path / "runs" / run["run_id"]
    assert run["aligned"] and run["stop_reason"] == "aligned"
    assert Path(run["final_image"]).is_file() and (run_dir / "report.html").is_file()
    [reference] = run["references"]
    assert Path(reference["path"]) == photos.resolve() / "jay.png" and isinstance(reference["score"], float)
    assert json.loads((run_dir / "run.json").read_text())["prompt"] == "a blue jay on a snowy branch"

    got = tools["get_run"]
    assert got.artifact["run_id"] == run["run_id"] and got.artifact["result"]["stop_reason"] == "aligned"
    assert f"Run {run['run_id']}" in str(got.content) and "aligned" in str(got.content)


def test_a_search_session_spans_tool_calls_keyed_by_its_session_id(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    index_folder(photos, fakes.embedder, None, progress=False)
    fakes.vlm.answers.append({"query": "a blue jay with a blue crest"})  # the refiner folds the feedback in
    turns: list[Turn] = [
        call("genir_round", index=str(photos), query="a bird", k=2, rounds=4),
        quoting(r"Session (\w+),", "genir_feedback", "session_id", feedback="the bird should be blue"),
        quoting(r"Session (\w+),", "genir_feedback", "session_id", feedback="found: 1"),
        AIMessage("Found it."),
    ]
    messages = converse(fakes, tmp_path, turns, "Help me find my photo of a blue jay")
    rounds = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.status for m in rounds] == ["success"] * 3

    first, second, last = (m.artifact["result"] for m in rounds)
    assert first["status"] == second["status"] == "awaiting_feedback"
    assert first["session_id"] == second["session_id"] == last["session_id"]
    assert Path(first["synthetic_image"]).is_file() and Path(first["page"]).is_file()  # visual feedback drew it
    assert second["query"] == "a blue jay with a blue crest" and second["round"] == 1
    assert Path(second["retrieved"][0]["path"]) == photos.resolve() / "jay.png"
    assert last["status"] == "finished" and last["stop_reason"] == "found"
    assert Path(last["found_path"]) == photos.resolve() / "jay.png"
    assert "found their image after 2 round(s)" in str(rounds[-1].content)
    assert "Ask the user what differs" in str(rounds[0].content) and str(tmp_path) not in str(rounds[0].content)


def test_a_session_continues_with_a_new_set_of_tools(fakes: FakeBackends, photos: Path, tmp_path: Path) -> None:
    """Session state lives in the sessions database, so a restarted process continues by id alone."""
    index_folder(photos, fakes.embedder, None, progress=False)
    runs = tmp_path / "runs"

    def tool(name: str) -> Any:
        return next(t for t in imageloop_tools(fakes.settings, roots=[photos], runs_dir=runs) if t.name == name)

    started = tool("genir_round").invoke(
        {"type": "tool_call", "id": "1", "name": "genir_round", "args": {"index": str(photos), "query": "a cat"}}
    )
    session = started.artifact["result"]["session_id"]
    finished = tool("genir_feedback").invoke(
        {
            "type": "tool_call",
            "id": "2",
            "name": "genir_feedback",
            "args": {"session_id": session, "feedback": "found: 1"},
        }
    )
    shown = finished.artifact["result"]
    assert shown["status"] == "finished" and shown["found_id"]
    assert (Path(shown["out_dir"]) / "session.json").is_file()


def test_mistakes_come_back_to_the_model_as_one_line_answers(fakes: FakeBackends, photos: Path, tmp_path: Path) -> None:
    turns: list[Turn] = [
        call("retrieve_images", index=str(photos), query="a jay"),  # not indexed yet
        call("retrieve_images", index="/etc", query="a jay"),  # outside the allowed folder
        call("retrieve_images", index=str(photos), query="a jay", k=500),  # out of bounds
        call("retrieve_images", index=str(photos), query="a jay", image=str(photos / "jay.png")),  # both
        call("retrieve_images", index=str(photos), query="a jay", top_kk=3),  # a misspelled argument
        call("genir_feedback", session_id="0123456789ab", feedback="bluer"),  # no such session
        call("get_run", run_id="../../etc"),
        AIMessage("Sorry."),
    ]
    messages = converse(fakes, tmp_path, turns, "find a jay")
    answers = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.status for m in answers] == ["error"] * 7
    texts = [str(m.content) for m in answers]
    assert texts[0].startswith("no imageloop index at") and texts[0].endswith(f"index {photos.resolve()} first")
    assert "is outside the folders" in texts[1]
    assert texts[2] == "invalid arguments: k: Input should be less than or equal to 50"
    assert texts[3] == "invalid arguments: give exactly one of query (text) or image (a path)"
    assert texts[4].startswith("retrieve_images: unknown argument 'top_kk'; expected some of index, query, image, k")
    assert texts[5].startswith("no search session '0123456789ab'")
    assert texts[6].startswith("invalid arguments: run_id")
    assert all("\n" not in text for text in texts)
