"""CIRR and FashionIQ metrics, following each benchmark's evaluation code; values in percent.

Percent, rounded to two decimals, because both benchmarks' papers and reference code report them so
(CLIP4Cir src/validate.py multiplies each recall by 100). A ranking is the system's gallery names,
best first; it may be cut short (top-K retrieval): a target that is absent is a miss at every K.

CIRR (the evaluation in CLIP4Cir src/validate.py, compute_cirr_val_metrics, which matches the test
server's; Liu et al., ICCV 2021):
- the reference image is removed from the candidates before ranks are counted;
- Recall@K, K in 1/5/10/50: the target is among the first K remaining candidates;
- Recall_subset@K, K in 1/2/3: the same, ranking only the query's `img_set.members` minus the
  reference (five images that look alike, so it measures the modification, not the reference);
- Avg = (Recall@5 + Recall_subset@1) / 2, the CIRR leaderboard's headline number.

FashionIQ (the evaluation in CLIP4Cir src/validate.py, compute_fiq_val_metrics): Recall@10 and
Recall@50 per category, each within its own gallery and with the reference left in; `avg_at_10` and
`avg_at_50` average the categories and `avg` averages those two, as CLIP4Cir reports it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TypedDict

from imageloop.errors import ImageloopError
from imageloop.eval.cir_data import CIRQuery

RankedQuery = tuple[CIRQuery, Sequence[str]]
CIRR_RECALL_AT = (1, 5, 10, 50)
CIRR_SUBSET_RECALL_AT = (1, 2, 3)
FASHIONIQ_RECALL_AT = (10, 50)


class CIRRMetrics(TypedDict):
    """`n` queries; recalls keyed by K as strings ("1", "5", ...), in percent."""

    n: int
    recall_at: dict[str, float]
    recall_subset_at: dict[str, float]
    avg: float


class FashionIQCategory(TypedDict):
    """One category's recalls, in percent."""

    recall_at_10: float
    recall_at_50: float


class FashionIQMetrics(TypedDict):
    """`n` queries over all categories; per-category recalls and their averages, in percent."""

    n: int
    categories: dict[str, FashionIQCategory]
    avg_at_10: float
    avg_at_50: float
    avg: float


def target_rank(ranking: Sequence[str], target: str, excluded: str | None = None) -> int | None:
    """0-based rank of `target` in `ranking` once `excluded` is taken out; None if it is absent."""
    rank = 0
    for name in ranking:
        if name == target:
            return rank
        if name != excluded:
            rank += 1
    return None


def subset_rank(ranking: Sequence[str], target: str, subset: Collection[str]) -> int | None:
    """0-based rank of `target` among the names of `ranking` that are in `subset`; None if absent."""
    return target_rank([name for name in ranking if name in subset], target)


def cirr_metrics(results: Iterable[RankedQuery]) -> CIRRMetrics:
    """CIRR's Recall@K, Recall_subset@K and Avg over (query, ranking) pairs."""
    hits = dict.fromkeys(CIRR_RECALL_AT, 0)
    subset_hits = dict.fromkeys(CIRR_SUBSET_RECALL_AT, 0)
    n = 0
    for query, ranking in results:
        target = _known_target(query, "CIRR")
        rank = target_rank(ranking, target, excluded=query.reference)
        candidates = set(query.subset) - {query.reference}
        in_subset = subset_rank(ranking, target, candidates)
        for k in CIRR_RECALL_AT:
            hits[k] += rank is not None and rank < k
        for k in CIRR_SUBSET_RECALL_AT:
            subset_hits[k] += in_subset is not None and in_subset < k
        n += 1
    return {
        "n": n,
        "recall_at": {str(k): round(_percent(hits[k], n), 2) for k in CIRR_RECALL_AT},
        "recall_subset_at": {str(k): round(_percent(subset_hits[k], n), 2) for k in CIRR_SUBSET_RECALL_AT},
        "avg": round((_percent(hits[5], n) + _percent(subset_hits[1], n)) / 2, 2),
    }


def fashioniq_metrics(results: Mapping[str, Iterable[RankedQuery]]) -> FashionIQMetrics:
    """FashionIQ's Recall@10/50 per category (name -> its (query, ranking) pairs) and their averages."""
    n = 0
    recalls: dict[str, dict[int, float]] = {}
    for category, pairs in results.items():
        hits = dict.fromkeys(FASHIONIQ_RECALL_AT, 0)
        count = 0
        for query, ranking in pairs:
            rank = target_rank(ranking, _known_target(query, "FashionIQ"))
            for k in FASHIONIQ_RECALL_AT:
                hits[k] += rank is not None and rank < k
            count += 1
        recalls[category] = {k: _percent(hits[k], count) for k in FASHIONIQ_RECALL_AT}
        n += count
    avg_at = {k: _mean([r[k] for r in recalls.values()]) for k in FASHIONIQ_RECALL_AT}
    return {
        "n": n,
        "categories": {
            name: {"recall_at_10": round(r[10], 2), "recall_at_50": round(r[50], 2)} for name, r in recalls.items()
        },
        "avg_at_10": round(avg_at[10], 2),
        "avg_at_50": round(avg_at[50], 2),
        "avg": round((avg_at[10] + avg_at[50]) / 2, 2),
    }


def cirr_test_submission(results: Iterable[RankedQuery]) -> tuple[dict[str, object], dict[str, object]]:
    """The two files CIRR's test server scores (Recall, Recall_subset), from test1 rankings.

    The format is the server's (CIRR Test-split_server.md): `{"version": "rc2", "metric": ...,
    "<pairid>": [names]}` with the top 50 (reference removed) and the top 3 within the subset. Subset
    members a cut-short ranking leaves out follow in release order, so every entry names three.
    """
    recall: dict[str, object] = {"version": "rc2", "metric": "recall"}
    recall_subset: dict[str, object] = {"version": "rc2", "metric": "recall_subset"}
    for query, ranking in results:
        recall[query.id] = [name for name in ranking if name != query.reference][: CIRR_RECALL_AT[-1]]
        candidates = [name for name in query.subset if name != query.reference]
        ranked = [name for name in dict.fromkeys(ranking) if name in candidates]
        ranked += [name for name in candidates if name not in ranked]
        recall_subset[query.id] = ranked[: CIRR_SUBSET_RECALL_AT[-1]]
    return recall, recall_subset


def _known_target(query: CIRQuery, benchmark: str) -> str:
    if query.target is None:
        raise ImageloopError(
            f"{benchmark} query {query.id} has no public target (a test split): only its server can score it"
        )
    return query.target


def _percent(hits: int, n: int) -> float:
    return 100 * hits / n if n else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
