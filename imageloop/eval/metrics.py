"""Retrieval metrics for multi-round search.

Ranks are 0-based (0 is the top result); None means the target was not within the searched depth.
A dialogue may stop early once its target is found: its last rank carries forward to later rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

Ranks = Sequence[Sequence[int | None]]


def _carried(ranks: Sequence[int | None], rounds: int) -> list[int | None]:
    if not ranks:
        return [None] * rounds
    padded = list(ranks[:rounds])
    return padded + [padded[-1]] * (rounds - len(padded))


def cumulative_hits_at_k(ranks: Ranks, k: int, rounds: int) -> list[float]:
    """Fraction of targets ranked < k at any round <= t, for each round t (GenIR's Hits@K)."""
    if not ranks:
        return [0.0] * rounds
    hits = [0] * rounds
    for per_target in ranks:
        found = False
        for t, rank in enumerate(_carried(per_target, rounds)):
            found = found or (rank is not None and rank < k)
            hits[t] += found
    return [h / len(ranks) for h in hits]


def per_round_hits_at_k(ranks: Ranks, k: int, rounds: int) -> list[float]:
    """Fraction of targets ranked < k at round t itself (not cumulative), for contrast."""
    if not ranks:
        return [0.0] * rounds
    hits = [0] * rounds
    for per_target in ranks:
        for t, rank in enumerate(_carried(per_target, rounds)):
            hits[t] += rank is not None and rank < k
    return [h / len(ranks) for h in hits]


def mean_best_rank(ranks: Ranks, rounds: int, depth: int) -> list[float]:
    """Mean over targets of the best (lowest) rank so far at each round; unseen targets count as `depth`."""
    if not ranks:
        return [float(depth)] * rounds
    totals = [0.0] * rounds
    for per_target in ranks:
        best = depth
        for t, rank in enumerate(_carried(per_target, rounds)):
            best = min(best, depth if rank is None else rank)
            totals[t] += best
    return [total / len(ranks) for total in totals]
