"""Running a loop end to end and writing its record: the one entry point the CLI and servers share.

A run directory holds `final.png`, `draft.png` (draft-first mode), `artifacts/` (every image, by
sha256), `run.json`, written atomically, and `report.html` (the run as a page; `imageloop.report`).
A run that fails part-way still writes its record, with the steps taken so far and the error, so
nothing already paid for is lost.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imageloop import __version__
from imageloop.backends import make_embedder, make_generator, make_vlm
from imageloop.config import Settings
from imageloop.errors import ImageloopError
from imageloop.files import write_json_atomic
from imageloop.graphs.imagerag import ImageRAGState, build_imagerag_graph
from imageloop.graphs.steps import Step
from imageloop.report import write_report
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.retriever import Retriever

RUN_RECORD = "run.json"


def _export_image(artifacts: ArtifactStore, artifact_id: str | None, target: Path) -> str | None:
    if artifact_id is None:
        return None
    shutil.copyfile(artifacts.path(artifact_id), target)
    return str(target.resolve())


def imagerag_record(
    state: Mapping[str, Any],
    settings: Settings,
    out_dir: Path,
    artifacts: ArtifactStore,
    index_path: Path,
    seconds: float,
    error: str | None = None,
) -> dict[str, Any]:
    """Build run.json from the final (or last known) state, exporting final.png and draft.png."""
    draft = _export_image(artifacts, state.get("draft_image"), out_dir / "draft.png")
    final_id = state.get("final_image") or state.get("current_image")
    final = _export_image(artifacts, final_id, out_dir / "final.png")
    return {
        "prompt": state.get("prompt"),
        "mode": state.get("mode", settings.mode),
        "aligned": bool(state.get("aligned", False)),
        "iterations": int(state.get("iteration", 0)),
        "draft_image": draft,
        "final_image": final,
        "references": [
            {"path": h["path"], "caption": h["caption"], "score": h["score"], "concept": h["concept"]}
            for h in state.get("references") or []
        ],
        "missing_concepts": state.get("missing_concepts", []),
        "retrieval_captions": state.get("retrieval_captions", []),
        "images": [
            {**image, "path": str(artifacts.path(image["artifact"]).resolve())} for image in state.get("images", [])
        ],
        "steps": state.get("steps", []),
        "stop_reason": "error" if error else state.get("stop_reason"),
        "error": error,
        "models": {role: str(settings.role_spec(role)) for role in ("vlm", "generator", "embedder")},
        "settings": settings.model_dump(
            include={"max_iterations", "similarity_threshold", "top_k", "max_concepts", "seed", "size", "steps"}
        ),
        "index": str(index_path.resolve()),
        "seconds": round(seconds, 3),
        "imageloop_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_imagerag(
    prompt: str,
    settings: Settings,
    index_path: Path,
    out_dir: Path,
    on_step: Callable[[Step], None] | None = None,
) -> dict[str, Any]:
    """Run ImageRAG for `prompt` against the index at `index_path`; returns the written record."""
    if not prompt.strip():
        raise ImageloopError("the prompt is empty")
    index = open_index(index_path)
    embedder = make_embedder(settings)
    retriever = Retriever(index, embedder)
    vlm, generator = make_vlm(settings), make_generator(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = ArtifactStore(out_dir / "artifacts")
    graph = build_imagerag_graph(vlm, generator, retriever, artifacts)
    inputs: ImageRAGState = {
        "prompt": prompt,
        "mode": settings.mode,
        "max_iterations": settings.max_iterations,
        "similarity_threshold": settings.similarity_threshold,
        "top_k": settings.top_k,
        "max_concepts": settings.max_concepts,
        "seed": settings.seed,
        "size": settings.size,
        "steps_per_image": settings.steps,
    }
    state: dict[str, Any] = dict(inputs)
    started = time.perf_counter()
    error: str | None = None
    try:
        for values in graph.stream(inputs, stream_mode="values"):
            reported = len(state.get("steps", []))
            state = dict(values)
            if on_step is not None:
                for step in state.get("steps", [])[reported:]:
                    on_step(step)
    except (ImageloopError, KeyboardInterrupt) as e:
        error = str(e) or type(e).__name__
        raise
    finally:
        record = imagerag_record(state, settings, out_dir, artifacts, index_path, time.perf_counter() - started, error)
        write_json_atomic(out_dir / RUN_RECORD, record)
        write_report(out_dir, record)
    return record
