"""GenIR as published: the paper's simulated user from the run's knobs, rounds 0..N, several K from one run,
the paper's per-query hybrid next to ours, benchmarks from disk, per-round latency, text-only re-scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imageloop.agents.simulated_user import PAPER_DECODING
from imageloop.app import App
from imageloop.cli import main
from imageloop.config import load_settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.eval import in_threads
from imageloop.eval.genir import (
    GenIREvalSettings,
    Target,
    evaluate_targets,
    hybrid_arms,
    rescore_text,
    summarise,
    target_search,
)
from imageloop.eval.genir_data import GENIR_SAMPLE_SEED, load_image_folder, sample
from imageloop.graphs.genir import build_genir_graph
from imageloop.knobs import GenIREvalKnobs, SimulatedUserKnobs
from imageloop.prompts import GENIR_CAPTION_SYSTEM, GENIR_COMPARE, GENIR_PREDICTION_CAPTION, GENIR_REFINE
from imageloop.protocols import Decoding
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever
from tests.fake_providers import fake_backends
from tests.fakes import FakeHashEmbedder, ScriptedGenerator, ScriptedRankingRetriever, ScriptedVLM
from tests.image_folders import numbered_images, sha256

MISS = [("a", 0.9), ("b", 0.8), ("c", 0.7), ("t", 0.6)]  # target "t" at rank 3: a hit at K=5 and 10, not 1
HIT = [("t", 0.95), ("a", 0.5)]


def turn(query: str) -> dict[str, str]:
    return {"differences": "it is bluer", "query": query}


def eval_settings(**changes: Any) -> GenIREvalSettings:
    knobs = GenIREvalKnobs(rounds=3, ks=(1, 5, 10)).overridden(changes)
    return GenIREvalSettings(
        knobs, vlm="scripted:vlm", generator="scripted:generator", embedder="fake:hash", index="idx"
    )


# --- the simulated user, as the run's knobs ask -------------------------------------------------------


def search(tmp_path: Path, answers: list[Any], rankings: list[list[tuple[str, float]]], **context: Any) -> ScriptedVLM:
    vlm = ScriptedVLM(answers)
    graph = build_genir_graph(vlm, ScriptedGenerator(), ScriptedRankingRetriever(rankings), ArtifactStore(tmp_path))
    target = {"target_id": "t", "target_path": str(tmp_path / "t.png"), "k": 1}
    graph.invoke({}, version="v2", context={**target, **context})
    return vlm


def test_the_paper_style_user_set_per_run_asks_the_released_prompts_with_the_papers_sampling(tmp_path: Path) -> None:
    vlm = search(tmp_path, ["a caption", "it is bluer", "a bluer caption"], [MISS, HIT],
                 simulated_user="paper", rounds=1)  # fmt: skip
    asked = [messages for messages, _ in vlm.calls]
    assert asked[0][0].text == GENIR_CAPTION_SYSTEM.format(max_tokens=500)
    assert asked[1][1].text == GENIR_COMPARE.format(query="a caption")
    assert asked[2][1].text == GENIR_REFINE.format(differences="it is bluer", query="a caption")
    assert vlm.decodings == [PAPER_DECODING] * 3


def test_the_users_decoding_knobs_replace_only_what_they_name(tmp_path: Path) -> None:
    vlm = search(tmp_path, ["a caption"], [HIT], simulated_user="paper", user_temperature=0.2)
    assert vlm.decodings == [Decoding(temperature=0.2, top_p=0.9, repetition_penalty=1.1)]


def test_with_prediction_feedback_the_paper_user_opens_with_a_retrieval_caption(tmp_path: Path) -> None:
    vlm = search(tmp_path, ["a caption"], [HIT], simulated_user="paper", feedback="prediction")
    assert vlm.calls[0][0][1].text == GENIR_PREDICTION_CAPTION


def test_the_genir_paper_preset_reaches_the_graphs_knobs() -> None:
    knobs = SimulatedUserKnobs.from_settings(load_settings("genir-paper"))
    assert (knobs.simulated_user, knobs.rounds, knobs.k, knobs.feedback) == ("paper", 10, 10, "visual")
    assert (knobs.user_temperature, knobs.user_top_p, knobs.user_repetition_penalty) == (0.7, 0.9, 1.1)


# --- several K, rounds 0..N and latency from one run ------------------------------------------------


def evaluate(
    tmp_path: Path, answers: list[Any], rankings: list[list[tuple[str, float]]], settings: GenIREvalSettings
) -> tuple[dict[str, dict[str, Any]], ScriptedRankingRetriever]:
    retriever = ScriptedRankingRetriever(rankings)
    graph = build_genir_graph(ScriptedVLM(answers), ScriptedGenerator(), retriever, ArtifactStore(tmp_path / "a"))
    done = evaluate_targets(
        in_threads(target_search(graph, settings, tmp_path)), [Target("t", tmp_path / "t.png")], tmp_path
    )
    return done, retriever


def test_hits_at_every_k_come_from_one_dialogue_that_stops_at_the_smallest_k(tmp_path: Path) -> None:
    done, _ = evaluate(tmp_path, [turn("a bird"), turn("a blue jay")], [MISS, HIT], eval_settings())
    (record,) = done.values()
    assert [r["target_rank"] for r in record["rounds"]] == [3, 0]  # found at K=1 in round 1: it stops there
    summary = summarise(done.values(), eval_settings())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]  # rounds=3: round 0 plus 3 refinements
    assert [r["hits_at"] for r in summary["rounds"][:2]] == [
        {"1": 0.0, "5": 1.0, "10": 1.0},
        {"1": 1.0, "5": 1.0, "10": 1.0},
    ]
    assert summary["k"] == 1 and summary["ks"] == [1, 5, 10] and summary["rounds"][3]["hits_at_k"] == 1.0


def test_each_round_records_its_seconds_and_the_summary_averages_the_rounds_played(tmp_path: Path) -> None:
    done, _ = evaluate(tmp_path, [turn("a bird"), turn("a blue jay")], [MISS, HIT], eval_settings())
    (record,) = done.values()
    assert all(r["seconds"] > 0 for r in record["rounds"])
    latency = [r["latency_s"] for r in summarise(done.values(), eval_settings())["rounds"]]
    assert latency[0] is not None and latency[1] is not None and latency[2:] == [None, None]


def test_a_rank_depth_below_the_largest_k_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rank_depth 5 is below the largest K 10"):
        evaluate(tmp_path, [turn("a bird")], [HIT], eval_settings(rank_depth=5))


# --- hybrid feedback: ours per round, the paper's per query -----------------------------------------


def test_the_random_hybrid_shows_drawings_to_the_set_share_of_queries_the_same_way_every_run() -> None:
    settings = eval_settings(feedback="hybrid", hybrid_rule="random")
    arms = [hybrid_arms(settings, f"target-{i}") for i in range(2000)]
    share = sum(arm == ["visual"] for arm in arms) / len(arms)
    assert abs(share - 0.223) < 0.03
    assert arms == [hybrid_arms(settings, f"target-{i}") for i in range(2000)]
    assert {tuple(hybrid_arms(eval_settings(feedback="hybrid", hybrid_rule="random", hybrid_visual_fraction=0.0),
                              f"t{i}")) for i in range(50)} == {("prediction",)}  # fmt: skip


def test_ours_decides_per_round_inside_the_graph_so_each_target_plays_once() -> None:
    assert hybrid_arms(eval_settings(feedback="hybrid"), "t") == ["hybrid"]
    assert hybrid_arms(eval_settings(feedback="visual", hybrid_rule="oracle"), "t") == ["visual"]


def test_the_oracle_keeps_the_dialogue_that_found_its_target_first(tmp_path: Path) -> None:
    settings = eval_settings(feedback="hybrid", hybrid_rule="oracle", hybrid_fallback="verbal", rounds=2)
    # The visual dialogue finds the target in round 2; the verbal one at once.
    answers = [turn("a bird"), turn("a bird"), turn("a blue jay"), turn("a blue jay")]
    done, retriever = evaluate(tmp_path, answers, [MISS, MISS, HIT, HIT], settings)
    (record,) = done.values()
    assert record["hybrid"] == {"rule": "oracle", "chosen": "verbal", "arms": {"visual": [3, 3, 0], "verbal": [0]}}
    assert [r["feedback_kind"] for r in record["rounds"]] == ["verbal"]
    assert [kind for kind, _ in retriever.calls] == ["image", "image", "image", "text"]
    assert summarise(done.values(), settings)["hybrid"] == {"rule": "oracle", "visual_share": 0.0}


# --- benchmarks from disk, end to end through the application layer and the command line -------------


@pytest.fixture
def ffhq(tmp_path: Path) -> Path:
    """An FFHQ-like folder of five captioned images, indexed on the caption route by the fake embedder."""
    folder = tmp_path / "ffhq"
    numbered_images(folder, 5, captions=True)
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    return folder


def test_a_benchmark_sampled_with_genirs_seed_is_searched(
    ffhq: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_backends(monkeypatch, [turn("picture 1")] * 8) as fakes:
        app = App(fakes.settings)
        knobs = {"feedback": "verbal", "rounds": 1, "ks": "1,2"}
        summary = app.eval_genir(ffhq, None, tmp_path / "out", benchmark="ffhq", images=ffhq, sample=2, knobs=knobs)
    drawn = sample(load_image_folder(ffhq), 2, GENIR_SAMPLE_SEED)
    dialogues = [json.loads(line) for line in (tmp_path / "out" / "dialogues.jsonl").read_text().splitlines()]
    assert sorted(d["target_id"] for d in dialogues) == sorted(sha256(t.path) for t in drawn)
    assert (summary["n_targets"], summary["ks"], len(summary["rounds"])) == (2, [1, 2], 2)


def test_targets_and_a_benchmark_are_one_or_the_other(
    ffhq: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_backends(monkeypatch) as fakes:
        app = App(fakes.settings)
        with pytest.raises(ConfigError, match="not both"):
            app.eval_genir(ffhq, ffhq, tmp_path / "out", benchmark="ffhq", images=ffhq)
        with pytest.raises(ConfigError, match="needs `images`"):
            app.eval_genir(ffhq, None, tmp_path / "out", benchmark="ffhq")
        with pytest.raises(ConfigError, match="go with `benchmark`"):
            app.eval_genir(ffhq, ffhq, tmp_path / "out", sample=2)


def test_saved_queries_are_rescored_by_text_alone(ffhq: Path, tmp_path: Path) -> None:
    index = open_index(ffhq)
    target = sha256(ffhq / "img02.png")
    record = {"target_id": target, "rounds": [{"round": 0, "query": "picture 4"}, {"round": 1, "query": "picture 2"}]}
    summary = rescore_text([record], Retriever(index, FakeHashEmbedder()), eval_settings(rounds=1, ks=[1]))
    assert [r["hits_at"]["1"] for r in summary["rounds"]] == [0.0, 1.0] and summary["route"] == "text"


def test_the_command_line_runs_a_benchmark_with_several_k_then_rescores_it_by_text(
    ffhq: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    models = ["--vlm", "fake:vlm", "--embedder", "fake:hash", "--generator", "fake:generator"]
    args = ["eval", "genir", "--index", str(ffhq), "--benchmark", "ffhq", "--images", str(ffhq), "--sample", "3",
            "--ks", "1,5", "--rounds", "2", "--feedback", "verbal", "--out", str(out), "--json", *models]  # fmt: skip
    with fake_backends(monkeypatch, [turn("picture 3")] * 12):
        assert main(args) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert main(["eval", "genir", "--out", str(out), "--rescore-text", "--json", *models]) == 0
        rescored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ks"] == [1, 5] and [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert set(summary["rounds"][0]["per_round_hits_at"]) == {"1", "5"}
    assert rescored["route"] == "text" and rescored["n_targets"] == 3
    assert json.loads((out / "text_rescore.json").read_text())["embedder"] == "fake:hash"


def test_an_evaluation_folder_with_other_settings_is_not_reused(
    ffhq: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_backends(monkeypatch, [turn("picture 1")] * 8) as fakes:
        app = App(fakes.settings)
        app.eval_genir(ffhq, ffhq / "img01.png", tmp_path / "out", knobs={"feedback": "verbal", "rounds": 0})
        with pytest.raises(ImageloopError, match="holds an evaluation with other settings"):
            app.eval_genir(ffhq, ffhq / "img01.png", tmp_path / "out", knobs={"feedback": "verbal", "ks": "1,5"})
