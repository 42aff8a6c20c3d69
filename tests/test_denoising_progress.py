"""Denoising progress from real (tiny) diffusers pipelines, emitted once on LangGraph's custom stream: what a
library user reads with `graph.stream(..., stream_mode="custom")` and every face renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langgraph.graph import START, StateGraph
from typing_extensions import TypedDict

from imageloop.graphs.imagerag import build_imagerag_graph
from imageloop.knobs import ImageRAGKnobs
from imageloop.progress import progress_event
from imageloop.protocols import ImageGenerator
from imageloop.tools.artifacts import ArtifactStore
from tests.fakes import ScriptedRetriever, ScriptedVLM
from tests.test_diffusers_generators import PROVIDERS, build, model_dirs, request, tiny_cache

__all__ = ["model_dirs", "tiny_cache"]  # session fixtures shared with the generator tests

NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay on a branch"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}


class Drawn(TypedDict, total=False):
    size: tuple[int, int]


def drawing_graph(generator: ImageGenerator) -> Any:
    """One node that draws, as a loop's generation node does."""

    def draw(state: Drawn) -> Drawn:
        return {"size": generator.generate(request()).image.size}

    return StateGraph(Drawn).add_node("draw", draw).add_edge(START, "draw").compile()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_backend_reports_every_denoising_step_on_the_custom_stream(
    provider: str, model_dirs: dict[str, Path]
) -> None:
    graph = drawing_graph(build(provider, model_dirs))
    events = [progress_event(chunk) for chunk in graph.stream({}, stream_mode="custom")]
    assert events == [
        {"node": "draw", "what": "denoising", "done": 1, "total": 2},
        {"node": "draw", "what": "denoising", "done": 2, "total": 2},
    ]


def test_outside_a_graph_a_backend_draws_without_reporting_anywhere(model_dirs: dict[str, Path]) -> None:
    assert build("diffusers", model_dirs).generate(request()).image.size == (64, 64)


def test_an_imagerag_run_streams_the_draft_and_the_regeneration_step_by_step(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    vlm = ScriptedVLM([NOT_ALIGNED, CAPTIONS, ALIGNED])
    retriever = ScriptedRetriever({"jay": [("jay.png", 0.9)]}, root=tmp_path)
    graph = build_imagerag_graph(
        vlm, build("omnigen", model_dirs), retriever, ArtifactStore(tmp_path / "artifacts"),
        defaults=ImageRAGKnobs(size=(64, 64), steps=2),
    )  # fmt: skip
    events = [progress_event(chunk) for chunk in graph.stream({"prompt": "a blue jay"}, stream_mode="custom")]
    assert [(e["node"], e["done"]) for e in events if e] == [
        ("generate_draft", 1), ("generate_draft", 2), ("generate_with_references", 1), ("generate_with_references", 2),
    ]  # fmt: skip
