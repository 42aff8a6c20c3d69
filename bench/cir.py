"""Composed image retrieval and triplet synthesis: what the loops cost beyond the model calls they make.

    python bench/cir.py [--n 100000] [--queries 200] [--triplets 20] [--repeats 3]

Part 1, CIR query latency on an `--n`-vector embedded index (synthetic unit vectors of tiny:clip's
width, plus one real reference picture; the store's default engine at that size), each query against
plain text→image retrieval (`Retriever.search`: embed the text with tiny:clip, search the store):

- `cir`: the CIR graph (sidecar description, composing with an instant scripted LLM, the edited
  description embedded with tiny:clip and searched, the reference left out);
- `cir --cir-model`: the graph with a composed-query model (a saved random Combiner; the reference's
  stored vector and the change's text vector, combined, then searched);
- `cir --proxy`: the graph drawing a proxy with the tiny generator (`--generator`, 64x64, 2 steps) and
  fusing the text and proxy top `rerank_depth` (100).

The variants run interleaved per query (rotating which goes first) in one process; medians. The LLM
answers instantly, so the ratios are the loop's own overhead; with a real LLM its latency adds to the
`cir` rows.

Part 2, triplets per second with the tiny generator: the triplets graph (instant scripted LLM, the
diptych drawn by the tiny generator at 128x64 with 2 steps, split, both halves and the record written
and fsynced) against the bare generator call at the same size and steps, `--triplets` of each per
repeat, alternating which goes first. The ratio is seconds per triplet over seconds per bare call.

The last line is JSON: {"n", "text_p50_ms", "cir_p50_ms", "cir_ratio", "model_p50_ms", "model_ratio",
"proxy_p50_ms", "proxy_ratio", "triplets_per_s", "bare_calls_per_s", "triplet_ratio"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageloop.graphs.cir import CIRContext, build_cir_graph
from imageloop.graphs.triplets import TripletsContext, build_triplets_graph
from imageloop.protocols import GREEDY, Decoding, GenerationRequest, Message, VectorRecord
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.generators.diptych import GeneratorDiptychs
from imageloop.tools.images import content_id
from imageloop.tools.indexing.image_index import create_or_open_index
from imageloop.tools.indexing.retriever import Retriever
from imageloop.tools.triplet_dataset import TripletDataset

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "purple", "orange")
UPSERT_BATCH = 10_000


class InstantLLM:
    """Answers at once: an edited description for composing, a verdict-free script for triplets."""

    model_id = "instant:llm"

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        if json_schema is not None:
            return json.dumps({"reference": "a cup on a table", "change": "make it red", "target": "a red cup"})
        instruction = messages[-1].text.rsplit("Instruction: ", 1)[-1]
        return f"Edited Description: a cup on a table, {instruction}"


def build_index(folder: Path, n: int, embedder: Any) -> Path:
    """`n` synthetic records plus one real reference picture (with a sidecar caption) in an embedded index."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    reference = folder / "reference.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(reference)
    reference.with_suffix(".txt").write_text("a red cup on a wooden table")
    index = create_or_open_index(folder, embedder)
    rng = np.random.default_rng(0)
    for start in range(0, n, UPSERT_BATCH):
        m = min(UPSERT_BATCH, n - start)
        vectors = rng.standard_normal((m, embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        records = [
            VectorRecord(f"{start + i:064x}", vectors[i], {"path": f"img{start + i}.png", "caption": "", "folder": "."})
            for i in range(m)
        ]
        index.store.upsert(records)
    with Image.open(reference) as picture:
        vector = embedder.embed_images([picture.convert("RGB")])[0]
    index.store.upsert([VectorRecord(content_id(reference), vector, {"path": "reference.png", "caption": ""})])
    index.close()
    return reference


def interleaved(variants: dict[str, Callable[[int], Any]], queries: int) -> dict[str, list[float]]:
    """Each variant once per query, rotating which goes first; seconds per call."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for q in range(queries):
        for name in names[q % len(names) :] + names[: q % len(names)]:
            started = time.perf_counter()
            variants[name](q)
            times[name].append(time.perf_counter() - started)
    return times


def query_latency(n: int, queries: int, generator_spec: str, work: Path) -> dict[str, float]:
    """Part 1: medians in milliseconds and ratios to text-only retrieval."""
    from imageloop.backends import make_embedder, make_generator
    from imageloop.config import load_settings
    from imageloop.tools.indexing.image_index import open_index
    from imageloop.training.combiner import Combiner, CombinerConfig, save_cir_model

    settings = load_settings(overrides={"embedder": "tiny:clip", "generator": generator_spec, "size": "64x64"})
    embedder, generator = make_embedder(settings), make_generator(settings)
    started = time.perf_counter()
    reference = build_index(work / "index", n, embedder)
    print(f"built a {n:,}-vector index in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    retriever = Retriever(open_index(work / "index"), embedder)
    model_dir = work / "model"
    save_cir_model(model_dir, Combiner(CombinerConfig.for_features(embedder.dim)), embedder.model_id, {})
    from imageloop.app.cir import load_query_model

    graph = build_cir_graph(
        InstantLLM(), lambda path: "a red cup", generator, retriever, ArtifactStore(work / "artifacts"),
        query_models=load_query_model,
    )  # fmt: skip

    def change(q: int) -> str:
        return f"make it {COLOURS[q % len(COLOURS)]} with {q % 7 + 1} handles"

    def cir(q: int, **knobs: Any) -> None:
        graph.invoke({"reference": str(reference), "change": change(q)}, context=CIRContext(k=10, **knobs))

    variants: dict[str, Callable[[int], Any]] = {
        "text": lambda q: retriever.search(f"a cup on a table, {change(q)}", 10),
        "cir": cir,
        "model": lambda q: cir(q, cir_model=str(model_dir)),
        "proxy": lambda q: cir(q, proxy=True, steps=2, size=(64, 64)),
    }
    for name in variants:  # warm-up: models loaded, caches filled
        variants[name](0)
    times = interleaved(variants, queries)
    ann = retriever.index.store.get_meta().get("ann") or {}
    engine = f"{ann['engine']}, recall@10 {ann['recall_at_10']}" if ann.get("engine") else "exact search"
    retriever.index.close()
    p50 = {name: 1000 * statistics.median(values) for name, values in times.items()}
    print(f"\n{n:,} vectors ({engine}), {queries} queries, median ms per query:", file=sys.stderr)
    for name, value in p50.items():
        ratio = value / p50["text"]
        print(f"  {name:6s} {value:8.2f} ms   x{ratio:.2f} text-only", file=sys.stderr)
    return {
        "text_p50_ms": round(p50["text"], 3),
        "cir_p50_ms": round(p50["cir"], 3),
        "cir_ratio": round(p50["cir"] / p50["text"], 3),
        "model_p50_ms": round(p50["model"], 3),
        "model_ratio": round(p50["model"] / p50["text"], 3),
        "proxy_p50_ms": round(p50["proxy"], 3),
        "proxy_ratio": round(p50["proxy"] / p50["text"], 3),
    }


def triplet_rate(count: int, repeats: int, generator_spec: str, work: Path) -> dict[str, float]:
    """Part 2: triplets per second through the graph against bare generator calls per second."""
    from imageloop.backends import make_generator
    from imageloop.config import load_settings

    generator = make_generator(load_settings(overrides={"generator": generator_spec}))
    painter = GeneratorDiptychs(generator)
    size, steps = (128, 64), 2
    objects = ["cup", "chair", "lamp", "bicycle"]

    def bare() -> None:
        for i in range(count):
            generator.generate(GenerationRequest(prompt=f"a diptych of a cup {i}", seed=i, size=size, steps=steps))

    def graphed(repeat: int) -> None:
        with TripletDataset(work / f"triplets-{repeat}") as dataset:
            graph = build_triplets_graph(InstantLLM(), painter, dataset)
            context = TripletsContext(n=count, objects=objects, seed=repeat, size=size, steps=steps, concurrency=1)
            graph.invoke({}, {"recursion_limit": 4 * count + 20}, context=context)

    bare()  # warm-up
    bare_s, graph_s = [], []
    for repeat in range(repeats):
        order = [("bare", bare), ("graph", lambda r=repeat: graphed(r))]
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            run()
            (bare_s if name == "bare" else graph_s).append((time.perf_counter() - started) / count)
    per_triplet, per_call = statistics.median(graph_s), statistics.median(bare_s)
    print(
        f"\ntriplets with {generator.model_id} at {size[0]}x{size[1]}, {steps} steps: "
        f"{1 / per_triplet:.2f} triplets/s, bare generator {1 / per_call:.2f} calls/s, x{per_triplet / per_call:.2f}",
        file=sys.stderr,
    )
    return {
        "triplets_per_s": round(1 / per_triplet, 3),
        "bare_calls_per_s": round(1 / per_call, 3),
        "triplet_ratio": round(per_triplet / per_call, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the index")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--triplets", type=int, default=20, help="triplets (and bare calls) per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generator", default="tiny:sd", help="the tiny generator (tiny:sd, tiny:flux)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        figures = {"n": args.n, **query_latency(args.n, args.queries, args.generator, work)}
        figures |= triplet_rate(args.triplets, args.repeats, args.generator, work)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
