"""The ImageRAG loop's branches, driven by scripted fake backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from imageloop.graphs.imagerag import best_image, build_imagerag_graph, select_references
from imageloop.tools.artifacts import ArtifactStore
from tests.fakes import ScriptedGenerator, ScriptedRetriever, ScriptedVLM

PROMPT = "a Cyanocitta cristata perched on a snowy branch"
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["Cyanocitta cristata"]}
ALIGNED = {"aligned": True, "missing_concepts": []}
CAPTIONS = {"captions": [{"concept": "Cyanocitta cristata", "caption": "A blue jay with a blue crest on a branch"}]}
JAY_HITS = {"jay": [("jay1.png", 0.8), ("jay2.png", 0.4)]}


def run(
    tmp_path: Path,
    vlm_answers: list[Any],
    hits: dict[str, list[tuple[str, float]]] | None = None,
    generator: ScriptedGenerator | None = None,
    **knobs: Any,
) -> tuple[dict[str, Any], ScriptedVLM, ScriptedGenerator, ScriptedRetriever]:
    vlm = ScriptedVLM(list(vlm_answers))
    generator = generator or ScriptedGenerator()
    retriever = ScriptedRetriever(JAY_HITS if hits is None else hits, root=tmp_path)
    graph = build_imagerag_graph(vlm, generator, retriever, ArtifactStore(tmp_path / "artifacts"))
    state = graph.invoke({"prompt": PROMPT}, version="v2", context=knobs).value
    return state, vlm, generator, retriever


def nodes_visited(state: dict[str, Any]) -> list[str]:
    return [step["node"] for step in state["steps"]]


def test_aligned_draft_finishes_without_retrieval(tmp_path: Path) -> None:
    state, _, generator, retriever = run(tmp_path, [ALIGNED])
    assert nodes_visited(state) == ["prepare", "generate_draft", "critic", "finish"]
    assert state["stop_reason"] == "aligned"
    assert state["final_image"] == state["draft_image"]
    assert retriever.queries == []
    assert len(generator.requests) == 1


def test_misaligned_draft_regenerates_with_retrieved_references(tmp_path: Path) -> None:
    state, _, generator, retriever = run(tmp_path, [NOT_ALIGNED, CAPTIONS, ALIGNED])
    assert nodes_visited(state) == [
        "prepare", "generate_draft", "critic", "rewrite", "retrieve", "compose",
        "generate_with_references", "critic", "finish",
    ]  # fmt: skip
    assert retriever.queries == ["A blue jay with a blue crest on a branch"]
    refs = generator.requests[1].references
    assert [r.path.name for r in refs] == ["jay1.png"]  # top_k defaults to 1
    assert refs[0].concept == "Cyanocitta cristata"
    assert state["aligned"] is True and state["iteration"] == 1
    assert state["final_image"] != state["draft_image"]


def test_each_caption_is_retrieved_in_its_own_branch(tmp_path: Path) -> None:
    two_missing = {"aligned": False, "missing_concepts": ["Cyanocitta cristata", "ukiyo-e style"]}
    captions = {
        "captions": [
            {"concept": "Cyanocitta cristata", "caption": "a blue jay on a branch"},
            {"concept": "ukiyo-e style", "caption": "an ukiyo-e woodblock print of snow"},
        ]
    }
    hits = {"jay": [("jay1.png", 0.8)], "ukiyo": [("print.png", 0.7)]}
    state, _, generator, retriever = run(tmp_path, [two_missing, captions, ALIGNED], hits=hits)
    assert sorted(retriever.queries) == ["a blue jay on a branch", "an ukiyo-e woodblock print of snow"]
    assert nodes_visited(state).count("retrieve") == 2
    assert [r.path.name for r in generator.requests[1].references] == ["jay1.png", "print.png"]


def test_hits_below_similarity_threshold_are_dropped(tmp_path: Path) -> None:
    state, _, generator, _ = run(tmp_path, [NOT_ALIGNED, CAPTIONS, ALIGNED], top_k=2, similarity_threshold=0.5)
    assert [r.path.name for r in generator.requests[1].references] == ["jay1.png"]
    assert [r["score"] for r in state["references"]] == [0.8]


def test_no_reference_above_threshold_keeps_the_draft_and_says_why(tmp_path: Path) -> None:
    state, _, generator, _ = run(tmp_path, [NOT_ALIGNED, CAPTIONS], similarity_threshold=0.95)
    assert state["stop_reason"] == "no_reference_above_threshold"
    assert state["final_image"] == state["draft_image"]
    assert len(generator.requests) == 1


def test_iteration_cap_stops_the_loop_and_keeps_the_best_image(tmp_path: Path) -> None:
    worse = {"aligned": False, "missing_concepts": ["Cyanocitta cristata", "snowy branch"]}
    answers = [NOT_ALIGNED, CAPTIONS, worse, {"captions": [
        {"concept": "Cyanocitta cristata", "caption": "a blue jay"},
        {"concept": "snowy branch", "caption": "a snowy branch"},
    ]}, worse]  # fmt: skip
    state, vlm, generator, _ = run(tmp_path, answers, max_iterations=2)
    assert state["stop_reason"] == "max_iterations"
    assert state["iteration"] == 2
    assert len(generator.requests) == 3
    assert state["final_image"] == state["draft_image"]  # one missing concept beats two
    assert vlm.answers == []


def test_unanswerable_critic_falls_back_to_the_raw_prompt(tmp_path: Path) -> None:
    state, _, generator, retriever = run(
        tmp_path, ["I cannot help with that.", "still not json", ALIGNED], hits={"cristata": [("jay1.png", 0.9)]}
    )
    assert retriever.queries == [PROMPT]
    critic_step = next(s for s in state["steps"] if s["node"] == "critic")
    assert "raw prompt" in critic_step["decision"]
    assert len(generator.requests[1].references) == 1


def test_critic_answer_is_repaired_once(tmp_path: Path) -> None:
    state, vlm, _, _ = run(tmp_path, ["aligned: yes", ALIGNED])
    assert state["stop_reason"] == "aligned"
    repair_messages = vlm.calls[1][0]
    assert "could not be used" in repair_messages[-1].text


def test_unanswerable_rewriter_retrieves_with_concept_words(tmp_path: Path) -> None:
    hits = {"cristata": [("jay1.png", 0.9)]}
    state, _, _, retriever = run(tmp_path, [NOT_ALIGNED, "nope", "nope", ALIGNED], hits=hits)
    assert retriever.queries == ["Cyanocitta cristata"]
    assert state["aligned"] is True


def test_generation_mode_plans_concepts_without_a_draft(tmp_path: Path) -> None:
    plan = {"missing_concepts": ["Cyanocitta cristata"]}
    state, vlm, generator, _ = run(tmp_path, [plan, CAPTIONS, ALIGNED], mode="generation")
    assert "generate_draft" not in nodes_visited(state)
    assert state["draft_image"] is None
    assert vlm.calls[0][0][-1].images == ()  # planning sees no image
    assert len(generator.requests) == 1 and len(generator.requests[0].references) == 1


def test_generation_mode_with_nothing_to_retrieve_generates_from_text(tmp_path: Path) -> None:
    state, _, generator, retriever = run(tmp_path, [{"missing_concepts": []}, ALIGNED], mode="generation")
    assert retriever.queries == []
    assert generator.requests[0].references == ()
    assert state["final_image"] is not None and state["stop_reason"] == "aligned"


def test_references_are_trimmed_to_the_generator_capacity(tmp_path: Path) -> None:
    hits = {"jay": [("a.png", 0.5), ("b.png", 0.9), ("c.png", 0.7)]}
    generator = ScriptedGenerator(max_references=2)
    state, _, generator, _ = run(tmp_path, [NOT_ALIGNED, CAPTIONS, ALIGNED], hits=hits, generator=generator, top_k=3)
    assert [r.path.name for r in generator.requests[1].references] == ["b.png", "c.png"]
    compose = next(s for s in state["steps"] if s["node"] == "compose")
    assert "trimmed 1" in compose["decision"]


def test_a_reference_whose_file_vanished_is_skipped_with_a_note(tmp_path: Path) -> None:
    hits = {"jay": [("jay1.png", 0.8), ("gone.png", 0.7)]}
    retriever = ScriptedRetriever(hits, root=tmp_path)
    (tmp_path / "gone.png").unlink()  # deleted after it was indexed
    vlm, generator = ScriptedVLM([NOT_ALIGNED, CAPTIONS, ALIGNED]), ScriptedGenerator()
    graph = build_imagerag_graph(vlm, generator, retriever, ArtifactStore(tmp_path / "a"))
    state = graph.invoke({"prompt": PROMPT}, version="v2", context={"top_k": 2}).value

    assert state["stop_reason"] == "aligned"
    assert [r.path.name for r in generator.requests[1].references] == ["jay1.png"]
    compose = next(s for s in state["steps"] if s["node"] == "compose")
    assert "skipped 1 reference(s) whose file is gone" in compose["decision"]


def test_a_second_run_on_the_same_thread_inherits_nothing(tmp_path: Path) -> None:
    vlm = ScriptedVLM([NOT_ALIGNED, CAPTIONS, ALIGNED, ALIGNED])
    generator = ScriptedGenerator()
    graph = build_imagerag_graph(
        vlm, generator, ScriptedRetriever(JAY_HITS, root=tmp_path), ArtifactStore(tmp_path / "a"), InMemorySaver()
    )
    config = {"configurable": {"thread_id": "reused"}}
    first = graph.invoke({"prompt": PROMPT}, config, version="v2", context={"similarity_threshold": 0.1, "top_k": 2})
    second = graph.invoke({"prompt": "a cat"}, config, version="v2").value

    assert len(first.value["references"]) == 2
    assert generator.requests[-1].prompt == "a cat" and generator.requests[-1].references == ()  # no jay.png
    assert (second["stop_reason"], second["iteration"], second["references"]) == ("aligned", 0, [])
    state = graph.get_state(config).values
    assert (state["knobs"].similarity_threshold, state["knobs"].top_k, state["hits"]) == (None, 1, [])
    assert [s["node"] for s in second["steps"]] == ["prepare", "generate_draft", "critic", "finish"]


def test_a_run_capped_after_a_thresholded_run_reports_its_own_reason(tmp_path: Path) -> None:
    vlm = ScriptedVLM([NOT_ALIGNED, CAPTIONS, NOT_ALIGNED, CAPTIONS, NOT_ALIGNED])
    graph = build_imagerag_graph(
        vlm, ScriptedGenerator(), ScriptedRetriever(JAY_HITS, root=tmp_path), ArtifactStore(tmp_path / "a"),
        InMemorySaver(),
    )  # fmt: skip
    config = {"configurable": {"thread_id": "reused"}}
    first = graph.invoke({"prompt": PROMPT}, config, version="v2", context={"similarity_threshold": 0.99}).value
    second = graph.invoke({"prompt": PROMPT}, config, version="v2", context={"max_iterations": 1}).value
    assert first["stop_reason"] == "no_reference_above_threshold"
    assert (second["stop_reason"], second["iteration"]) == ("max_iterations", 1)


def test_checkpoints_hold_artifact_ids_not_pixels(tmp_path: Path) -> None:
    vlm = ScriptedVLM([NOT_ALIGNED, CAPTIONS, ALIGNED])
    saver = InMemorySaver()
    graph = build_imagerag_graph(
        vlm, ScriptedGenerator(), ScriptedRetriever(JAY_HITS, root=tmp_path), ArtifactStore(tmp_path / "a"), saver
    )
    config = {"configurable": {"thread_id": "t1"}}
    graph.invoke({"prompt": PROMPT}, config, version="v2")
    values = graph.get_state(config).values
    encoded = json.dumps(values, default=str)
    assert len(encoded) < 20_000
    assert (tmp_path / "a" / f"{values['final_image']}.png").exists()


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ([("a", False, 2), ("b", False, 1), ("c", False, 1)], "c"),
        ([("a", True, 0), ("b", False, 1)], "a"),
        ([("a", False, None), ("b", False, None)], "b"),
    ],
)
def test_best_image_prefers_aligned_then_fewest_missing_then_latest(
    images: list[tuple[str, bool, int | None]], expected: str
) -> None:
    records = [
        {"artifact": a, "iteration": i, "prompt_used": "", "aligned": al, "missing": m}
        for i, (a, al, m) in enumerate(images)
    ]
    best = best_image(records)  # type: ignore[arg-type]
    assert best is not None and best["artifact"] == expected


def test_select_references_keeps_best_score_per_image_in_caption_order() -> None:
    def hit(concept: str, image_id: str, score: float) -> dict[str, Any]:
        return {"iteration": 0, "concept": concept, "query": concept, "id": image_id, "path": image_id,
                "caption": "", "score": score}  # fmt: skip

    kept, trimmed = select_references(
        [hit("x", "1", 0.2), hit("y", "2", 0.9), hit("y", "1", 0.6)],  # type: ignore[list-item]
        max_references=1,
    )
    assert [h["id"] for h in kept] == ["2"] and [h["id"] for h in trimmed] == ["1"]
