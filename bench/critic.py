"""Cost of judging one image: the single-call critic (+ the rewriter's captions) vs the paper's three-turn critic.

Both sides get a scripted VLM that sleeps a fixed latency per call, and are run interleaved. Per judged
image we count VLM calls, image attachments sent (each call of the paper's conversation re-sends the
image on its first turn) and wall time, for a draft that misses concepts (verdict + captions, what a
regeneration needs) and for an aligned draft (verdict only). The ratio is paper / single.

    python bench/critic.py [--latency-ms 50] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageloop.agents.critic import Critic, Critique, PaperCritic
from imageloop.agents.rewriter import QueryRewriter
from tests.fakes import ScriptedVLM

PROMPT = "a Cyanocitta cristata perched on a snowy branch, ukiyo-e style"
IMAGE = Path("draft.png")  # never opened: the scripted VLM only records it
MAX_CONCEPTS = 3
MISSING = ["Cyanocitta cristata", "ukiyo-e style"]
CAPTIONS = ["A blue jay with a blue crest perched on a branch.", "A Japanese ukiyo-e woodblock print of a bird."]

SCRIPTS: dict[str, dict[str, list[object]]] = {
    "not aligned": {
        "single": [
            {"aligned": False, "missing_concepts": MISSING},
            {"captions": [{"concept": c, "caption": t} for c, t in zip(MISSING, CAPTIONS, strict=True)]},
        ],
        "paper": ["No.", "\n".join(MISSING), "\n".join(CAPTIONS)],
    },
    "aligned": {"single": [{"aligned": True, "missing_concepts": []}], "paper": ["Yes."]},
}


@dataclass
class Measure:
    """One side's cost for one judged image."""

    calls: int
    images_sent: int
    seconds: float


def single_call(vlm: ScriptedVLM) -> Critique:
    """What the graph does today: the structured verdict, then the rewriter's captions when not aligned."""
    critique = Critic(vlm).critique(PROMPT, IMAGE, MAX_CONCEPTS)
    if not critique.aligned:
        QueryRewriter(vlm).write_captions(PROMPT, critique.missing_concepts)
    return critique


def paper(vlm: ScriptedVLM) -> Critique:
    """The paper's critic, which writes the captions itself."""
    return PaperCritic(vlm).critique(PROMPT, IMAGE, MAX_CONCEPTS)


def measure(judge: Callable[[ScriptedVLM], Critique], script: list[object], latency: float) -> Measure:
    vlm = ScriptedVLM(list(script), latency_s=latency)
    started = time.perf_counter()
    judge(vlm)
    seconds = time.perf_counter() - started
    images = sum(len(m.images) for messages, _ in vlm.calls for m in messages)
    return Measure(len(vlm.calls), images, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    summary: dict[str, object] = {"latency_ms": args.latency_ms, "runs": args.runs}
    print(f"per judged image, scripted VLM at {args.latency_ms:.0f} ms a call, {args.runs} runs (median)")
    print(f"{'draft':<12} {'critic':<8} {'calls':>5} {'images':>6} {'ms':>8}")
    for case, scripts in SCRIPTS.items():
        sides: dict[str, list[Measure]] = {"single": [], "paper": []}
        for _ in range(args.runs):  # interleaved, so drift affects both sides alike
            sides["single"].append(measure(single_call, scripts["single"], latency))
            sides["paper"].append(measure(paper, scripts["paper"], latency))
        medians = {side: statistics.median(m.seconds for m in runs) for side, runs in sides.items()}
        for side, runs in sides.items():
            print(f"{case:<12} {side:<8} {runs[0].calls:>5} {runs[0].images_sent:>6} {medians[side] * 1000:>8.1f}")
        ratio = medians["paper"] / medians["single"]
        print(f"{case:<12} paper / single wall time: {ratio:.2f}")
        summary[case] = {
            side: {"calls": runs[0].calls, "images_sent": runs[0].images_sent, "ms": round(medians[side] * 1000, 2)}
            for side, runs in sides.items()
        } | {"ratio": round(ratio, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
