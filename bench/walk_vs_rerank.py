"""Where the quantized engine loses recall: its graph walk (efSearch) or its re-ranking depth (candidates).

    python bench/walk_vs_rerank.py --n 1000000 [--ef 256,512,1024,2048] [--candidates 32,64,128] [--queries 300]

Writes n synthetic low-rank 512-d unit vectors (bench/retrieval.py's) to a vector file, builds the
quantized engine over them once (4-bit codes, M=16, on 2 threads), then measures recall@10 against
exact search and the time of single queries (one thread) for every efSearch x candidates pair. The
figures decide what the build's tuner may raise: at 1M recall moved only with efSearch (0.889 / 0.962
/ 0.993 / 0.999 at 256 / 512 / 1024 / 2048, the same for 32, 64 and 128 candidates).

The last line is JSON: {"n", "build_s", "grid": [{"ef", "candidates", "recall_at_10", "ms"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.retrieval import DIM, K, recall, synthetic, synthetic_blocks
from imageloop.tools.stores.ann_index import QUANTIZED_SETTINGS, QuantizedIndex, faiss_threads
from imageloop.tools.stores.vector_file import VectorFile
from imageloop.tools.stores.vector_search import exact_search_blocks


def numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--ef", type=numbers, default=[256, 512, 1024, 2048])
    parser.add_argument("--candidates", type=numbers, default=[32, 64, 128])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        vectors = VectorFile(Path(tmp) / "vectors", DIM, writable=True, create=True)
        written = 0
        for block in synthetic_blocks(args.n, "lowrank", seed=1):
            vectors.write(written, block, sync=False)
            written += len(block)
        queries = synthetic(args.queries, "lowrank", seed=2)
        blocks = ((np.arange(first, first + len(block)), block) for first, block in vectors.blocks(0, args.n))
        truth = exact_search_blocks(blocks, queries, K).positions
        started = time.perf_counter()
        index = QuantizedIndex.build(vectors, args.n, None, QUANTIZED_SETTINGS, threads=2)
        build_s = time.perf_counter() - started
        tuned = index.info
        print(f"n={args.n:,}: built in {build_s:.0f} s on 2 threads (the tuner chose efSearch "
              f"{tuned['ef_search']}, recall@10 {tuned['recall_at_10']:.3f} on its held-out rows)")  # fmt: skip
        grid = []
        for ef in args.ef:
            for candidates in args.candidates:
                index.settings = replace(QUANTIZED_SETTINGS, ef_search=ef, candidates=candidates)
                with faiss_threads(1):
                    started = time.perf_counter()
                    found = np.vstack([index.search(query[None], K).positions for query in queries])
                    ms = (time.perf_counter() - started) * 1000 / len(queries)
                at_10 = recall(found, truth)
                grid.append({"ef": ef, "candidates": candidates, "recall_at_10": round(at_10, 4), "ms": round(ms, 3)})
                print(f"  efSearch {ef:5d}, {candidates:4d} candidates: recall@10 {at_10:.3f}, {ms:.2f} ms")
        vectors.close()
    print(json.dumps({"n": args.n, "build_s": round(build_s, 1), "grid": grid}))


if __name__ == "__main__":
    main()
