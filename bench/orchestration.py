"""Orchestration overhead of the ImageRAG graph vs the same calls in a plain Python loop.

Both sides make identical model calls (fake backends sleeping a fixed latency) and the same parsing
and artifact writes; the difference is LangGraph's scheduling, state merging and step records.
Goal: graph wall time / plain loop <= 1.05 at 50 ms per model call.

    python bench/orchestration.py [--latency-ms 50] [--runs 10] [--iterations 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageloop.agents.critic import Critic
from imageloop.agents.rewriter import QueryRewriter
from imageloop.graphs.imagerag import build_imagerag_graph
from imageloop.protocols import GenerationRequest, ReferenceImage
from imageloop.tools.artifacts import ArtifactStore
from tests.fakes import ScriptedGenerator, ScriptedRetriever, ScriptedVLM

PROMPT = "a Cyanocitta cristata perched on a snowy branch"
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["Cyanocitta cristata"]}
CAPTIONS = {"captions": [{"concept": "Cyanocitta cristata", "caption": "a blue jay on a branch"}]}
HITS = {"jay": [("jay.png", 0.9)]}


def script(iterations: int) -> list[object]:
    """Critic answers for `iterations` regenerations that never align (so every node runs)."""
    return [NOT_ALIGNED, CAPTIONS] * iterations + [NOT_ALIGNED]


def _library(root: Path) -> Path:
    """A folder the scripted hits exist in (the graph skips references whose file is gone)."""
    folder = root / "library"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def plain_loop(latency: float, iterations: int, root: Path) -> float:
    """The same calls, hand-written: draft, then critique / caption / retrieve / regenerate."""
    vlm = ScriptedVLM(script(iterations), latency_s=latency)
    generator = ScriptedGenerator(latency_s=latency)
    retriever = ScriptedRetriever(HITS, root=_library(root), latency_s=latency)
    artifacts = ArtifactStore(root)
    critic, rewriter = Critic(vlm), QueryRewriter(vlm)
    started = time.perf_counter()
    image = artifacts.put(generator.generate(GenerationRequest(PROMPT, seed=0)).image)
    for _ in range(iterations):
        verdict = critic.judge(PROMPT, artifacts.path(image), 3)
        captions = rewriter.write_captions(PROMPT, verdict.missing_concepts)
        refs = [
            ReferenceImage(hit.path, c.concept, hit.caption, hit.score)
            for c in captions
            for hit in retriever.search(c.caption, 1)
        ]
        image = artifacts.put(generator.generate(GenerationRequest(PROMPT, tuple(refs), seed=0)).image)
    critic.judge(PROMPT, artifacts.path(image), 3)
    return time.perf_counter() - started


def graph_loop(latency: float, iterations: int, root: Path) -> float:
    """The ImageRAG graph over the same fakes."""
    vlm = ScriptedVLM(script(iterations), latency_s=latency)
    graph = build_imagerag_graph(
        vlm,
        ScriptedGenerator(latency_s=latency),
        ScriptedRetriever(HITS, root=_library(root), latency_s=latency),
        ArtifactStore(root),
    )
    started = time.perf_counter()
    graph.invoke({"prompt": PROMPT}, version="v2", context={"max_iterations": iterations})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    plain, graph = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):  # interleaved, so drift affects both sides alike
            plain.append(plain_loop(latency, args.iterations, Path(tmp) / f"p{run}"))
            graph.append(graph_loop(latency, args.iterations, Path(tmp) / f"g{run}"))
    calls = 2 + 5 * args.iterations  # draft + final critique + (critic, rewriter, retrieve, generate, ...) per round
    plain_s, graph_s = statistics.median(plain), statistics.median(graph)
    print(f"model calls per run: ~{calls}, latency {args.latency_ms:.0f} ms, {args.runs} runs (median)")
    print(f"plain loop: {plain_s * 1000:.1f} ms")
    print(f"graph:      {graph_s * 1000:.1f} ms")
    print(f"overhead per run: {(graph_s - plain_s) * 1000:.2f} ms")
    print(json.dumps({"latency_ms": args.latency_ms, "plain_ms": round(plain_s * 1000, 2),
                      "graph_ms": round(graph_s * 1000, 2), "ratio": round(graph_s / plain_s, 4)}))  # fmt: skip


if __name__ == "__main__":
    main()
