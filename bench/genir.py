"""GenIR benchmarks, side by side in one run.

1. Per-round orchestration overhead: the GenIR graph vs the same calls (draw, image→image search,
   simulated-user turn) in a plain Python loop, over fakes with a fixed latency per model call.
2. Evaluation throughput over many targets: one target at a time vs concurrent targets sharing a
   micro-batched embedder. The fake embedder behaves like a GPU: calls are serialised (one device)
   and cost a fixed overhead plus a small per-item time, so batching is what pays.

    python bench/genir.py [--targets 1000] [--rounds 3] [--latency-ms 20] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageloop.agents.simulated_user import SimulatedUser
from imageloop.eval import in_threads
from imageloop.eval.genir import GenIREvalSettings, Target, evaluate_targets, target_search
from imageloop.graphs.genir import build_genir_graph
from imageloop.protocols import GenerationRequest, Vector, VectorRecord
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.embedders.batching import BatchingEmbedder
from imageloop.tools.indexing.image_index import create_or_open_index
from imageloop.tools.indexing.retriever import Retriever
from tests.fakes import FakeHashEmbedder, ScriptedGenerator, ScriptedRankingRetriever, ScriptedVLM

TURN = {"differences": "bluer", "query": "a blue jay on a snowy branch"}


class DeviceLikeEmbedder(FakeHashEmbedder):
    """One device: calls serialised, each costing `call_s` plus `item_s` per item."""

    def __init__(self, call_s: float, item_s: float) -> None:
        super().__init__(dim=64, embeds_images=True, model_id="fake:device")
        self.call_s, self.item_s = call_s, item_s
        self.device = threading.Lock()
        self.calls = 0

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        with self.device:
            self.calls += 1
            time.sleep(self.call_s + self.item_s * len(images))
            return super().embed_images(images)


def per_round_overhead(latency: float, rounds: int, runs: int, root: Path) -> tuple[float, float]:
    """Median seconds for `rounds` rounds: plain loop, then graph, interleaved."""
    ranking = [("a", 0.5), ("t", 0.4)]
    plain, graph_times = [], []
    for run in range(runs):
        vlm = ScriptedVLM([TURN] * rounds, latency_s=latency)
        generator = ScriptedGenerator(latency_s=latency)
        retriever = _SlowRetriever([ranking], latency)
        artifacts = ArtifactStore(root / f"p{run}")
        user = SimulatedUser(vlm)
        started = time.perf_counter()
        query = user.describe(root / "target.png")  # the graph's describe_target
        for t in range(rounds):
            image = artifacts.put(generator.generate(GenerationRequest(query, seed=0)).image)
            retriever.search_image(artifacts.path(image), 2)
            if t + 1 < rounds:
                query = user.respond(root / "target.png", query, "visual", artifacts.path(image)).query
        plain.append(time.perf_counter() - started)

        vlm = ScriptedVLM([TURN] * rounds, latency_s=latency)
        slow_retriever = _SlowRetriever([ranking], latency)
        graph = build_genir_graph(
            vlm, ScriptedGenerator(latency_s=latency), slow_retriever, ArtifactStore(root / f"g{run}")
        )
        # `rounds` rounds played: round 0 plus rounds - 1 refinements, as GenIR counts them.
        context = {"target_id": "t", "target_path": str(root / "target.png"), "rounds": rounds - 1, "k": 1}
        started = time.perf_counter()
        graph.invoke({}, version="v2", context=context)
        graph_times.append(time.perf_counter() - started)
    return statistics.median(plain), statistics.median(graph_times)


class _SlowRetriever(ScriptedRankingRetriever):
    """A scripted retriever whose image search costs one model call (the embedding)."""

    def __init__(self, rankings: list[list[tuple[str, float]]], latency: float) -> None:
        super().__init__(rankings)
        self.latency = latency

    def search_image(self, image: Path, k: int, similarity_threshold: float | None = None) -> list:  # type: ignore[type-arg]
        time.sleep(self.latency)
        return super().search_image(image, k)


def eval_settings(refinements: int) -> GenIREvalSettings:
    """Visual feedback, Hits@10, ranks to 100, the scripted models."""
    return GenIREvalSettings(
        rounds=refinements, ks=[10], feedback="visual", hybrid_rule="confidence", hybrid_visual_fraction=0.223,
        hybrid_fallback="prediction", simulated_user="ours", user_decoding={}, rank_depth=100, seed=0,
        vlm="scripted:vlm", generator="scripted:generator", embedder="bench:device-like", index="bench",
    )  # fmt: skip


def eval_throughput(
    n: int, rounds: int, concurrency: int, root: Path, call_s: float, item_s: float
) -> dict[str, float]:
    """Targets per second: one at a time, concurrent without batching, concurrent with batching."""
    folder = root / "index"
    folder.mkdir()
    embedder = DeviceLikeEmbedder(call_s, item_s)
    index = create_or_open_index(folder, embedder)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.store.upsert([VectorRecord(f"{i:06d}", vectors[i], {"path": f"{i}.png", "caption": ""}) for i in range(n)])
    targets = [Target(f"{i:06d}", root / f"{i}.png") for i in range(n)]
    results: dict[str, float] = {}
    for name, workers, batched in [("one_at_a_time", 1, False), ("concurrent", concurrency, False),
                                    ("concurrent_batched", concurrency, True)]:  # fmt: skip
        retriever = Retriever(index, BatchingEmbedder(embedder, max_wait_s=0.002) if batched else embedder)
        out = root / name
        out.mkdir()
        graph = build_genir_graph(ScriptedVLM([lambda _: TURN] * (n * rounds)), ScriptedGenerator(), retriever,
                                  ArtifactStore(out / "artifacts"))  # fmt: skip
        started = time.perf_counter()
        evaluate_targets(in_threads(target_search(graph, eval_settings(rounds - 1), out), workers), targets, out)
        results[name] = n / (time.perf_counter() - started)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per model call, part 1")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--call-ms", type=float, default=10.0, help="embedder cost per call, part 2")
    parser.add_argument("--item-ms", type=float, default=0.2, help="embedder cost per item, part 2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, graph = per_round_overhead(args.latency_ms / 1000, args.rounds, args.runs, Path(tmp))
        overhead_ms = (graph - plain) / args.rounds * 1000
        print(f"per round: plain {plain / args.rounds * 1000:.1f} ms, graph {graph / args.rounds * 1000:.1f} ms "
              f"(+{overhead_ms:.2f} ms), ratio {graph / plain:.4f}")  # fmt: skip
        throughput = eval_throughput(args.targets, args.rounds, args.concurrency, Path(tmp), args.call_ms / 1000,
                                     args.item_ms / 1000)  # fmt: skip
    for name, rate in throughput.items():
        print(f"eval {name}: {rate:.1f} targets/s")
    batched_ratio = throughput["concurrent_batched"] / throughput["one_at_a_time"]
    print(f"batched / one-at-a-time throughput: {batched_ratio:.2f}x")
    print(json.dumps({"round_overhead_ratio": round(graph / plain, 4), "round_overhead_ms": round(overhead_ms, 3),
                      "eval_batched_speedup": round(batched_ratio, 2), "targets": args.targets}))  # fmt: skip


if __name__ == "__main__":
    main()
