"""Hits@K and mean rank on hand-made rankings."""

from __future__ import annotations

import pytest

from imageloop.eval.metrics import cumulative_hits_at_k, mean_best_rank, per_round_hits_at_k

# Three targets over three rounds (0-based ranks; None: not within the searched depth).
RANKS = [
    [5, 0, 7],  # found at round 1, then lost again
    [None, 3, 2],  # never in the top 2
    [1],  # found at round 0; the dialogue stopped early
]


def test_cumulative_hits_count_a_target_from_its_first_hit_on() -> None:
    assert cumulative_hits_at_k(RANKS, k=2, rounds=3) == pytest.approx([1 / 3, 2 / 3, 2 / 3])


def test_per_round_hits_forget_earlier_rounds() -> None:
    assert per_round_hits_at_k(RANKS, k=2, rounds=3) == pytest.approx([1 / 3, 2 / 3, 1 / 3])


def test_a_larger_k_never_lowers_hits() -> None:
    for k in range(1, 10):
        smaller, larger = cumulative_hits_at_k(RANKS, k, 3), cumulative_hits_at_k(RANKS, k + 1, 3)
        assert all(a <= b for a, b in zip(smaller, larger, strict=True))


def test_mean_best_rank_counts_unseen_targets_at_the_depth() -> None:
    assert mean_best_rank(RANKS, rounds=3, depth=100) == pytest.approx(
        [(5 + 100 + 1) / 3, (0 + 3 + 1) / 3, (0 + 2 + 1) / 3]
    )


def test_no_targets_gives_zero_hits() -> None:
    assert cumulative_hits_at_k([], k=5, rounds=2) == [0.0, 0.0]
