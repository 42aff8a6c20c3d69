"""GenIR evaluation: a simulated user searches for each target; cumulative Hits@K per round, as the paper counts.

Rounds are counted as GenIR counts them: `rounds=10` is round 0 (the first description) plus 10
refinement rounds, reported as rounds 0..10. A dialogue runs until its target ranks below the
smallest K or the rounds run out, so Hits@K for every K in `ks` comes from the same dialogues (a
cumulative hit at the smallest K is a hit at every larger one).

Hybrid feedback comes in two kinds. Ours (`hybrid_rule="confidence"`) decides per round inside the
graph: draw first, show the top hit once retrieval looks confident. The paper's decides per query:
`random` shows a drawing to a seeded share (`hybrid_visual_fraction`, 0.223 in the paper) of the
targets and the fallback feedback to the rest; `oracle` plays both and keeps the dialogue that found
its target first, a tie the fallback's (an upper bound that needs the target, so it exists only here).

The run directory holds `dialogues.jsonl` (one line per finished target: every round's query,
synthetic image, retrieved ids with scores, the target's rank and the round's seconds),
`summary.json`, the synthetic images under `artifacts/`, and `eval.json` (the settings). A re-run with
the same settings skips the targets already in `dialogues.jsonl`, so an interrupted evaluation loses at
most the targets in flight. `rescore_text` re-scores the saved queries with text-only retrieval (the
paper's check that its dialogues carry the information, not only its drawings).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageloop.agents.simulated_user import user_decoding
from imageloop.errors import ConfigError, ImageloopError
from imageloop.eval import Run, journaled
from imageloop.eval.genir_data import BenchmarkTarget
from imageloop.eval.metrics import cumulative_hits_at_k, mean_best_rank, per_round_hits_at_k
from imageloop.files import read_jsonl
from imageloop.graphs.genir import GenIRContext, GenIRGraph
from imageloop.knobs import FeedbackKind, GenIREvalKnobs
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.images import IMAGE_SUFFIXES, content_id
from imageloop.tools.indexing.image_index import ImageIndex
from imageloop.tools.indexing.retriever import Retriever

DIALOGUES = "dialogues.jsonl"
SUMMARY = "summary.json"
TEXT_RESCORE = "text_rescore.json"
EVAL_SETTINGS = "eval.json"


@dataclass(frozen=True)
class Target:
    """An image the simulated user looks for: its index id and a path to show the VLM."""

    id: str
    path: Path


@dataclass(frozen=True)
class GenIREvalSettings:
    """What makes two evaluation runs comparable (a resume must match it exactly): the knobs it ran with and
    the models. A dialogue stops at the smallest of `ks`; the hybrid knobs matter only for hybrid feedback."""

    knobs: GenIREvalKnobs
    vlm: str
    generator: str
    embedder: str
    index: str

    def __post_init__(self) -> None:
        """Refuse a rank depth that would cut off a K the evaluation scores."""
        if self.knobs.rank_depth < max(self.ks):
            raise ConfigError(f"rank_depth {self.knobs.rank_depth} is below the largest K {max(self.ks)}: raise it")

    @property
    def ks(self) -> list[int]:
        """The K values scored: `ks`, else `k`."""
        return list(self.knobs.ks or (self.knobs.k,))

    @property
    def stop_k(self) -> int:
        """The K a dialogue stops at: the smallest."""
        return min(self.ks)

    @property
    def per_query_hybrid(self) -> bool:
        """Whether hybrid feedback is chosen per query (the paper's) rather than per round (ours)."""
        return self.knobs.feedback == "hybrid" and self.knobs.hybrid_rule != "confidence"

    def to_json(self) -> dict[str, Any]:
        """The settings as `eval.json` holds them: the knobs (with `ks` filled in and the simulated user's
        effective decoding), then the models."""
        knobs = self.knobs
        decoding = user_decoding(
            knobs.simulated_user, knobs.user_temperature, knobs.user_top_p, knobs.user_repetition_penalty
        )
        effective = {name: getattr(decoding, name) for name in ("temperature", "top_p", "repetition_penalty")}
        models = {"vlm": self.vlm, "generator": self.generator, "embedder": self.embedder, "index": self.index}
        return {**knobs.record(), "ks": self.ks, "user_decoding": effective, **models}

    @classmethod
    def from_json(cls, recorded: Mapping[str, Any]) -> GenIREvalSettings:
        """The settings an `eval.json` holds."""
        knobs = GenIREvalKnobs.model_validate({k: v for k, v in recorded.items() if k in GenIREvalKnobs.model_fields})
        return cls(knobs, *(str(recorded[name]) for name in ("vlm", "generator", "embedder", "index")))


def _target_files(spec: Path) -> list[Path]:
    if spec.is_dir():
        return sorted(p for p in spec.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if spec.is_file() and spec.suffix.lower() in IMAGE_SUFFIXES:
        return [spec]
    if spec.is_file():
        lines = [line.strip() for line in spec.read_text(encoding="utf-8").splitlines()]
        return [(spec.parent / line) for line in lines if line and not line.startswith("#")]
    raise ImageloopError(f"`targets` {spec}: no such file or folder")


def indexed_targets(paths: Iterable[Path], index: ImageIndex) -> list[Target]:
    """Each image as a target under its index id (the sha256 of its bytes); one missing from the index is refused."""
    targets: list[Target] = []
    for path in paths:
        if not path.is_file():
            raise ImageloopError(f"target {path} does not exist")
        target_id = content_id(path)
        if not index.store.get([target_id]):
            raise ImageloopError(f"target {path} is not in the index at {index.root}: index it first")
        targets.append(Target(target_id, path.resolve()))
    return targets


def load_targets(spec: Path, index: ImageIndex) -> list[Target]:
    """Targets from a folder of images, one image, or a file listing paths; each must be in the index."""
    targets = indexed_targets(_target_files(spec), index)
    if not targets:
        raise ImageloopError(f"`targets` {spec}: no target images found")
    return targets


def benchmark_targets(targets: Sequence[BenchmarkTarget], index: ImageIndex) -> list[Target]:
    """A benchmark's targets (see `imageloop.eval.genir_data`) as index targets; index the corpus first."""
    return indexed_targets((t.path for t in targets), index)


def _finished(dialogues: Path) -> dict[str, dict[str, Any]]:
    return {record["target_id"]: record for record in read_jsonl(dialogues)}


def _round_seconds(steps: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Seconds spent per round: every step of the round (drawing, retrieval, the user's answer, the rewrite)."""
    seconds: dict[int, float] = {}
    for step in steps:
        seconds[step["iteration"]] = seconds.get(step["iteration"], 0.0) + float(step["seconds"])
    return seconds


def _dialogue_record(target: Target, state: Mapping[str, Any], artifacts: ArtifactStore) -> dict[str, Any]:
    seconds = _round_seconds(state.get("steps", []))
    return {
        "target_id": target.id,
        "target_path": str(target.path),
        "stop_reason": state.get("stop_reason"),
        "rounds": [
            {
                "round": r["round"],
                "query": r["query"],
                "feedback_kind": r["feedback_kind"],
                "synthetic_image": str(artifacts.path(r["synthetic_image"])) if r["synthetic_image"] else None,
                "retrieved": [{"id": hit["id"], "score": hit["score"]} for hit in r["retrieved"]],
                "target_rank": r["target_rank"],
                "differences": r["differences"],
                "question": r.get("question"),
                "next_query": r["feedback"],
                "seconds": round(seconds.get(r["round"], 0.0), 4),
            }
            for r in state.get("rounds", [])
        ],
    }


def _first_hit(ranks: Sequence[int | None], k: int) -> float:
    return next((float(t) for t, rank in enumerate(ranks) if rank is not None and rank < k), float("inf"))


def summarise(records: Iterable[Mapping[str, Any]], settings: GenIREvalSettings) -> dict[str, Any]:
    """Per round 0..rounds: cumulative and per-round Hits@K for every K, mean seconds, mean best rank.

    `hits_at_k` and `k` are those of the smallest K; `latency_s` averages the dialogues that played the round.
    A dialogue that stopped (its target found) counts its last rank again at every later round; each round
    says how many of its values were carried forward so (`carried`, of `n_targets`), and `played` how many
    dialogues really played it.
    """
    records = list(records)
    played = settings.knobs.rounds + 1
    ranks = [[r["target_rank"] for r in record["rounds"]] for record in records]
    carried = [sum(1 for per_target in ranks if 0 < len(per_target) <= t) for t in range(played)]
    cumulative = {k: cumulative_hits_at_k(ranks, k, played) for k in settings.ks}
    per_round = {k: per_round_hits_at_k(ranks, k, played) for k in settings.ks}
    latency = []
    for t in range(played):
        times = [r["seconds"] for record in records for r in record["rounds"] if r["round"] == t and "seconds" in r]
        latency.append(round(sum(times) / len(times), 4) if times else None)
    summary: dict[str, Any] = {
        "rounds": [
            {
                "round": t,
                "hits_at_k": round(cumulative[settings.stop_k][t], 4),
                "hits_at": {str(k): round(cumulative[k][t], 4) for k in settings.ks},
                "per_round_hits_at": {str(k): round(per_round[k][t], 4) for k in settings.ks},
                "latency_s": latency[t],
                "played": sum(1 for per_target in ranks if len(per_target) > t),
                "carried": carried[t],
            }
            for t in range(played)
        ],
        "k": settings.stop_k,
        "ks": list(settings.ks),
        "n_targets": len(ranks),
        "per_round_hits_at_k": [round(h, 4) for h in per_round[settings.stop_k]],
        "mean_rank": [round(r, 2) for r in mean_best_rank(ranks, played, settings.knobs.rank_depth)],
        "settings": settings.to_json(),
    }
    if settings.per_query_hybrid and records:
        visual = sum(1 for record in records if record.get("hybrid", {}).get("chosen") == "visual")
        summary["hybrid"] = {"rule": settings.knobs.hybrid_rule, "visual_share": round(visual / len(records), 4)}
    return summary


def hybrid_arms(settings: GenIREvalSettings, target_id: str) -> list[FeedbackKind]:
    """The feedback each of a target's dialogues plays: one arm, or both for the oracle (visual first)."""
    knobs = settings.knobs
    if not settings.per_query_hybrid:
        return [knobs.feedback]
    if knobs.hybrid_rule == "oracle":
        return ["visual", knobs.hybrid_fallback]
    # Seeded by the run's seed and the target, so a resumed or repeated run makes the same choices.
    draw = random.Random(f"{knobs.seed}:{target_id}").random()
    return ["visual" if draw < knobs.hybrid_visual_fraction else knobs.hybrid_fallback]


def _oracle_pick(arms: Mapping[FeedbackKind, dict[str, Any]], settings: GenIREvalSettings) -> FeedbackKind:
    """Visual only where its dialogue found the target at the smallest K strictly before the fallback's: a tie
    (both at the same round, or neither) goes to the fallback, which needs no drawing (the paper's oracle)."""

    def first_hit(arm: FeedbackKind) -> float:
        return _first_hit([r["target_rank"] for r in arms[arm]["rounds"]], settings.stop_k)

    return (
        "visual" if first_hit("visual") < first_hit(settings.knobs.hybrid_fallback) else settings.knobs.hybrid_fallback
    )


def target_search(graph: GenIRGraph, settings: GenIREvalSettings, out_dir: Path) -> Callable[[Target], dict[str, Any]]:
    """One target's work, the same in this process and on a cluster's worker: its dialogue (or its hybrid arms'),
    drawings kept under `out_dir/artifacts`; the result is the target's line of `dialogues.jsonl`.

    Each target runs with the evaluation's knobs (the graph's defaults), its feedback and stopping K set here.
    """
    artifacts = ArtifactStore(out_dir / "artifacts")

    def play(target: Target, feedback: FeedbackKind) -> dict[str, Any]:
        context = GenIRContext(feedback=feedback, k=settings.stop_k, target_id=target.id, target_path=str(target.path))
        state = graph.invoke({}, version="v2", context=context).value
        return _dialogue_record(target, state, artifacts)

    def search(target: Target) -> dict[str, Any]:
        arms = {arm: play(target, arm) for arm in hybrid_arms(settings, target.id)}
        if not settings.per_query_hybrid:
            return next(iter(arms.values()))
        rule = settings.knobs.hybrid_rule
        chosen = _oracle_pick(arms, settings) if rule == "oracle" else next(iter(arms))
        hybrid: dict[str, Any] = {"rule": rule, "chosen": chosen}
        if len(arms) > 1:
            hybrid["arms"] = {arm: [r["target_rank"] for r in record["rounds"]] for arm, record in arms.items()}
        return {**arms[chosen], "hybrid": hybrid}

    return search


def evaluate_targets(
    run: Run[Target, dict[str, Any]],
    targets: list[Target],
    out_dir: Path,
    *,
    on_target: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Search for every target not already in `dialogues.jsonl` (`run` does each one's `target_search`, here or on
    a cluster), appending (fsynced) as each finishes."""
    dialogues = out_dir / DIALOGUES
    done = _finished(dialogues)
    pending = [t for t in targets if t.id not in done]
    for record in journaled(pending, run, dialogues, total=len(targets), on_progress=on_target):
        done[record["target_id"]] = record
    return done


def read_dialogues(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The finished dialogues of an evaluation folder, by target id; none is an error saying what to run."""
    done = _finished(out_dir / DIALOGUES)
    if not done:
        raise ImageloopError(f"{out_dir} holds no finished dialogues ({DIALOGUES}): run the GenIR evaluation first")
    return done


def rescore_text(
    records: Iterable[Mapping[str, Any]], retriever: Retriever, settings: GenIREvalSettings
) -> dict[str, Any]:
    """Hits@K of the saved queries searched as text alone (no drawing): the paper's dataset check.

    Each round's query is searched text→image; a dialogue that stopped early keeps its last rank for the
    rounds it did not play, as the image-query summary does.
    """
    depth = max(settings.knobs.rank_depth, max(settings.ks))
    rescored = []
    for record in records:
        queries = [r["query"] for r in record["rounds"]]
        rankings = retriever.search_many(queries, depth) if queries else []
        ids = [[hit.id for hit in ranking] for ranking in rankings]
        target = record["target_id"]
        rounds = [
            {"round": r["round"], "target_rank": found.index(target) if target in found else None}
            for r, found in zip(record["rounds"], ids, strict=True)
        ]
        rescored.append({**record, "rounds": rounds})
    return {**summarise(rescored, settings), "route": "text"}
