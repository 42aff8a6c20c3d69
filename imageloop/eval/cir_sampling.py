"""A CIR benchmark's train split as the real triplets DAIG fine-tunes on: K of them, a fraction, or all.

DAIG (CVPR 2026) reports its gains with 32 real triplets (its few-shot setting), 1% and 100% of a
benchmark's train split. `sample_queries` draws them reproducibly: one seeded permutation of the split's
queries (`random.Random(seed)`, FashionIQ's categories pooled in the order given), of which K-shot takes
the first K and a fraction the first round(F * N) (at least one), so a smaller sample with the same seed
is always part of a larger one; the chosen queries keep the split's own order. `--fraction 1` is the
whole split.

`triplet_records` turns them into the lines `imageloop train` and `train cir-lora` read
(`imageloop.training.triplets`): `id`, `reference_image`, `change`, `target_image` (absolute paths), plus
the benchmark's own names (`benchmark`, `reference`, `target`). FashionIQ's two relative captions are
joined as its evaluation joins them (`fashioniq_modification`); CLIP4CIR and SPRC instead draw one of four
joins per training step (`generate_randomized_fiq_caption`), which a fixed file cannot hold.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from imageloop.errors import ConfigError
from imageloop.eval.cir_data import CIRBenchmark, CIRQuery


def sample_size(total: int, *, shots: int | None, fraction: float | None) -> int:
    """How many of `total` queries a K-shot (`shots`) or fractional (`fraction`) sample holds; exactly one is given."""
    if (shots is None) == (fraction is None):
        raise ConfigError("give the sample size as `shots` K or as `fraction` F (1 for the whole split), not both")
    if shots is not None:
        if shots < 1:
            raise ConfigError(f"`shots` must be at least 1, got {shots}")
        if shots > total:
            raise ConfigError(f"`shots` {shots} asks for more triplets than the split's {total}")
        return shots
    assert fraction is not None
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"`fraction` must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * total))


def sample_queries(
    benchmarks: Sequence[CIRBenchmark], *, shots: int | None = None, fraction: float | None = None, seed: int = 0
) -> list[tuple[CIRBenchmark, CIRQuery]]:
    """The queries of a seeded K-shot or fractional sample of `benchmarks`' train queries, in the split's order."""
    pooled = [(benchmark, query) for benchmark in benchmarks for query in benchmark.queries if query.target]
    if not pooled:
        raise ConfigError("the split names no targets: sample a train split (its queries name their targets)")
    size = sample_size(len(pooled), shots=shots, fraction=fraction)
    order = list(range(len(pooled)))
    random.Random(seed).shuffle(order)
    return [pooled[i] for i in sorted(order[:size])]


def triplet_records(sampled: Sequence[tuple[CIRBenchmark, CIRQuery]]) -> list[dict[str, Any]]:
    """Each sampled query as a triplet line: `id`, `reference_image`, `change`, `target_image`, the names."""
    records = []
    for benchmark, query in sampled:
        assert query.target is not None  # sample_queries keeps queries with targets only
        records.append(
            {
                "id": f"{benchmark.name}-{query.id}",
                "benchmark": benchmark.name,
                "reference": query.reference,
                "target": query.target,
                "change": query.modification,
                "reference_image": str(benchmark.gallery[query.reference].resolve()),
                "target_image": str(benchmark.gallery[query.target].resolve()),
            }
        )
    return records
