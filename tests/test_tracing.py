"""Model calls appear in a LangChain-callback trace (LangSmith's, or any handler's) as LLM, retriever and tool
runs under the node that made them, with their inputs, outputs and timings."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.langchain import LangChainTracer, wait_for_all_tracers
from langchain_core.tracers.schemas import Run
from PIL import Image

from imageloop.agents.vlms.openai_compatible import OpenAIVisionLanguageModel
from imageloop.config import Endpoint
from imageloop.graphs.genir import build_genir_graph
from imageloop.graphs.imagerag import build_imagerag_graph
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tracing import provider_and_model
from tests.fake_langsmith_server import FakeLangSmithServer
from tests.fake_openai_server import FakeOpenAIServer, chat_completion
from tests.fakes import ScriptedGenerator, ScriptedRankingRetriever, ScriptedRetriever, ScriptedVLM

NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}


@dataclass
class RecordingHandler(BaseCallbackHandler):
    """Every model, retriever and tool event, as a LangSmith tracer would receive them."""

    prompts: list[list[BaseMessage]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    documents: list[list[Document]] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    parents: dict[UUID, UUID | None] = field(default_factory=dict)

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        self.prompts.extend(messages)
        self.parents[run_id] = kwargs.get("parent_run_id")

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.answers.append(response.generations[0][0].text)

    def on_retriever_start(self, serialized: dict[str, Any], query: str, **kwargs: Any) -> None:
        self.queries.append(query)

    def on_retriever_end(self, documents: Any, **kwargs: Any) -> None:
        self.documents.append(list(documents))

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, **kwargs: Any) -> None:
        self.tools.append(kwargs.get("inputs") or {})


class RunCollector(BaseTracer):
    """The run tree a LangSmith tracer builds (names, types, timings), kept in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        self.runs.append(run)


def imagerag_run(tmp_path: Path, callbacks: list[Any]) -> dict[str, Any]:
    vlm = ScriptedVLM([NOT_ALIGNED, CAPTIONS, ALIGNED])
    retriever = ScriptedRetriever({"jay": [("jay1.png", 0.8)]}, root=tmp_path)
    graph = build_imagerag_graph(vlm, ScriptedGenerator(), retriever, ArtifactStore(tmp_path / "artifacts"))
    state: dict[str, Any] = graph.invoke({"prompt": "a blue jay"}, {"callbacks": callbacks}, version="v2").value
    return state


def test_a_callback_handler_sees_the_critics_question_and_answer(tmp_path: Path) -> None:
    handler = RecordingHandler()
    imagerag_run(tmp_path, [handler])
    assert json.loads(handler.answers[0]) == NOT_ALIGNED and json.loads(handler.answers[-1]) == ALIGNED
    first_question = " ".join(str(m.content) for m in handler.prompts[0])
    assert "a blue jay" in first_question and "data:image/png;base64," in first_question  # the draft, as a thumbnail


def test_a_callback_handler_sees_each_retrieval_query_and_its_scored_hits(tmp_path: Path) -> None:
    handler = RecordingHandler()
    imagerag_run(tmp_path, [handler])
    assert handler.queries == ["a blue jay with a blue crest"]
    [hits] = handler.documents
    assert [(Path(d.metadata["path"]).name, d.metadata["score"]) for d in hits] == [("jay1.png", 0.8)]


def test_a_callback_handler_sees_each_drawing_with_its_references(tmp_path: Path) -> None:
    handler = RecordingHandler()
    imagerag_run(tmp_path, [handler])
    draft, regenerated = handler.tools
    assert (draft["prompt"], draft["references"]) == ("a blue jay", [])
    assert [Path(p).name for p in regenerated["references"]] == ["jay1.png"]


def test_model_runs_nest_under_the_node_that_made_them_with_their_types_and_timings(tmp_path: Path) -> None:
    collector = RunCollector()
    imagerag_run(tmp_path, [collector])
    [root] = [run for run in collector.runs if run.parent_run_id is None]
    assert root.name == "imagerag"

    def under(run: Run, node: str) -> list[Run]:
        found = [child for child in run.child_runs if child.name == node]
        return found + [deep for child in run.child_runs for deep in under(child, node)]

    [critic, *_] = under(root, "critic")
    [llm] = [child for child in critic.child_runs if child.run_type == "llm"]
    assert llm.name == "scripted:vlm" and "aligned" in llm.outputs["generations"][0][0]["text"]
    [retrieve] = under(root, "retrieve")
    assert "retriever" in [child.run_type for child in retrieve.child_runs]
    [draft] = under(root, "generate_draft")
    [tool] = [child for child in draft.child_runs if child.run_type == "tool"]
    assert tool.name == "generate_image" and tool.end_time is not None and tool.end_time >= tool.start_time


def test_genir_traces_its_image_searches_too(tmp_path: Path) -> None:
    handler = RecordingHandler()
    retriever = ScriptedRankingRetriever([[("a", 0.9), ("b", 0.5)]])
    graph = build_genir_graph(
        ScriptedVLM([{"differences": "", "query": "a blue jay"}]),
        ScriptedGenerator(),
        retriever,
        ArtifactStore(tmp_path),
    )
    context = {"target_id": "a", "target_path": str(tmp_path / "a.png"), "rounds": 1}
    graph.invoke({"query": "x"}, {"callbacks": [handler]}, context=context)
    assert handler.queries and handler.queries[0].endswith(".png")  # image→image with the synthetic image
    assert [d.id for d in handler.documents[0]] == ["a", "b"]


# What LangSmith itself receives: the runs its own tracer posts, caught by a local LangSmith API.

PROVIDER_USAGE = [(812, 23), (301, 40), (815, 9)]  # prompt and completion tokens, as the provider counts them


@pytest.fixture
def langsmith() -> Iterator[FakeLangSmithServer]:
    with FakeLangSmithServer().serving() as server:
        yield server


@pytest.fixture
def traced_runs(
    openai_server: FakeOpenAIServer, langsmith: FakeLangSmithServer, tmp_path: Path
) -> list[dict[str, Any]]:
    """An ImageRAG run whose critic is an OpenAI model, traced to LangSmith: the model calls LangSmith received."""
    for answer, usage in zip((NOT_ALIGNED, CAPTIONS, ALIGNED), PROVIDER_USAGE, strict=True):
        openai_server.push("/v1/chat/completions", 200, chat_completion(json.dumps(answer), usage=usage))
    vlm = OpenAIVisionLanguageModel("gpt-4.1-mini", Endpoint(base_url=openai_server.base_url, api_key="sk-test"))
    retriever = ScriptedRetriever({"jay": [("jay1.png", 0.8)]}, root=tmp_path)
    graph = build_imagerag_graph(vlm, ScriptedGenerator(), retriever, ArtifactStore(tmp_path / "artifacts"))
    client = langsmith.client()
    graph.invoke({"prompt": "a blue jay"}, {"callbacks": [LangChainTracer(client=client, project_name="imageloop")]})
    wait_for_all_tracers()
    client.flush()
    return langsmith.llm_runs()


def test_each_model_call_reaches_langsmith_as_an_llm_run_with_the_providers_token_counts(
    traced_runs: list[dict[str, Any]],
) -> None:
    usage = [run["extra"]["metadata"]["usage_metadata"] for run in traced_runs]
    assert [(u["input_tokens"], u["output_tokens"], u["total_tokens"]) for u in usage] == [
        (read, written, read + written) for read, written in PROVIDER_USAGE
    ]
    answer = traced_runs[0]["outputs"]["generations"][0][0]["message"]["kwargs"]
    assert answer["usage_metadata"]["input_tokens"] == 812 and json.loads(answer["content"]) == NOT_ALIGNED


def test_a_model_run_names_the_provider_model_and_temperature_langsmith_prices_it_by(
    traced_runs: list[dict[str, Any]],
) -> None:
    for run in traced_runs:
        metadata = run["extra"]["metadata"]
        named = (metadata["ls_provider"], metadata["ls_model_name"], metadata["ls_model_type"])
        assert named == ("openai", "gpt-4.1-mini", "chat") and metadata["ls_temperature"] == 0.0
        assert run["name"] == "openai:gpt-4.1-mini" and metadata["langgraph_node"] in ("critic", "rewrite")


def test_a_model_run_shows_the_picture_the_model_judged(traced_runs: list[dict[str, Any]]) -> None:
    [question] = traced_runs[0]["inputs"]["messages"]
    blocks = [block for message in question for block in message["kwargs"]["content"] if isinstance(block, dict)]
    [picture] = [block for block in blocks if block["type"] == "image_url"]
    data = base64.b64decode(picture["image_url"]["url"].removeprefix("data:image/png;base64,"))
    assert Image.open(io.BytesIO(data)).size == (16, 16)  # the draft, whole (small enough to trace as it is)


@pytest.mark.parametrize(
    ("model_id", "named"),
    [
        ("openai:gpt-4.1-mini", ("openai", "gpt-4.1-mini")),
        ("langchain:anthropic:claude-sonnet-4-5", ("anthropic", "claude-sonnet-4-5")),
        ("transformers:Qwen/Qwen2.5-VL-7B-Instruct", ("transformers", "Qwen/Qwen2.5-VL-7B-Instruct")),
        ("tiny:qwen2-vl", ("tiny", "qwen2-vl")),
    ],
)
def test_a_model_id_names_the_provider_and_model_langsmith_expects(model_id: str, named: tuple[str, str]) -> None:
    assert provider_and_model(model_id) == named
