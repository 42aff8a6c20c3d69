"""What a large embedded store costs: disk, memory, build time on 1 and on 2 threads, latency and recall.

    python bench/footprint.py --n 1000000 [--ann hnsw|quantized] [--threads 1,2] [--queries 1000] [--dir DIR]

The store is built from the same synthetic vectors and metadata as bench/retrieval.py (low-rank
512-d unit vectors, generated and upserted 10,000 at a time, so 10 million never sit in memory),
then its ANN index is built once per thread count, each in a fresh process, one after the other on
the same store (the figures are side by side: same vectors, same machine, same hour). `build_s` is
the index's own build time (graph, efSearch tuning on held-out rows, the last rows added), as the
store records it; a thread count named twice (`--threads 1,2,1,2`, alternating, for a machine
others use too) keeps its fastest build. The index saved last is the one measured.

- raw_bytes: n x 512 x 4, the vectors as float32.
- disk_bytes: every file of the store once no process has it open (SQLite, the vector file, the
  saved index); disk_ratio = disk_bytes / raw_bytes.
- peak_rss_bytes: in a fresh process that has imported numpy and faiss, the peak RSS (VmHWM) of
  opening the store and running every query, above the RSS before opening. Pages of the vector
  file mapped by searches count (RssFile); rows read for re-ranking do not.
- p50_ms: single queries (k=10) after 10 warm-up queries; recall_at_10: against the exact top-10
  over the raw vectors, computed while the vectors are generated (re-ranking included).

The last line is JSON: {"n", "dim", "ann", "raw_bytes", "disk_bytes", "disk_ratio",
"peak_rss_bytes", "build_s": {"1": s, "2": s}, "p50_ms", "recall_at_10"}.
Goals: hnsw at 1M: disk_ratio <= 1.25, peak RSS <= disk bytes, build_s["2"] <= 0.6 x build_s["1"];
quantized at 1M: recall >= 0.95, p50 <= 5 ms, peak RSS <= 0.35 x raw_bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.retrieval import (
    DIM,
    UPSERT_BATCH,
    K,
    exact_truth,
    in_child,
    latency,
    metadata,
    recall,
    synthetic,
    synthetic_blocks,
)
from imageloop.protocols import VectorRecord
from imageloop.tools.stores.embedded import DEFAULT_ANN_THRESHOLD, EmbeddedVectorStore


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, RssFile, ...), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def load(store_path: str, n: int, queries_path: str) -> dict[str, Any]:
    """Child: upsert the n synthetic vectors with their metadata; the exact top-10 of each query on the way."""
    queries = np.load(queries_path)
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), K), -1, dtype=np.int64)
    store = EmbeddedVectorStore(Path(store_path), ann_threshold=None)
    started = time.perf_counter()
    upsert_s = 0.0
    first = 0
    for block in synthetic_blocks(n, "lowrank", seed=1):
        rows = exact_truth(block, queries)  # this block's top-10, merged with the best so far
        scores = np.einsum("qd,qkd->qk", queries, block[rows])
        scores, rows = np.concatenate([best_scores, scores], axis=1), np.concatenate([best_rows, rows + first], axis=1)
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        best_scores, best_rows = np.take_along_axis(scores, top, axis=1), np.take_along_axis(rows, top, axis=1)
        upserting = time.perf_counter()
        for start in range(0, len(block), UPSERT_BATCH):
            part = block[start : start + UPSERT_BATCH]
            i0 = first + start
            store.upsert([VectorRecord(str(i0 + j), part[j], metadata(i0 + j)) for j in range(len(part))])
        upsert_s += time.perf_counter() - upserting
        first += len(block)
    store.close()
    return {"upsert_s": upsert_s, "load_s": time.perf_counter() - started, "truth": best_rows.tolist()}


def build(store_path: str, n: int, ann: str, threads: int) -> dict[str, Any]:
    """Child: build (or rebuild) the store's `ann` index on `threads` threads and save it."""
    threshold = min(DEFAULT_ANN_THRESHOLD, n - 1)
    store = EmbeddedVectorStore(Path(store_path), ann_threshold=threshold, ann=ann, threads=threads)  # type: ignore[arg-type]
    started = time.perf_counter()
    info = store.refresh(rebuild="ann" in store.get_meta())  # a second build replaces the first one's index
    wall_s = time.perf_counter() - started
    store.close()
    return {"info": info, "wall_s": wall_s, "peak_rss_bytes": status_bytes("VmHWM")}


def query(store_path: str, n: int, queries_path: str) -> dict[str, Any]:
    """Child: open the store and run every query, measuring the memory both take above what the process held."""
    import faiss  # noqa: F401  (held by any process that searches: not the store's cost)

    queries = np.load(queries_path)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    started = time.perf_counter()
    store = EmbeddedVectorStore(Path(store_path), ann_threshold=min(DEFAULT_ANN_THRESHOLD, n - 1))
    info = store.ann_info()  # loads the saved index
    open_s = time.perf_counter() - started
    opened = status_bytes("VmHWM") - before
    for q in queries[:10]:
        store.search(q, K)
    ms = np.zeros(len(queries))
    found = []
    for i, q in enumerate(queries):
        started = time.perf_counter()
        hits = store.search(q, K)
        ms[i] = (time.perf_counter() - started) * 1000
        found.append([int(hit.id) for hit in hits] + [-1] * (K - len(hits)))
    figures = {
        "info": info, "open_s": open_s, "open_rss_bytes": opened, "peak_rss_bytes": status_bytes("VmHWM") - before,
        "rss_file_bytes": status_bytes("RssFile"), "rss_anon_bytes": status_bytes("RssAnon"), "found": found,
        **latency(ms),
    }  # fmt: skip
    store.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ann", choices=("hnsw", "quantized"), default="hnsw")
    parser.add_argument("--threads", default="1,2", help="thread counts to build with, in order (default 1,2)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    n, threads = args.n, [int(t) for t in args.threads.split(",")]
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"n={n:,} d={DIM} k={K} ann={args.ann} threads={threads} cpus={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.1f} OMP_NUM_THREADS={omp}", flush=True)  # fmt: skip
    store_path = tmp / "store" / "index.sqlite"
    queries_path = tmp / "queries.npy"
    np.save(queries_path, synthetic(args.queries, "lowrank", seed=2))

    loaded = in_child(load, str(store_path), n, str(queries_path))
    print(f"upsert {loaded['upsert_s']:.1f} s ({n / loaded['upsert_s']:,.0f} records/s)", flush=True)
    build_s: dict[str, float] = {}
    for count in threads:
        built = in_child(build, str(store_path), n, args.ann, count)
        info = built["info"]
        build_s[str(count)] = min(info["build_seconds"], build_s.get(str(count), float("inf")))
        print(
            f"build on {count} thread(s): {info['build_seconds']:.1f} s ({built['wall_s']:.1f} s with loading and "
            f"saving; load average {os.getloadavg()[0]:.1f}); efSearch {info['ef_search']}, recall@10 "
            f"{info['recall_at_10']:.3f} at build; peak RSS {built['peak_rss_bytes'] / 2**20:,.0f} MiB",
            flush=True,
        )

    measured = in_child(query, str(store_path), n, str(queries_path))
    files = {path.name: path.stat().st_size for path in store_path.parent.iterdir()}
    raw_bytes, disk_bytes = n * DIM * 4, sum(files.values())
    for name, size in sorted(files.items()):
        print(f"  {name}: {size / 2**20:,.1f} MiB ({size / raw_bytes:.3f} x raw)")
    found_recall = recall(np.array(measured["found"]), np.array(loaded["truth"]))
    peak = measured["peak_rss_bytes"]
    print(
        f"raw {raw_bytes / 2**20:,.0f} MiB, disk {disk_bytes / 2**20:,.0f} MiB ({disk_bytes / raw_bytes:.3f} x raw); "
        f"open {measured['open_s']:.2f} s, +{measured['open_rss_bytes'] / 2**20:,.0f} MiB; open and "
        f"{args.queries} queries: peak RSS +{peak / 2**20:,.0f} MiB ({peak / raw_bytes:.3f} x raw, "
        f"{peak / disk_bytes:.3f} x disk; file pages mapped at the end {measured['rss_file_bytes'] / 2**20:,.0f} MiB)"
    )
    print(
        f"p50 {measured['p50_ms']:.3f} ms, p99 {measured['p99_ms']:.3f} ms, recall@10 {found_recall:.4f}; "
        f"build {' / '.join(f'{t} thread(s) {s:.1f} s' for t, s in build_s.items())}"
        + (f" (ratio {build_s['2'] / build_s['1']:.2f})" if {"1", "2"} <= build_s.keys() else "")
        + f"; load average at the end {os.getloadavg()[0]:.1f}"
    )
    summary = {
        "n": n, "dim": DIM, "ann": args.ann, "raw_bytes": raw_bytes, "disk_bytes": disk_bytes,
        "disk_ratio": round(disk_bytes / raw_bytes, 4), "peak_rss_bytes": peak, "build_s": build_s,
        "p50_ms": round(measured["p50_ms"], 4), "recall_at_10": round(found_recall, 4),
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
