"""Evaluations over the application's backends: the harnesses live in `imageloop.eval`, the wiring here."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop import limits
from imageloop.app.paths import make_out_dir
from imageloop.app.sessions import genir_knobs
from imageloop.errors import ImageloopError
from imageloop.eval.genir import EVAL_SETTINGS, SUMMARY, GenIREvalSettings, evaluate_targets, load_targets, summarise
from imageloop.files import write_json_atomic
from imageloop.graphs.genir import build_genir_graph
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.embedders.batching import BatchingEmbedder
from imageloop.tools.indexing.retriever import Retriever

if TYPE_CHECKING:
    from imageloop.app.core import App

OnTarget = Callable[[int, int], None]


def run_genir_eval(
    app: App,
    index: str | Path,
    targets: str | Path,
    out_dir: str | Path,
    *,
    knobs: Mapping[str, Any] | None = None,
    concurrency: int = 1,
    on_target: OnTarget | None = None,
) -> dict[str, Any]:
    """Run the simulated-user loop for every target not yet done in `out_dir`; write and return the summary.

    `knobs` may set feedback, rounds, k, rank_depth and the drawing knobs (else the settings').
    """
    settings = app.with_knobs(**(knobs or {}))
    limits.check("concurrency", concurrency)
    folder = app.index(index).root
    embedder = app.embedder(settings)
    # Concurrent searches share embedding calls: one batch costs about what one item does on a GPU.
    retriever = Retriever(app.index(folder), BatchingEmbedder(embedder) if concurrency > 1 else embedder)
    uses_generator = settings.feedback in ("visual", "hybrid")
    eval_settings = GenIREvalSettings(
        rounds=settings.rounds,
        k=settings.k,
        feedback=settings.feedback,
        rank_depth=settings.rank_depth,
        seed=settings.seed,
        vlm=str(settings.role_spec("vlm")),
        generator=str(settings.role_spec("generator")) if uses_generator else "-",
        embedder=embedder.model_id,
        index=str(folder),
    )
    target_list = load_targets(app.path(targets, "targets"), retriever.index)
    out = make_out_dir(app.path(out_dir, "results folder", kind="out"), "results folder")
    settings_file = out / EVAL_SETTINGS
    if settings_file.exists() and json.loads(settings_file.read_text()) != asdict(eval_settings):
        raise ImageloopError(f"{out} holds an evaluation with other settings: use another --out")
    write_json_atomic(settings_file, asdict(eval_settings))
    graph = build_genir_graph(
        app.vlm(settings),
        app.generator(settings) if uses_generator else None,
        retriever,
        ArtifactStore(out / "artifacts"),
        defaults=genir_knobs(settings),
    )
    done = evaluate_targets(
        graph, target_list, out, rounds=settings.rounds, k=settings.k, feedback=settings.feedback,
        rank_depth=settings.rank_depth, concurrency=concurrency, on_target=on_target,
    )  # fmt: skip
    wanted = {t.id for t in target_list}
    summary = summarise((r for target_id, r in done.items() if target_id in wanted), eval_settings)
    write_json_atomic(out / SUMMARY, summary)
    return summary
