"""The RAGE graph: a person (or the top N) picks from the catalogue, the picks go in order with the prompt verbatim."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from imageloop.errors import ConfigError
from imageloop.graphs.rage import (
    Candidate,
    RAGEContext,
    RAGEGraph,
    ReviewError,
    SelectionError,
    build_rage_graph,
    resolve_picks,
    resolve_review,
    resolve_selection,
)
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever
from tests.fakes import FakeHashEmbedder, ScriptedGenerator, ScriptedVLM
from tests.image_folders import product_catalogue

PROMPT = "the red canvas sneaker and the canvas backpack on a beach at sunset"
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["beach"]}
ALIGNED = {"aligned": True, "missing_concepts": []}


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[Retriever]:
    folder = product_catalogue(tmp_path / "catalogue")
    embedder = FakeHashEmbedder()
    index_folder(folder, embedder, None, progress=False)
    index = open_index(folder)
    yield Retriever(index, embedder)
    index.close()


class Run:
    """One graph on one thread, with the scripted generator and VLM it runs on."""

    def __init__(self, retriever: Retriever, artifacts: Path, vlm_answers: list[Any] | None = None, **gen: Any) -> None:
        self.generator = ScriptedGenerator(**gen)
        self.vlm = ScriptedVLM(list(vlm_answers or []))
        self.artifacts = ArtifactStore(artifacts)
        self.graph: RAGEGraph = build_rage_graph(self.vlm, self.generator, retriever, self.artifacts, InMemorySaver())
        self.thread = {"configurable": {"thread_id": "t"}}

    def start(self, prompt: str = PROMPT, **context: Any) -> Any:
        return self.graph.invoke({"prompt": prompt}, self.thread, version="v2", context=RAGEContext(**context))

    def answer(self, value: Any) -> Any:
        return self.graph.invoke(Command(resume=value), self.thread, version="v2")

    def question(self, result: Any) -> dict[str, Any]:
        [pending] = result.interrupts
        question: dict[str, Any] = pending.value
        return question


def names(paths: list[str] | list[Path]) -> list[str]:
    return [Path(p).name for p in paths]


def position(question: dict[str, Any], name: str) -> str:
    return str(next(c["position"] for c in question["candidates"] if Path(c["path"]).name == name))


# Picking


def test_select_interrupts_with_the_candidates_before_anything_is_generated(
    catalogue: Retriever, tmp_path: Path
) -> None:
    run = Run(catalogue, tmp_path / "artifacts")

    question = run.question(run.start())

    assert question["kind"] == "select" and question["prompt"] == PROMPT
    candidates = question["candidates"]
    assert [c["position"] for c in candidates] == list(range(1, len(candidates) + 1))
    assert set(candidates[0]) == {"position", "id", "path", "caption", "score"}
    assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)
    assert run.generator.requests == []


def test_the_picks_reach_the_generator_in_pick_order_with_the_prompt_verbatim(
    catalogue: Retriever, tmp_path: Path
) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    question = run.question(run.start())

    done = run.answer({"selected": [position(question, "backpack.png"), "red-sneaker.png"]}).value

    [request] = run.generator.requests
    assert (request.prompt, request.template) == (PROMPT, "verbatim")
    assert names([r.path for r in request.references]) == ["backpack.png", "red-sneaker.png"]
    assert names([c["path"] for c in done["selected"]]) == ["backpack.png", "red-sneaker.png"]
    [image] = done["images"]
    assert done["final_image"] == image["artifact"] and done["stop_reason"] == "generated"
    assert names(image["references"]) == ["backpack.png", "red-sneaker.png"]


def test_an_invalid_pick_is_asked_again_with_the_valid_choices_and_nothing_is_generated(
    catalogue: Retriever, tmp_path: Path
) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start()

    again = run.question(run.answer({"selected": ["1", "no-such-product"]}))

    assert again["kind"] == "select"
    assert "'no-such-product' is not a candidate shown" in again["ask"] and "1 " in again["ask"]
    assert run.generator.requests == []
    assert run.answer({"selected": ["1"]}).value["stop_reason"] == "generated"


def test_picking_nothing_with_a_new_prompt_searches_again(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start("a ceramic mug")

    question = run.question(run.answer({"selected": [], "prompt": "a canvas tote bag"}))

    assert question["prompt"] == "a canvas tote bag"
    assert Path(question["candidates"][0]["path"]).name == "tote.png"
    assert run.generator.requests == []


def test_picking_nothing_ends_the_run_without_generating(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start()

    done = run.answer({"selected": []}).value

    assert (done["stop_reason"], done["final_image"], done["images"]) == ("no_selection", None, [])
    assert run.generator.requests == []


def test_the_where_filter_keeps_the_candidates_to_matching_metadata(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")

    question = run.question(run.start(where={"tags": "bag"}))

    assert sorted(names([c["path"] for c in question["candidates"]])) == ["backpack.png", "tote.png"]


# Scripted picks


def test_auto_select_picks_the_top_n_without_a_person(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")

    result = run.start("a red canvas sneaker", auto_select=2, k=4)

    assert result.interrupts == ()
    done = result.value
    assert [c["id"] for c in done["selected"]] == [c["id"] for c in done["candidates"][:2]]
    [request] = run.generator.requests
    assert names([r.path for r in request.references]) == names([c["path"] for c in done["candidates"][:2]])


def test_auto_select_with_nothing_above_the_threshold_stops_without_generating(
    catalogue: Retriever, tmp_path: Path
) -> None:
    run = Run(catalogue, tmp_path / "artifacts")

    done = run.start(auto_select=2, similarity_threshold=0.999).value

    assert (done["candidates"], done["stop_reason"]) == ([], "no_candidates")
    assert run.generator.requests == []


def test_auto_select_keeps_only_candidates_at_or_above_the_threshold(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    scores = {c["id"]: c["score"] for c in run.question(run.start("a red canvas sneaker"))["candidates"]}
    ranked = sorted(scores.values(), reverse=True)
    threshold = ranked[1] - 1e-5  # exactly two candidates reach it (scores are shown rounded)
    assert ranked[2] < threshold

    done = Run(catalogue, tmp_path / "other").start(
        "a red canvas sneaker", auto_select=5, similarity_threshold=threshold
    )

    assert len(done.value["selected"]) == 2 and all(c["score"] >= threshold for c in done.value["selected"])


# Generating and reviewing


def test_resuming_a_review_never_generates_again(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start(review="person")

    review = run.question(run.answer({"selected": ["1", "2"]}))
    assert review["kind"] == "review" and review["choices"] == ["accept", "regenerate", "reselect"]
    assert Path(review["image"]).is_file() and len(run.generator.requests) == 1

    done = run.answer("accept").value

    assert len(run.generator.requests) == 1
    [image] = done["images"]
    assert (done["stop_reason"], done["final_image"], image["review"]) == ("accepted", image["artifact"], "accept")


def test_an_unknown_review_answer_is_asked_again(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start(review="person")
    run.answer(["1"])

    again = run.question(run.answer("maybe"))

    assert again["kind"] == "review" and "accept, regenerate, reselect" in again["ask"]
    assert len(run.generator.requests) == 1


def test_regenerating_draws_with_the_next_seed_and_a_new_prompt_verbatim_up_to_the_cap(
    catalogue: Retriever, tmp_path: Path
) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start(review="person", max_generations=2, seed=7)
    run.answer(["1"])

    done = run.answer({"action": "regenerate", "prompt": "the same sneaker, at night"})

    assert done.interrupts == ()  # the cap: a person is not asked about the last allowed image
    assert [r.seed for r in run.generator.requests] == [7, 8]
    assert run.generator.requests[1].prompt == "the same sneaker, at night"
    assert (done.value["stop_reason"], len(done.value["images"])) == ("max_generations", 2)
    assert done.value["final_image"] == done.value["images"][-1]["artifact"]


def test_reselect_shows_the_same_candidates_and_generates_with_the_new_picks(
    catalogue: Retriever, tmp_path: Path
) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    first = run.question(run.start(review="person"))
    run.answer(["1"])

    again = run.question(run.answer("reselect"))
    assert again["kind"] == "select" and again["candidates"] == first["candidates"]
    run.answer(["2"])

    assert [r.references[0].path.name for r in run.generator.requests] == names(
        [first["candidates"][0]["path"], first["candidates"][1]["path"]]
    )


def test_a_critic_review_regenerates_until_aligned(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts", vlm_answers=[NOT_ALIGNED, ALIGNED])

    done = run.start(review="critic", auto_select=1, max_generations=3).value

    assert (done["stop_reason"], len(run.generator.requests)) == ("aligned", 2)
    assert [image["aligned"] for image in done["images"]] == [False, True]
    assert done["final_image"] == done["images"][1]["artifact"]
    assert done["images"][0]["review"] == "missing beach"


def test_the_generation_cap_stops_a_critic_that_is_never_satisfied(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts", vlm_answers=[NOT_ALIGNED, NOT_ALIGNED])

    done = run.start(review="critic", auto_select=1, max_generations=2).value

    assert (done["stop_reason"], len(run.generator.requests), run.vlm.answers) == ("max_generations", 2, [])


def test_a_critic_that_cannot_answer_keeps_the_image(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts", vlm_answers=["no json here", "still none"])

    done = run.start(review="critic", auto_select=1).value

    assert (done["stop_reason"], len(done["images"])) == ("critic_failed", 1)
    assert done["final_image"] == done["images"][0]["artifact"]


def test_a_critic_review_without_a_vlm_is_refused_before_retrieving(catalogue: Retriever, tmp_path: Path) -> None:
    graph = build_rage_graph(None, ScriptedGenerator(), catalogue, ArtifactStore(tmp_path / "a"))

    with pytest.raises(ConfigError, match="critic review asks a VLM"):
        graph.invoke({"prompt": PROMPT}, context=RAGEContext(review="critic", auto_select=1))


def test_a_backend_taking_fewer_references_keeps_the_first_picks_and_names_the_dropped(
    catalogue: Retriever, tmp_path: Path
) -> None:
    run = Run(catalogue, tmp_path / "artifacts", max_references=1)
    run.start()

    done = run.answer(["tote.png", "mug.png", "backpack"]).value

    [request] = run.generator.requests
    assert names([r.path for r in request.references]) == ["tote.png"]
    [image] = done["images"]
    assert names(image["references"]) == ["tote.png"]
    [note] = image["notes"]
    assert "at most 1 references" in note and "mug.png" in note and "backpack.png" in note


def test_a_picked_file_gone_since_indexing_is_left_out_with_a_note(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start()
    (catalogue.index.root / "mug.png").unlink()

    done = run.answer(["mug.png", "tote.png"]).value

    [request] = run.generator.requests
    assert names([r.path for r in request.references]) == ["tote.png"]
    assert done["images"][0]["notes"] == ["mug.png is gone from the catalogue: left out"]


# Runs and threads


def test_a_second_run_on_the_same_thread_is_independent(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts", vlm_answers=[NOT_ALIGNED, ALIGNED])
    first = run.start(review="critic", auto_select=2, max_generations=3).value

    second = run.start("a white ceramic mug", auto_select=1).value

    assert len(first["images"]) == 2 and len(second["images"]) == 1
    assert second["stop_reason"] == "generated" and Path(second["selected"][0]["path"]).name == "mug.png"
    assert [s["node"] for s in second["steps"]] == ["prepare", "retrieve", "select", "generate", "finish"]
    assert run.graph.get_state(run.thread).values["knobs"].review == "none"  # the first run's knobs did not stay


def test_state_holds_artifact_ids_and_paths_never_pixels(catalogue: Retriever, tmp_path: Path) -> None:
    run = Run(catalogue, tmp_path / "artifacts")
    run.start(review="person")
    run.answer(["1"])

    values = run.graph.get_state(run.thread).values

    json.dumps({**values, "knobs": values["knobs"].record()})  # nothing but small JSON values and the knob model
    assert run.artifacts.path(values["images"][0]["artifact"]).is_file()


# The one selection rule


def candidates(*names_and_ids: tuple[str, str]) -> list[Candidate]:
    return [
        Candidate(position=i, id=image_id, path=f"/catalogue/{name}", caption=name, score=1.0 - i / 10)
        for i, (name, image_id) in enumerate(names_and_ids, start=1)
    ]


SHOWN = candidates(("shoe.png", "a1b2c3"), ("bag.png", "a1ffee"), ("12.png", "bbbbbb"), ("shoe.jpg", "cccccc"))


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ("2, 1", ["bag.png", "shoe.png"]),
        (["3"], ["12.png"]),
        ([2, "bag"], ["bag.png"]),  # a repeat counts once
        ("a1b", ["shoe.png"]),
        ("bag.png 12.png", ["bag.png", "12.png"]),
        ("bbbbbb", ["12.png"]),
        ([], []),
    ],
)
def test_picks_are_positions_ids_or_their_prefixes_or_file_names(items: Any, expected: list[str]) -> None:
    assert names([c["path"] for c in resolve_picks(items, SHOWN)]) == expected


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ("5", "'5' is not a position shown (1..4)"),
        ("0", "'0' is not a position shown"),
        ("12", "'12' is not a position shown"),  # a number is a position, never an id prefix or a stem
        ("a1", "'a1' matches several candidates"),
        ("shoe", "'shoe' matches several candidates"),
        ("boot.png", "'boot.png' is not a candidate shown"),
    ],
)
def test_a_pick_naming_no_single_candidate_is_refused_with_the_valid_choices(items: Any, message: str) -> None:
    with pytest.raises(SelectionError) as refused:
        resolve_picks(items, SHOWN)
    assert message in str(refused.value)
    assert str(refused.value).endswith(": 1 shoe.png, 2 bag.png, 3 12.png, 4 shoe.jpg")


def test_a_pick_that_is_not_text_or_a_number_is_refused() -> None:
    with pytest.raises(SelectionError, match="expected a position, an id or a file name"):
        resolve_picks([{"id": "a1b2c3"}], SHOWN)


def test_more_picks_than_one_generation_takes_are_refused() -> None:
    many = candidates(*((f"p{i}.png", f"{i:06x}") for i in range(20)))
    with pytest.raises(SelectionError, match="at most 16"):
        resolve_picks(list(range(1, 18)), many)


def test_a_selection_answer_carries_picks_and_an_optional_prompt() -> None:
    assert resolve_selection({"selected": "2", "prompt": " on a beach "}, SHOWN).prompt == "on a beach"
    assert resolve_selection(["1"], SHOWN).prompt is None
    with pytest.raises(SelectionError, match="unknown key 'picks'"):
        resolve_selection({"picks": ["1"]}, SHOWN)
    with pytest.raises(SelectionError, match="nothing was retrieved"):
        resolve_selection(["1"], [])


def test_a_review_answer_is_accept_regenerate_or_reselect() -> None:
    assert resolve_review(" Accept ").action == "accept"
    assert resolve_review({"action": "regenerate", "prompt": "at night"}).prompt == "at night"
    with pytest.raises(ReviewError, match="answer accept, regenerate, reselect"):
        resolve_review("yes")
    with pytest.raises(ReviewError, match="goes with regenerate"):
        resolve_review({"action": "accept", "prompt": "at night"})
