"""CIRR and FashionIQ metrics on hand-made rankings, and their invariants on random ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageloop.errors import ImageloopError
from imageloop.eval.cir_data import CIRQuery
from imageloop.eval.cir_metrics import (
    cirr_metrics,
    cirr_test_submission,
    fashioniq_metrics,
    subset_rank,
    target_rank,
)

GALLERY = [f"img{i:02d}" for i in range(60)]
# One CIRR image set: the reference img00, the target img03 and four look-alikes.
SUBSET = ("img00", "img01", "img02", "img03", "img04", "img05")


def cirr_query(target: str | None = "img03", query_id: str = "7") -> CIRQuery:
    return CIRQuery(query_id, "img00", "make it red", target, SUBSET)


def ranking_with(first: list[str]) -> list[str]:
    """`first`, then the rest of the gallery in order."""
    return first + [name for name in GALLERY if name not in first]


def test_cirr_takes_the_reference_out_before_counting_ranks() -> None:
    metrics = cirr_metrics([(cirr_query(), ranking_with(["img00", "img03"]))])
    assert metrics["recall_at"] == {"1": 100.0, "5": 100.0, "10": 100.0, "50": 100.0}


def test_cirr_subset_recall_ranks_only_the_other_members_of_the_set() -> None:
    # Five strangers, then the target ahead of every other member: a miss at 5, a hit in the subset.
    ranking = ranking_with(["img40", "img41", "img42", "img43", "img44", "img00", "img03", "img01"])
    metrics = cirr_metrics([(cirr_query(), ranking)])
    assert metrics["recall_at"]["5"] == 0.0 and metrics["recall_at"]["10"] == 100.0
    assert metrics["recall_subset_at"] == {"1": 100.0, "2": 100.0, "3": 100.0}


def test_cirr_avg_is_the_mean_of_recall_at_5_and_subset_recall_at_1() -> None:
    hit_both = ranking_with(["img03"])
    hit_neither = ranking_with(["img01", "img02", "img04", "img05", "img10", "img11", "img03"])
    metrics = cirr_metrics([(cirr_query(query_id="1"), hit_both), (cirr_query(query_id="2"), hit_neither)])
    assert (metrics["recall_at"]["5"], metrics["recall_subset_at"]["1"]) == (50.0, 50.0)
    assert metrics["recall_subset_at"]["3"] == 50.0 and metrics["avg"] == 50.0


def test_a_target_missing_from_a_cut_short_ranking_is_a_miss_at_every_k() -> None:
    metrics = cirr_metrics([(cirr_query(), ["img01", "img02"])])
    assert set(metrics["recall_at"].values()) == {0.0} and set(metrics["recall_subset_at"].values()) == {0.0}


def test_cirr_metrics_have_the_agreed_shape_in_percent_with_two_decimals() -> None:
    queries = [(cirr_query(query_id=str(i)), ranking_with(["img03"] if i == 0 else [])) for i in range(3)]
    metrics = cirr_metrics(queries)
    assert set(metrics) == {"n", "recall_at", "recall_subset_at", "avg"} and metrics["n"] == 3
    assert list(metrics["recall_at"]) == ["1", "5", "10", "50"] and metrics["recall_at"]["1"] == 33.33
    assert list(metrics["recall_subset_at"]) == ["1", "2", "3"]


def test_a_query_without_a_public_target_cannot_be_scored_here() -> None:
    with pytest.raises(ImageloopError, match="query 7 has no public target"):
        cirr_metrics([(cirr_query(target=None), GALLERY)])


def test_no_queries_give_zero_recall() -> None:
    assert cirr_metrics([]) == {
        "n": 0,
        "recall_at": {"1": 0.0, "5": 0.0, "10": 0.0, "50": 0.0},
        "recall_subset_at": {"1": 0.0, "2": 0.0, "3": 0.0},
        "avg": 0.0,
    }


def test_fashioniq_keeps_the_reference_among_the_candidates() -> None:
    query = CIRQuery("dress-0", "img00", "Is red and longer", "img10")
    at_10 = ranking_with([f"img{i:02d}" for i in range(10)])  # the target 11th, behind the reference
    metrics = fashioniq_metrics({"dress": [(query, at_10)]})
    assert metrics["categories"]["dress"] == {"recall_at_10": 0.0, "recall_at_50": 100.0}


def test_fashioniq_averages_categories_then_the_two_recalls() -> None:
    hit = [(CIRQuery("q", "img00", "x", "img01"), GALLERY)]
    miss = [(CIRQuery("q", "img00", "x", "img59"), GALLERY)]
    metrics = fashioniq_metrics({"dress": hit, "shirt": miss, "toptee": hit + miss})
    assert metrics["categories"]["toptee"] == {"recall_at_10": 50.0, "recall_at_50": 50.0}
    assert (metrics["n"], metrics["avg_at_10"], metrics["avg_at_50"], metrics["avg"]) == (4, 50.0, 50.0, 50.0)
    assert set(metrics) == {"n", "categories", "avg_at_10", "avg_at_50", "avg"}


def test_the_cirr_test_submission_is_the_servers_two_files() -> None:
    ranking = ranking_with(["img00", "img40", "img05"])
    recall, subset = cirr_test_submission([(cirr_query(target=None, query_id="12063"), ranking[:20])])
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    assert recall["12063"] == ranking[1:20]
    # The members the cut-short ranking left out follow in release order.
    assert subset["12063"] == ["img05", "img01", "img02"]


def test_the_cirr_test_submission_keeps_fifty_candidates() -> None:
    recall, _ = cirr_test_submission([(cirr_query(target=None), GALLERY)])
    assert recall["7"] == GALLERY[1:51]


@settings(max_examples=200)
@given(ranking=st.permutations(GALLERY), target=st.sampled_from(SUBSET[1:]))
def test_within_the_subset_a_target_never_ranks_lower_than_in_the_gallery(ranking: list[str], target: str) -> None:
    overall = target_rank(ranking, target, excluded="img00")
    within = subset_rank(ranking, target, set(SUBSET) - {"img00"})
    assert overall is not None and within is not None and within <= overall < len(GALLERY) - 1 and within < 5


@settings(max_examples=100)
@given(rankings=st.lists(st.tuples(st.sampled_from(SUBSET[1:]), st.permutations(GALLERY)), min_size=1, max_size=8))
def test_recall_grows_with_k_and_stays_within_0_and_100(rankings: list[tuple[str, list[str]]]) -> None:
    metrics = cirr_metrics([(cirr_query(target), ranking) for target, ranking in rankings])
    for recalls in (metrics["recall_at"], metrics["recall_subset_at"]):
        values = list(recalls.values())
        assert values == sorted(values) and values[0] >= 0.0 and values[-1] <= 100.0
