"""GenIR evaluation: a simulated user searches for each target; cumulative Hits@K per round.

The run directory holds `dialogues.jsonl` (one line per finished target: every round's query,
synthetic image, retrieved ids with scores and the target's rank), `summary.json`, the synthetic
images under `artifacts/`, and `eval.json` (the settings). A re-run with the same settings skips the
targets already in `dialogues.jsonl`, so an interrupted evaluation loses at most the targets in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imageloop.config import FeedbackKind
from imageloop.errors import ImageloopError
from imageloop.eval.metrics import cumulative_hits_at_k, mean_best_rank, per_round_hits_at_k
from imageloop.files import append_json_lines, read_json_lines
from imageloop.graphs.genir import GenIRContext, GenIRGraph
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.images import IMAGE_SUFFIXES, content_id
from imageloop.tools.indexing.image_index import ImageIndex

DIALOGUES = "dialogues.jsonl"
SUMMARY = "summary.json"
EVAL_SETTINGS = "eval.json"


@dataclass(frozen=True)
class Target:
    """An image the simulated user looks for: its index id and a path to show the VLM."""

    id: str
    path: Path


@dataclass(frozen=True)
class GenIREvalSettings:
    """What makes two evaluation runs comparable; a resume must match it exactly."""

    rounds: int
    k: int
    feedback: FeedbackKind
    rank_depth: int
    seed: int | None
    vlm: str
    generator: str
    embedder: str
    index: str


def _target_files(spec: Path) -> list[Path]:
    if spec.is_dir():
        return sorted(p for p in spec.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if spec.is_file():
        lines = [line.strip() for line in spec.read_text(encoding="utf-8").splitlines()]
        return [(spec.parent / line) for line in lines if line and not line.startswith("#")]
    raise ImageloopError(f"--targets {spec}: no such file or folder")


def load_targets(spec: Path, index: ImageIndex) -> list[Target]:
    """Targets from a folder of images or a file listing paths; each must be in the index."""
    targets: list[Target] = []
    for path in _target_files(spec):
        if not path.is_file():
            raise ImageloopError(f"target {path} does not exist")
        target_id = content_id(path)
        if not index.store.get([target_id]):
            raise ImageloopError(f"target {path} is not in the index at {index.root}: index it first")
        targets.append(Target(target_id, path.resolve()))
    if not targets:
        raise ImageloopError(f"--targets {spec}: no target images found")
    return targets


def _dialogue_record(target: Target, state: Mapping[str, Any], artifacts: ArtifactStore) -> dict[str, Any]:
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
                "next_query": r["feedback"],
            }
            for r in state.get("rounds", [])
        ],
    }


def summarise(records: Iterable[dict[str, Any]], settings: GenIREvalSettings) -> dict[str, Any]:
    """Hits@K per round (cumulative), per-round hits and mean best rank over the finished dialogues."""
    ranks = [[r["target_rank"] for r in record["rounds"]] for record in records]
    cumulative = cumulative_hits_at_k(ranks, settings.k, settings.rounds)
    return {
        "rounds": [{"round": t, "hits_at_k": round(h, 4)} for t, h in enumerate(cumulative)],
        "k": settings.k,
        "n_targets": len(ranks),
        "per_round_hits_at_k": [round(h, 4) for h in per_round_hits_at_k(ranks, settings.k, settings.rounds)],
        "mean_rank": [round(r, 2) for r in mean_best_rank(ranks, settings.rounds, settings.rank_depth)],
        "settings": asdict(settings),
    }


def evaluate_targets(
    graph: GenIRGraph,
    targets: list[Target],
    out_dir: Path,
    *,
    rounds: int,
    k: int,
    feedback: FeedbackKind,
    rank_depth: int,
    concurrency: int = 1,
    on_target: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Search for every target not already in `dialogues.jsonl`, appending (fsynced) as each finishes.

    The graph's own defaults (the drawing knobs among them) apply except for the knobs given here.
    """
    artifacts = ArtifactStore(out_dir / "artifacts")
    dialogues = out_dir / DIALOGUES
    done = {record["target_id"]: record for record in read_json_lines(dialogues)}
    pending = [t for t in targets if t.id not in done]

    def search(target: Target) -> dict[str, Any]:
        context = GenIRContext(
            user="simulated", target_id=target.id, target_path=str(target.path), feedback=feedback,
            max_rounds=rounds, k=k, rank_depth=rank_depth,
        )  # fmt: skip
        state = graph.invoke({}, version="v2", context=context).value
        return _dialogue_record(target, state, artifacts)

    finished = len(targets) - len(pending)
    if on_target is not None:
        on_target(finished, len(targets))
    with ThreadPoolExecutor(concurrency) as pool:
        for record in append_json_lines(dialogues, pool.map(search, pending)):
            done[record["target_id"]] = record
            finished += 1
            if on_target is not None:
                on_target(finished, len(targets))
    return done
