"""ImageRAG under `imagerag-paper` as the released scripts run it, and the paper's ablations beside ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imageloop.config import load_settings
from imageloop.eval.imagerag import load_prompts
from imageloop.graphs.imagerag import build_imagerag_graph
from imageloop.knobs import ImageRAGKnobs
from imageloop.prompts import PAPER_CRITIC_DECISION, PAPER_REPHRASE_AFTER_DECISION, PAPER_RERANK
from imageloop.tools.artifacts import ArtifactStore
from tests.fakes import ScriptedGenerator, ScriptedRetriever, ScriptedVLM

PROMPT = "a Cyanocitta cristata perched on a snowy branch, ukiyo-e style"
PAPER = ImageRAGKnobs.from_settings(load_settings("imagerag-paper"))
TWO_CONCEPTS = "Cyanocitta cristata\nukiyo-e style"
TWO_CAPTIONS = "a blue jay with a crest on a branch\nan ukiyo-e woodblock print of snow"
# The style's reference scores higher than the bird's: trimming by score would keep the style.
HITS = {"jay": [("jay.png", 0.5), ("jay2.png", 0.4)], "ukiyo": [("print.png", 0.9)]}


def run(
    tmp_path: Path,
    answers: list[Any],
    *,
    defaults: ImageRAGKnobs = PAPER,
    generator: ScriptedGenerator | None = None,
    hits: dict[str, list[tuple[str, float]]] | None = None,
    **context: Any,
) -> tuple[dict[str, Any], ScriptedVLM, ScriptedGenerator, ScriptedRetriever]:
    vlm, generator = ScriptedVLM(list(answers)), generator or ScriptedGenerator()
    retriever = ScriptedRetriever(HITS if hits is None else hits, root=tmp_path)
    graph = build_imagerag_graph(vlm, generator, retriever, ArtifactStore(tmp_path / "a"), defaults=defaults)
    state = graph.invoke({"prompt": PROMPT}, version="v2", context=context).value
    return state, vlm, generator, retriever


def asked(vlm: ScriptedVLM) -> list[str]:
    return [messages[-1].text for messages, _ in vlm.calls]


def test_under_the_preset_sdxl_is_asked_for_one_concept_and_keeps_the_first(tmp_path: Path) -> None:
    sdxl = ScriptedGenerator(max_references=1)
    _, vlm, generator, _ = run(tmp_path, ["no", TWO_CONCEPTS, TWO_CAPTIONS], generator=sdxl)
    assert asked(vlm)[1].endswith("Return up to 1 concepts.")
    assert [r.path.name for r in generator.requests[1].references] == ["jay.png"]  # the rare concept, not the style


def test_under_the_preset_omnigen_is_asked_without_a_limit_and_keeps_the_first_three_in_order(
    tmp_path: Path,
) -> None:
    concepts = "Cyanocitta cristata\nukiyo-e style\nsnowy branch\nwinter light"
    captions = "a blue jay\nan ukiyo-e print\na snowy branch\na winter light"
    hits = {
        "jay": [("jay.png", 0.2)],
        "ukiyo": [("print.png", 0.3)],
        "branch": [("b.png", 0.4)],
        "light": [("l.png", 0.9)],
    }
    _, vlm, generator, _ = run(tmp_path, ["no", concepts, captions], hits=hits)
    assert "Return up to" not in asked(vlm)[1]
    assert [r.path.name for r in generator.requests[1].references] == ["jay.png", "print.png", "b.png"]


def test_ours_keeps_asking_for_max_concepts_and_trims_by_score(tmp_path: Path) -> None:
    sdxl = ScriptedGenerator(max_references=1)
    _, vlm, generator, _ = run(
        tmp_path, ["no", TWO_CONCEPTS, TWO_CAPTIONS, "yes"], generator=sdxl, defaults=ImageRAGKnobs(critic="paper")
    )
    assert asked(vlm)[1].endswith("Return up to 3 concepts.")
    assert [r.path.name for r in generator.requests[1].references] == ["print.png"]


def test_under_the_preset_the_regeneration_is_returned_unjudged_as_released(tmp_path: Path) -> None:
    state, vlm, generator, _ = run(tmp_path, ["no", TWO_CONCEPTS, TWO_CAPTIONS])
    assert len(vlm.calls) == 3  # decision, concepts, captions: none after the regeneration
    assert [s["node"] for s in state["steps"]][-2:] == ["generate_with_references", "finish"]
    assert state["final_image"] == state["images"][-1]["artifact"] and len(generator.requests) == 2


def test_ours_judges_the_last_regeneration_to_choose_the_best_image(tmp_path: Path) -> None:
    state, vlm, _, _ = run(tmp_path, ["no", TWO_CONCEPTS, TWO_CAPTIONS, "yes"], defaults=PAPER, judge_last=True)
    assert len(vlm.calls) == 4 and state["stop_reason"] == "aligned"


def test_rephrase_only_asks_the_released_rephrasing_after_the_decision_and_retrieves_nothing(tmp_path: Path) -> None:
    state, vlm, generator, retriever = run(tmp_path, ["no", '"a blue jay on a snowy branch"'], rephrase_only=True)
    decision, answer, question = vlm.calls[1][0]
    assert (decision.text, answer.text) == (PAPER_CRITIC_DECISION.format(prompt=PROMPT), "no")
    assert decision.images and question.text == PAPER_REPHRASE_AFTER_DECISION.format(prompt=PROMPT)
    assert retriever.queries == [] and "retrieve" not in [s["node"] for s in state["steps"]]
    assert (generator.requests[1].prompt, generator.requests[1].references) == ("a blue jay on a snowy branch", ())


def test_the_rerank_ablation_lets_the_vlm_pick_among_the_top_candidates(tmp_path: Path) -> None:
    hits = {"jay": [("a.png", 0.9), ("b.png", 0.8), ("c.png", 0.7)]}
    _, vlm, generator, _ = run(tmp_path, ["no", "Cyanocitta cristata", "a blue jay", "2"], hits=hits, rerank="vlm")
    rerank = vlm.calls[3][0][-1]
    assert rerank.text == PAPER_RERANK.format(prompt="a blue jay", k=1)
    assert [p.name for p in rerank.images] == ["a.png", "b.png", "c.png"]
    assert [r.path.name for r in generator.requests[1].references] == ["c.png"]


def test_class_folders_of_cub_and_inaturalist_become_clean_class_names(tmp_path: Path) -> None:
    inaturalist = "00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris"
    for name in ("001.Black_footed_Albatross", inaturalist, "golden_retriever"):
        (tmp_path / name).mkdir()
    prompts = sorted(case.prompt for case in load_prompts(tmp_path))
    assert prompts == ["a photo of a Black footed Albatross", "a photo of a Lumbricus terrestris",
                       "a photo of a golden retriever"]  # fmt: skip
