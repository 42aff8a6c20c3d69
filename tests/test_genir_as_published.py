"""GenIR under `genir-paper` without traps, and ChatIR, the baseline the paper compares with, as `--feedback chatir`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from imageloop.app import App
from imageloop.cli import main
from imageloop.config import load_settings
from imageloop.errors import ConfigError
from imageloop.eval import in_threads
from imageloop.eval.genir import GenIREvalSettings, Target, evaluate_targets, hybrid_arms, target_search
from imageloop.graphs.genir import build_genir_graph
from imageloop.knobs import GenIREvalKnobs, SimulatedUserKnobs
from imageloop.prompts import CHATIR_ANSWER, CHATIR_QUESTION
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.generators.presets import GENERATOR_PRESETS
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FAKE_SETTINGS, captioned_folder, fake_backends
from tests.fakes import FakeHashEmbedder, ScriptedGenerator, ScriptedRankingRetriever, ScriptedVLM
from tests.image_folders import numbered_images

MISS = [("a", 0.9), ("b", 0.8), ("t", 0.6)]
HIT = [("t", 0.95), ("a", 0.5)]


def paper_settings(**changes: Any) -> GenIREvalSettings:
    knobs = GenIREvalKnobs.from_settings(load_settings("genir-paper")).overridden(changes)
    return GenIREvalSettings(knobs, vlm="scripted:vlm", generator="scripted:generator", embedder="e", index="i")


# --- the preset's traps --------------------------------------------------------------------------------


def test_genir_paper_on_a_caption_index_is_refused_saying_how_to_build_the_right_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caption_index = captioned_folder(tmp_path / "photos")  # a text embedder's index, as `--profile openai` builds
    index_folder(caption_index, FakeHashEmbedder(), None, progress=False)
    with fake_backends(monkeypatch):
        app = App(load_settings("genir-paper", FAKE_SETTINGS), runs_dir=tmp_path / "runs")
        with pytest.raises(ConfigError, match=r"caption embeddings .* index it again with an image embedder") as e:
            app.eval_genir(caption_index, caption_index / "jay.png", tmp_path / "out")
        with pytest.raises(ConfigError, match="index_route"):
            app.start_search(caption_index, "a jay in the snow")
        app.close()
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_the_paper_hybrid_falls_back_to_text_alone() -> None:
    settings = paper_settings(feedback="hybrid")
    assert {arm for i in range(200) for arm in hybrid_arms(settings, f"t{i}")} == {"visual", "verbal"}


def test_an_oracle_tie_goes_to_the_fallback_which_draws_nothing(tmp_path: Path) -> None:
    settings = paper_settings(feedback="hybrid", hybrid_rule="oracle", rounds=1, ks=(1,))
    turn = {"differences": "bluer", "query": "a blue jay"}
    vlm = ScriptedVLM([{"differences": "", "query": "a bird"}, turn] * 2)
    retriever = ScriptedRankingRetriever([MISS, HIT, MISS, HIT])
    defaults = SimulatedUserKnobs(simulated_user="ours")
    graph = build_genir_graph(vlm, ScriptedGenerator(), retriever, ArtifactStore(tmp_path / "a"), defaults=defaults)
    run = in_threads(target_search(graph, settings, tmp_path))
    done = evaluate_targets(run, [Target("t", tmp_path / "t.png")], tmp_path)
    assert done["t"]["hybrid"]["arms"] == {"visual": [2, 0], "verbal": [2, 0]}
    assert done["t"]["hybrid"]["chosen"] == "verbal"


def test_lumina_2_draws_the_papers_50_steps() -> None:
    assert GENERATOR_PRESETS["lumina-2"].steps == 50


# --- ChatIR ---------------------------------------------------------------------------------------------


def test_chatir_asks_a_question_the_simulated_user_answers_and_the_dialogue_is_the_query(tmp_path: Path) -> None:
    vlm = ScriptedVLM([{"differences": "", "query": "a bird on a branch"}, "What colour is the bird?", "blue"])
    retriever = ScriptedRankingRetriever([MISS, HIT])
    graph = build_genir_graph(vlm, None, retriever, ArtifactStore(tmp_path))
    target = tmp_path / "t.png"
    context = {"feedback": "chatir", "rounds": 2, "k": 1, "target_id": "t", "target_path": str(target)}
    state = graph.invoke({}, version="v2", context=context).value

    question, answer = vlm.calls[1][0][-1], vlm.calls[2][0][-1]
    assert question.text == CHATIR_QUESTION.format(dialogue="a bird on a branch") and question.images == ()
    assert answer.text == CHATIR_ANSWER.format(question="What colour is the bird?") and answer.images == (target,)
    assert retriever.calls == [
        ("text", "a bird on a branch"),
        ("text", "a bird on a branch, What colour is the bird? blue"),
    ]
    assert (state["found"], [r["question"] for r in state["rounds"]]) == (True, ["What colour is the bird?", None])


def test_a_person_is_asked_the_chatir_question_and_their_answer_joins_the_dialogue(tmp_path: Path) -> None:
    vlm = ScriptedVLM(["Is it snowing?"])
    retriever = ScriptedRankingRetriever([MISS, MISS])
    graph = build_genir_graph(vlm, None, retriever, ArtifactStore(tmp_path), InMemorySaver())
    config = {"configurable": {"thread_id": "chat"}}
    first = graph.invoke({"query": "a jay"}, config, version="v2", context={"feedback": "chatir", "rounds": 1})
    assert first.interrupts[0].value["ask"].startswith("Is it snowing? Answer it, or say 'found: N'")
    graph.invoke(Command(resume="yes, heavily"), config, version="v2", context={"feedback": "chatir", "rounds": 1})
    assert retriever.calls[-1] == ("text", "a jay, Is it snowing? yes, heavily")
    assert len(vlm.calls) == 1  # resuming the interrupt asks nothing again


def test_the_command_line_evaluates_chatir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "faces"
    numbered_images(folder, 3, captions=True)
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    # The first query ranks picture 0 above the target; the answer's words rank the target first.
    answers: list[object] = [{"differences": "", "query": "picture 0"}, "Which picture is it?", "number 1, picture 1"]
    args = ["eval", "genir", "--index", str(folder), "--targets", str(folder / "img01.png"), "--feedback", "chatir",
            "--rounds", "1", "--k", "1", "--out", str(tmp_path / "out"), "--json",
            "--vlm", "fake:vlm", "--embedder", "fake:hash"]  # fmt: skip
    with fake_backends(monkeypatch, answers):
        assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (dialogue,) = [json.loads(line) for line in (tmp_path / "out" / "dialogues.jsonl").read_text().splitlines()]
    assert [r["query"] for r in dialogue["rounds"]] == [
        "picture 0",
        "picture 0, Which picture is it? number 1, picture 1",
    ]
    assert summary["rounds"][1]["hits_at_k"] == 1.0
