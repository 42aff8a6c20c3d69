"""Retrieval at scale: the embedded store against bare FAISS, side by side in one run on the same vectors.

    python bench/retrieval.py --n 100000 [--queries 1000] [--data lowrank|uniform] [--chroma]

Exact search: our store with the ANN index off vs `faiss.IndexFlatIP`. Approximate search: our
store's HNSW index vs `faiss.IndexHNSWFlat` with the same M, efConstruction and efSearch (ours is
tuned at build for recall@10 >= 0.95; the baseline is given the value it chose). Each pair runs in
one fresh process: both are loaded, then every query goes to both, alternating which goes first, so
a busy machine slows both alike. Memory is the process's peak RSS (VmHWM, reset before each phase)
above what it held before: opening our store, or building the FAISS index from the vectors. The
store is built once beforehand (upsert in 10,000-record transactions, then the HNSW index).

With `--chroma` (needs `pip install imageloop[chroma]`), one more row: our Chroma store (Chroma's
persistent local client, its default HNSW: M 16, efConstruction 100, efSearch 100) built from the
same vectors and metadata through `ChromaVectorStore.upsert`, then queried alone in a fresh process
(load includes its first search, which reads the HNSW segment). It takes minutes at 100,000.

Data, `lowrank` (default): x = normalise(W z + 0.3 e) with z in R^32: like real image embeddings, the
vectors have a low intrinsic dimension. `uniform` vectors (normalised Gaussian noise) have no
neighbourhood structure: the true top-10 are barely closer than the rest, and no ANN index reaches
the recall goal on them without scanning most of the data (HNSW32 at efSearch 128: recall 0.13 at
200,000).

Goals: at N = 1,000,000 (HNSW) p50 <= 5 ms, recall@10 >= 0.95, ratio <= 1.2 against bare FAISS
HNSW; at N = 100,000 (exact) ratio <= 1.2 against IndexFlatIP. The last line is JSON for the engine
the store uses by default at this N: {"n", "p50_ms", "recall_at_10", "baseline_p50_ms", "ratio"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageloop.protocols import VectorRecord
from imageloop.tools.stores.embedded import DEFAULT_ANN_THRESHOLD, EmbeddedVectorStore

DIM = 512
K = 10
LATENT_DIM = 32
NOISE = 0.3
UPSERT_BATCH = 10_000
FILTER_QUERIES = 200
# Filters exercised: a folder (10% of records), a common tag (1%) and a rare one (0.1%).
FILTERS: dict[str, tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray]]] = {
    "folder 10%": ({"folder": "d3"}, lambda i: i % 10 == 3),
    "tag 1%": ({"tags": "t7"}, lambda i: i % 100 == 7),
    "tag 0.1%": ({"tags": "u7"}, lambda i: i % 1000 == 7),
}


def synthetic_blocks(n: int, kind: str, seed: int) -> Iterator[np.ndarray]:
    """`n` unit vectors of dimension 512 (see the module docstring for the two kinds), 100,000 at a time."""
    mixing = np.random.default_rng(0).standard_normal((DIM, LATENT_DIM), dtype=np.float32) / np.sqrt(LATENT_DIM)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, DIM), dtype=np.float32)
        if kind == "lowrank":
            block = rng.standard_normal((m, LATENT_DIM), dtype=np.float32) @ mixing.T + NOISE * noise / np.sqrt(DIM)
        else:
            block = noise
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def synthetic(n: int, kind: str, seed: int) -> np.ndarray:
    """`synthetic_blocks` in one matrix."""
    out = np.empty((n, DIM), dtype=np.float32)
    for start, block in zip(range(0, n, 100_000), synthetic_blocks(n, kind, seed), strict=True):
        out[start : start + len(block)] = block
    return out


def metadata(i: int) -> dict[str, Any]:
    return {"path": f"d{i % 10}/{i:07d}.png", "folder": f"d{i % 10}", "tags": [f"t{i % 100}", f"u{i % 1000}"]}


def exact_truth(data: np.ndarray, queries: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The exact top-10 row numbers for each query (over `rows` only, when given)."""
    subset = data if rows is None else data[rows]
    truth = np.empty((len(queries), K), dtype=np.int64)
    for start in range(0, len(queries), 50):
        scores = queries[start : start + 50] @ subset.T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        truth[start : start + 50] = top if rows is None else rows[top]
    return truth


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Memory:
    """Peak RSS of one phase above the RSS before it (Linux: VmHWM, reset through clear_refs)."""

    def __enter__(self) -> Memory:
        Path("/proc/self/clear_refs").write_text("5")
        self.before = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = _status_mib("VmHWM") - self.before
        self.held_mib = _status_mib("VmRSS") - self.before


def interleaved(
    ours: Callable[[np.ndarray], Any], theirs: Callable[[np.ndarray], Any], queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query latency (ms) of two searches over the same queries, alternating which runs first."""
    for query in queries[:10]:
        ours(query), theirs(query)
    times = np.zeros((2, len(queries)))
    for i, query in enumerate(queries):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            search = ours if side == 0 else theirs
            started = time.perf_counter()
            search(query)
            times[side, i] = time.perf_counter() - started
    return times[0] * 1000, times[1] * 1000


def latency(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "qps": 1000 / ms.mean()}


def build_store(store_path: str, data_path: str, ann_threshold: int) -> dict[str, Any]:
    """Child: upsert every vector with its metadata in batches, then build and save the HNSW index."""
    data = np.load(data_path)
    with Memory() as memory:
        store = EmbeddedVectorStore(Path(store_path), ann_threshold=ann_threshold, ann="hnsw")
        started = time.perf_counter()
        for start in range(0, len(data), UPSERT_BATCH):
            block = data[start : start + UPSERT_BATCH]
            store.upsert([VectorRecord(str(start + j), block[j], metadata(start + j)) for j in range(len(block))])
        upserted = time.perf_counter()
        info = store.refresh()
        indexed = time.perf_counter()
        store.close()
    return {
        "upsert_s": upserted - started,
        "index_s": indexed - upserted,
        "ann_info": info,
        "peak_mib": memory.peak_mib,
    }


def compare(
    engine: str, store_path: str, data_path: str, queries_path: str, ann_threshold: int | None, hnsw: dict[str, Any]
) -> dict[str, Any]:
    """Child: our store and bare FAISS (`engine` "exact" or "hnsw") loaded side by side, queried alternately."""
    import faiss

    queries = np.load(queries_path)
    with Memory() as ours_memory:
        started = time.perf_counter()
        store = EmbeddedVectorStore(Path(store_path), ann_threshold=ann_threshold)
        info = store.ann_info()  # loads the saved HNSW index, or every vector for exact search
        ours: dict[str, Any] = {"load_s": time.perf_counter() - started, "ann_info": info}
    assert info["engine"] == engine, info
    with Memory() as faiss_memory:
        data = np.load(data_path)
        started = time.perf_counter()
        if engine == "exact":
            index = faiss.IndexFlatIP(DIM)
        else:
            index = faiss.IndexHNSWFlat(DIM, hnsw["m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = hnsw["ef_construction"]
        index.add(data)
        theirs: dict[str, Any] = {"build_s": time.perf_counter() - started}
        del data
    if engine == "hnsw":
        index.hnsw.efSearch = hnsw["ef_search"]
    for side, memory in ((ours, ours_memory), (theirs, faiss_memory)):
        side["peak_mib"], side["held_mib"] = memory.peak_mib, memory.held_mib

    ours_ms, theirs_ms = interleaved(lambda q: store.search(q, K), lambda q: index.search(q[None, :], K), queries)
    ours.update(latency(ours_ms))
    theirs.update(latency(theirs_ms))
    started = time.perf_counter()
    batched = store.search_many(queries, K)
    ours["batch_qps"] = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    _, theirs["found"] = index.search(queries, K)
    theirs["batch_qps"] = len(queries) / (time.perf_counter() - started)
    ours["found"] = np.array([[int(hit.id) for hit in hits] for hits in batched])
    singles = np.array([[int(hit.id) for hit in store.search(q, K)] for q in queries[:50]])
    ours["batch_matches_single"] = bool((singles == ours["found"][:50]).all())
    if engine == "hnsw":
        with tempfile.TemporaryDirectory() as tmp:
            faiss.write_index(index, str(Path(tmp) / "hnsw.faiss"))
            theirs["disk_bytes"] = (Path(tmp) / "hnsw.faiss").stat().st_size
    else:
        theirs["disk_bytes"] = index.ntotal * DIM * 4

    ours["filters"] = filtered_searches(store, queries)
    store.close()
    return {"ours": ours, "faiss": theirs}


def filtered_searches(store: Any, queries: np.ndarray) -> dict[str, dict[str, Any]]:
    """Latency and hits of `store.search` under each of FILTERS, over the first FILTER_QUERIES queries."""
    figures = {}
    for name, (where, _) in FILTERS.items():
        ms = []
        found = []
        for query in queries[:FILTER_QUERIES]:
            started = time.perf_counter()
            hits = store.search(query, K, where=where)
            ms.append((time.perf_counter() - started) * 1000)
            found.append([int(hit.id) for hit in hits] + [-1] * (K - len(hits)))
        figures[name] = {**latency(np.asarray(ms[10:])), "found": np.array(found)}
    return figures


def build_chroma(chroma_path: str, data_path: str) -> dict[str, Any]:
    """Child: upsert every vector with its metadata into a Chroma store, in UPSERT_BATCH batches."""
    from imageloop.tools.stores.chroma_store import ChromaVectorStore

    data = np.load(data_path)
    with Memory() as memory:
        store = ChromaVectorStore(Path(chroma_path))
        started = time.perf_counter()
        for start in range(0, len(data), UPSERT_BATCH):
            block = data[start : start + UPSERT_BATCH]
            store.upsert([VectorRecord(str(start + j), block[j], metadata(start + j)) for j in range(len(block))])
        store.close()  # inside the timing: what Chroma writes out on close is part of the build
        build_s = time.perf_counter() - started
    return {"build_s": build_s, "peak_mib": memory.peak_mib}


def query_chroma(chroma_path: str, queries_path: str) -> dict[str, Any]:
    """Child: the Chroma store opened afresh, then queried like our store in `compare` (alone: no pair)."""
    from imageloop.tools.stores.chroma_store import ChromaVectorStore

    queries = np.load(queries_path)
    with Memory() as memory:
        started = time.perf_counter()
        store = ChromaVectorStore(Path(chroma_path), create=False)
        store.search(queries[0], K)
        result: dict[str, Any] = {"load_s": time.perf_counter() - started}
    result["peak_mib"], result["held_mib"] = memory.peak_mib, memory.held_mib
    for query in queries[:10]:
        store.search(query, K)
    ms = np.zeros(len(queries))
    for i, query in enumerate(queries):
        started = time.perf_counter()
        store.search(query, K)
        ms[i] = (time.perf_counter() - started) * 1000
    result.update(latency(ms))
    started = time.perf_counter()
    batched = store.search_many(queries, K)
    result["batch_qps"] = len(queries) / (time.perf_counter() - started)
    result["found"] = np.array([[int(hit.id) for hit in hits] + [-1] * (K - len(hits)) for hits in batched])
    result["filters"] = filtered_searches(store, queries)
    store.close()
    return result


def in_child(function: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run `function` in a fresh process, so its memory and caches are its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000, help="queries for the HNSW engines")
    parser.add_argument("--exact-queries", type=int, default=200, help="queries for the exact engines")
    parser.add_argument("--data", choices=("lowrank", "uniform"), default="lowrank")
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--chroma", action="store_true", help="add the Chroma store (the chroma extra) as one more row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    n = args.n
    threads = {name: os.environ.get(name, "unset") for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    print(
        f"n={n:,} d={DIM} k={K} data={args.data} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} {threads}",
        flush=True,
    )
    data, queries = synthetic(n, args.data, seed=1), synthetic(max(args.queries, args.exact_queries), args.data, seed=2)
    store_path = tmp / "store" / "index.sqlite"
    paths = {"data": tmp / "data.npy", "hnsw": tmp / "queries.npy", "exact": tmp / "exact_queries.npy"}
    np.save(paths["data"], data)
    np.save(paths["hnsw"], queries[: args.queries])
    np.save(paths["exact"], queries[: args.exact_queries])
    truth = exact_truth(data, queries)
    rows = np.arange(n)
    filter_truth = {
        name: exact_truth(data, queries[:FILTER_QUERIES], rows[accept(rows)]) for name, (_, accept) in FILTERS.items()
    }
    del data

    # The HNSW index is built at every N so that both comparisons run; the default engine picks the JSON.
    ann_threshold = min(DEFAULT_ANN_THRESHOLD, n - 1)
    built = in_child(build_store, str(store_path), str(paths["data"]), ann_threshold)
    hnsw_bytes = sum(p.stat().st_size for p in store_path.parent.glob("*-ann-*"))
    store_bytes = sum(p.stat().st_size for p in store_path.parent.iterdir()) - hnsw_bytes
    info = built["ann_info"]
    print(
        f"store build: upsert {built['upsert_s']:.1f} s, HNSW {built['index_s']:.1f} s "
        f"(graph {info['build_seconds']:.1f} s on {info['threads']} threads with efSearch tuning, then save; "
        f"M={info['m']}, efConstruction={info['ef_construction']}, efSearch tuned to {info['ef_search']}: "
        f"recall@10 {info['recall_at_10']:.3f} on {info['recall_method']}), peak RSS +{built['peak_mib']:.0f} MiB; "
        f"SQLite and vectors {store_bytes / 2**20:.0f} MiB, HNSW graph file {hnsw_bytes / 2**20:.0f} MiB",
        flush=True,
    )

    exact = in_child(compare, "exact", str(store_path), str(paths["data"]), str(paths["exact"]), None, info)
    ann = in_child(compare, "hnsw", str(store_path), str(paths["data"]), str(paths["hnsw"]), ann_threshold, info)
    chroma_path = tmp / "chroma"
    if args.chroma:
        chroma_built = in_child(build_chroma, str(chroma_path), str(paths["data"]))
        print(
            f"Chroma build: {chroma_built['build_s']:.1f} s, peak RSS +{chroma_built['peak_mib']:.0f} MiB", flush=True
        )
        chroma = in_child(query_chroma, str(chroma_path), str(paths["hnsw"]))

    print(
        f"{'engine':11} {'p50 ms':>8} {'p99 ms':>8} {'QPS':>7} {'batch QPS':>9} {'recall@10':>9} {'disk MiB':>8} "
        f"{'peak RSS+':>9} {'held RSS+':>9}  build/load"
    )
    rows_out = [
        ("store exact", exact["ours"], store_bytes, f"load {exact['ours']['load_s']:.1f} s"),
        ("FAISS flat", exact["faiss"], exact["faiss"]["disk_bytes"], f"build {exact['faiss']['build_s']:.1f} s"),
        ("store HNSW", ann["ours"], store_bytes + hnsw_bytes, f"load {ann['ours']['load_s']:.1f} s"),
        ("FAISS HNSW", ann["faiss"], ann["faiss"]["disk_bytes"], f"build {ann['faiss']['build_s']:.1f} s"),
    ]
    if args.chroma:
        chroma_bytes = sum(p.stat().st_size for p in chroma_path.rglob("*") if p.is_file())
        rows_out.append(
            ("Chroma", chroma, chroma_bytes, f"build {chroma_built['build_s']:.1f} s, load {chroma['load_s']:.1f} s")
        )
    recalls = {}
    for name, result, size, when in rows_out:
        recalls[name] = recall(result["found"], truth[: len(result["found"])])
        print(
            f"{name:11} {result['p50_ms']:8.3f} {result['p99_ms']:8.3f} {result['qps']:7.0f} "
            f"{result['batch_qps']:9.0f} {recalls[name]:9.4f} {size / 2**20:8.0f} {result['peak_mib']:9.0f} "
            f"{result['held_mib']:9.0f}  {when}"
        )
    filtered = [("store exact", exact["ours"]), ("store HNSW", ann["ours"])] + (
        [("Chroma", chroma)] if args.chroma else []
    )
    for label, ours in filtered:
        for name in FILTERS:
            measured = ours["filters"][name]
            print(
                f"{label:11} where {name:10}: p50 {measured['p50_ms']:7.3f} ms, p99 {measured['p99_ms']:7.3f} ms, "
                f"recall@10 {recall(measured['found'], filter_truth[name]):.4f}"
            )
        if not ours.get("batch_matches_single", True):
            print(f"note: {label} batched results differ from single searches (float rounding of near-ties)")
    for label, pair in (("exact", exact), ("HNSW", ann)):
        ratio = pair["ours"]["p50_ms"] / pair["faiss"]["p50_ms"]
        print(f"{label} p50 ratio store / FAISS: {ratio:.3f}")

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    uses_hnsw = n > DEFAULT_ANN_THRESHOLD
    pair = ann if uses_hnsw else exact
    print(f"default engine at n={n:,}: {'HNSW' if uses_hnsw else 'exact'} (threshold {DEFAULT_ANN_THRESHOLD:,})")
    summary = {
        "n": n,
        "p50_ms": round(pair["ours"]["p50_ms"], 4),
        "recall_at_10": round(recalls["store HNSW" if uses_hnsw else "store exact"], 4),
        "baseline_p50_ms": round(pair["faiss"]["p50_ms"], 4),
        "ratio": round(pair["ours"]["p50_ms"] / pair["faiss"]["p50_ms"], 4),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
