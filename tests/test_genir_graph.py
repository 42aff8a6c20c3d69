"""The GenIR loop's branches, driven by scripted fake backends."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command

from imageloop.graphs.genir import FoundError, build_genir_graph, parse_found, pick_shown_kind, resolve_found
from imageloop.knobs import SimulatedUserKnobs
from imageloop.tools.artifacts import ArtifactStore
from tests.fakes import ScriptedGenerator, ScriptedRankingRetriever, ScriptedVLM

MISS = [("a", 0.5), ("b", 0.4), ("t", 0.3)]  # target "t" at rank 2
HIT = [("t", 0.95), ("a", 0.5)]


def turn(query: str) -> dict[str, str]:
    return {"differences": "the bird is blue, not brown", "query": query}


def simulated(
    tmp_path: Path, vlm_answers: list[Any], rankings: list[list[tuple[str, float]]], **knobs: Any
) -> tuple[dict[str, Any], ScriptedVLM, ScriptedGenerator, ScriptedRankingRetriever]:
    """A simulated user's search: it first describes its target as "a bird", then answers `vlm_answers`."""
    vlm = ScriptedVLM([{"differences": "", "query": "a bird"}, *vlm_answers])
    generator = ScriptedGenerator()
    retriever = ScriptedRankingRetriever(rankings, route=knobs.pop("route", "image"))
    graph = build_genir_graph(vlm, generator, retriever, ArtifactStore(tmp_path / "artifacts"))
    target = tmp_path / "target.png"
    context = {"target_id": "t", "target_path": str(target), "k": 2, **knobs}
    state = graph.invoke({}, version="v2", context=context).value
    return state, vlm, generator, retriever


def test_simulated_user_search_stops_when_the_target_enters_the_top_k(tmp_path: Path) -> None:
    state, _, generator, retriever = simulated(tmp_path, [turn("a blue jay")], [MISS, HIT])
    assert state["stop_reason"] == "found" and state["found_id"] == "t"
    assert [r["target_rank"] for r in state["rounds"]] == [2, 0]
    assert [r["query"] for r in state["rounds"]] == ["a bird", "a blue jay"]
    assert len(generator.requests) == 2 and [g.prompt for g in generator.requests] == ["a bird", "a blue jay"]
    assert [kind for kind, _ in retriever.calls] == ["image", "image"]  # image→image with the synthetic image


def test_max_rounds_counts_refinements_after_round_zero_as_the_paper_does(tmp_path: Path) -> None:
    state, vlm, _, _ = simulated(tmp_path, [turn("q1"), turn("q2")], [MISS], rounds=2)
    assert state["stop_reason"] == "max_rounds"
    assert [r["round"] for r in state["rounds"]] == [0, 1, 2]
    assert len(vlm.calls) == 3  # the description, then feedback after rounds 0 and 1 only


def test_zero_max_rounds_plays_round_zero_alone(tmp_path: Path) -> None:
    state, vlm, _, _ = simulated(tmp_path, [], [MISS], rounds=0)
    assert [r["round"] for r in state["rounds"]] == [0] and len(vlm.calls) == 1


def test_verbal_feedback_draws_nothing_and_retrieves_by_text(tmp_path: Path) -> None:
    state, vlm, generator, retriever = simulated(tmp_path, [turn("q1")], [MISS, HIT], feedback="verbal")
    assert generator.requests == []
    assert retriever.calls == [("text", "a bird"), ("text", "q1")]
    assert len(vlm.calls[1][0][0].images) == 1  # the simulated user sees only its target
    assert state["rounds"][0]["feedback_kind"] == "verbal"


def test_prediction_feedback_shows_the_top_retrieved_image(tmp_path: Path) -> None:
    _, vlm, generator, _ = simulated(tmp_path, [turn("q1")], [MISS, HIT], feedback="prediction")
    assert generator.requests == []
    target, shown = vlm.calls[1][0][0].images
    assert target.name == "target.png"
    assert shown == Path("/index/a.png")


def test_hybrid_shows_the_top_hit_once_retrieval_is_confident(tmp_path: Path) -> None:
    confident_miss = [("a", 0.92), ("b", 0.4), ("t", 0.3)]
    state, _, generator, _ = simulated(
        tmp_path, [turn("q1"), turn("q2")], [confident_miss, confident_miss, HIT], feedback="hybrid", rounds=3
    )
    assert [r["feedback_kind"] for r in state["rounds"]] == ["visual", "prediction", "prediction"]
    assert len(generator.requests) == 1


def test_caption_route_index_is_searched_with_the_query_text(tmp_path: Path) -> None:
    _, _, generator, retriever = simulated(tmp_path, [turn("q1")], [MISS, HIT], route="caption")
    assert len(generator.requests) == 2  # the synthetic image is still shown to the user
    assert [kind for kind, _ in retriever.calls] == ["text", "text"]


def test_unusable_simulated_user_keeps_the_previous_query(tmp_path: Path) -> None:
    state, _, _, _ = simulated(tmp_path, ["no idea", "still no idea"], [MISS, HIT])
    assert [r["query"] for r in state["rounds"]] == ["a bird", "a bird"]
    feedback_step = next(s for s in state["steps"] if s["node"] == "feedback")
    assert "nothing usable" in feedback_step["decision"]


def test_a_simulated_users_first_query_is_its_description_of_the_target(tmp_path: Path) -> None:
    state, vlm, _, _ = simulated(tmp_path, [], [HIT])
    assert state["rounds"][0]["query"] == "a bird"
    assert vlm.calls[0][0][0].images == (tmp_path / "target.png",)


def test_a_checkpoint_keeps_the_targets_rank_not_the_deep_ranking(tmp_path: Path) -> None:
    state, _, _, _ = simulated(tmp_path, [turn("q1")], [MISS, HIT], rank_depth=1000)
    assert "ranked_ids" not in state and [r["target_rank"] for r in state["rounds"]] == [2, 0]


def person_graph(tmp_path: Path, vlm_answers: list[Any], rankings: list[list[tuple[str, float]]], saver: Any) -> Any:
    return build_genir_graph(
        ScriptedVLM(list(vlm_answers)), ScriptedGenerator(), ScriptedRankingRetriever(rankings),
        ArtifactStore(tmp_path / "artifacts"), saver,
    )  # fmt: skip


def test_person_feedback_interrupts_and_resumes_without_redrawing(tmp_path: Path) -> None:
    graph = person_graph(tmp_path, [{"query": "a blue jay on a snowy branch"}], [MISS], InMemorySaver())
    config = {"configurable": {"thread_id": "s1"}}
    first = graph.invoke({"query": "a bird"}, config, version="v2", context={"rounds": 3})
    [asked] = first.interrupts
    assert asked.value["query"] == "a bird" and Path(asked.value["synthetic_image"]).exists()
    assert [r["id"] for r in asked.value["retrieved"]] == ["a", "b", "t"][:10]
    second = graph.invoke(Command(resume="bluer, and in snow"), config, version="v2")
    [asked_again] = second.interrupts
    assert asked_again.value["round"] == 1 and asked_again.value["query"] == "a blue jay on a snowy branch"
    done = graph.invoke(Command(resume="found: a"), config, version="v2").value
    assert done["stop_reason"] == "found" and done["found_id"] == "a"
    assert [r["feedback"] for r in done["rounds"]] == ["bluer, and in snow", "found: a"]
    assert sum(s["node"] == "generate_synthetic" for s in done["steps"]) == 2  # one drawing per round


def test_empty_feedback_is_asked_again(tmp_path: Path) -> None:
    graph = person_graph(tmp_path, [], [MISS], InMemorySaver())
    config = {"configurable": {"thread_id": "s2"}}
    graph.invoke({"query": "a bird"}, config, version="v2")
    again = graph.invoke(Command(resume="   "), config, version="v2")
    [asked] = again.interrupts
    assert asked.value["ask"].startswith("Empty feedback")
    assert graph.invoke(Command(resume="found: b"), config, version="v2").value["found_id"] == "b"


@pytest.mark.parametrize(
    ("answer", "why"),
    [("found: 9", "is not a position shown (1..3)"), ("found: 0", "is not a position shown (1..3)"),
     ("found: zz", "is not one of the results shown"), ("found: ", "is not one of the results shown")],
)  # fmt: skip
def test_a_found_answer_naming_no_shown_result_is_asked_again(tmp_path: Path, answer: str, why: str) -> None:
    graph = person_graph(tmp_path, [], [MISS], InMemorySaver())
    config = {"configurable": {"thread_id": "s4"}}
    graph.invoke({"query": "a bird"}, config, version="v2")
    again = graph.invoke(Command(resume=answer), config, version="v2")
    [asked] = again.interrupts
    assert why in asked.value["ask"] and "1 a.png, 2 b.png, 3 t.png" in asked.value["ask"]
    assert graph.invoke(Command(resume="found: 2"), config, version="v2").value["found_id"] == "b"


def test_results_are_named_from_1_by_position_or_by_file_name() -> None:
    shown = [{"id": "aaa", "path": "x/jay.png"}, {"id": "bbb", "path": "x/snow.png"}]
    assert [resolve_found(answer, shown) for answer in ("found: 1", "found: 2", "found: snow")] == ["aaa", "bbb", "bbb"]


def test_an_ambiguous_id_prefix_is_asked_again() -> None:
    shown = [{"id": "abc1", "path": "a.png"}, {"id": "abc2", "path": "b.png"}]
    with pytest.raises(FoundError, match="matches several results"):
        resolve_found("found: abc", shown)
    assert resolve_found("found: abc2", shown) == "abc2" and resolve_found("bluer", shown) is None


def test_a_second_run_on_the_same_thread_starts_clean(tmp_path: Path) -> None:
    vlm = ScriptedVLM([{"differences": "", "query": "a bird"}, turn("q1")])
    graph = build_genir_graph(
        vlm, ScriptedGenerator(), ScriptedRankingRetriever([MISS]), ArtifactStore(tmp_path / "a"), InMemorySaver()
    )
    config = {"configurable": {"thread_id": "shared"}}
    target = {"target_id": "t", "target_path": str(tmp_path / "t.png")}
    first = graph.invoke({}, config, version="v2", context={**target, "rounds": 1, "k": 2, "feedback": "verbal"}).value
    second = graph.invoke({"query": "a cat"}, config, version="v2")

    assert first["stop_reason"] == "max_rounds" and len(first["rounds"]) == 2
    [asked] = second.interrupts  # a person's search: no target, default feedback and rounds
    state = graph.get_state(config).values
    knobs = state["knobs"]
    assert (state["user"], state["target_id"], knobs.feedback, knobs.rounds) == ("person", None, "visual", 10)
    assert [r["query"] for r in state["rounds"]] == ["a cat"] and asked.value["round"] == 0
    assert state["steps"][0]["node"] == "prepare" and state["found_id"] is None and knobs.k == 10


def test_a_search_resumes_from_a_sqlite_checkpoint_in_a_new_graph(tmp_path: Path) -> None:
    db = tmp_path / "sessions.sqlite"
    config = {"configurable": {"thread_id": "s3"}}
    with sqlite3.connect(db, check_same_thread=False) as conn:
        before = person_graph(tmp_path, [], [MISS], SqliteSaver(conn))
        before.invoke({"query": "a bird"}, config, version="v2")
    with sqlite3.connect(db, check_same_thread=False) as conn:
        after = person_graph(tmp_path, [], [MISS], SqliteSaver(conn))
        state = after.invoke(Command(resume="found: t"), config, version="v2").value
    assert state["found_id"] == "t"
    assert sum(s["node"] == "generate_synthetic" for s in state["steps"]) == 1


def test_graph_draws_every_node_for_studio(tmp_path: Path) -> None:
    mermaid = person_graph(tmp_path, [], [MISS], None).get_graph().draw_mermaid()
    for node in ("describe_target", "generate_synthetic", "retrieve", "present", "feedback", "rewrite", "finish"):
        assert node in mermaid


def test_parse_found_reads_what_the_answer_names() -> None:
    assert parse_found("found: abc") == "abc"
    assert parse_found("FOUND:  x1 ") == "x1"
    assert parse_found("not found yet") is None
    assert parse_found("found:") == ""


def test_hybrid_router_starts_visual() -> None:
    state: Any = {"knobs": SimulatedUserKnobs(feedback="hybrid", hybrid_threshold=0.9), "rounds": []}
    assert pick_shown_kind(state) == "visual"
