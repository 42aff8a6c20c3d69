"""Composed image retrieval over the application's backends: one query (`compose_retrieve`) and the benchmarks.

Both run the CIR graph (`imageloop.graphs.cir`). A query searches the index's own retriever; an
evaluation searches each benchmark gallery exactly (`imageloop.eval.cir`). A composed-query model
(`cir_model`, a folder `imageloop train cir` wrote) loads once per process and must have been trained
on the index's embedder. Proxy images are kept under `<runs>/cir/artifacts` (or the evaluation's
folder), by content.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop import limits
from imageloop.app.cluster import RayGiven, ray_options, runner
from imageloop.app.results import CIRResult, shown_list
from imageloop.errors import ImageloopError
from imageloop.eval.cir import (
    EVAL_SETTINGS,
    QUERIES,
    SUMMARY,
    BenchmarkQuery,
    CIREvalSettings,
    GalleryRetriever,
    MemoCaptioner,
    evaluate_queries,
    finished,
    known_descriptions,
    load_benchmarks,
    locate,
    query_search,
    summarise,
)
from imageloop.eval.cir_data import CIRBenchmark
from imageloop.files import write_json_atomic
from imageloop.graphs.cir import ComposedQueryModel, build_cir_graph
from imageloop.graphs.steps import Step, play
from imageloop.knobs import CIRKnobs, Given
from imageloop.progress import OnProgress
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel
from imageloop.tools.artifacts import ArtifactStore

if TYPE_CHECKING:
    from imageloop.app.core import App

OnStep = Callable[[Step], None]
OnQuery = Callable[[int, int], None]


def load_query_model(folder: str) -> ComposedQueryModel:
    """The composed-query model in `folder`, loaded once per process (again if it is trained anew)."""
    from imageloop.runtime import load_cached
    from imageloop.training.combiner import MODEL_CONFIG
    from imageloop.training.models import load_query_model as load

    path = Path(folder).resolve()
    config = path / MODEL_CONFIG  # written last by every training: its time marks the weights beside it
    stamp = config.stat().st_mtime_ns if config.is_file() else None
    model: ComposedQueryModel = load_cached(("cir-model", str(path), stamp), lambda: load(path))
    return model


class OnFirstUse:
    """A VLM built on its first call, so a run that never asks one (a composed-query model) needs none configured."""

    def __init__(self, build: Callable[[], VisionLanguageModel]) -> None:
        self._build = build

    @property
    def model_id(self) -> str:
        """The built model's id."""
        return self._build().model_id

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        """Build the model (once: backends are cached) and ask it."""
        return self._build().chat(messages, json_schema, decoding)


def captioner_for(app: App) -> Callable[[Path], str]:
    """The one captioning rule's captioner (the captioner role, else the VLM), built on first use."""
    from imageloop.agents.captioner import VLMCaptioner

    def caption(path: Path) -> str:
        return VLMCaptioner(app.vlm(role="captioner"))(path)

    return caption


def _model_folder(app: App, cir_model: str | Path | None) -> str | None:
    return str(app.path(cir_model, "cir model", kind="dir")) if cir_model is not None else None


def compose_retrieve(
    app: App,
    index: str | Path,
    reference: str | Path,
    change: str,
    *,
    knobs: Given = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> CIRResult:
    """Find the images of `index` that show `reference` changed as `change` says; `knobs` are CIR's
    (`CIRKnobs`; unset: the settings'), a `cir_model` folder confined like every path."""
    given = CIRKnobs.given(knobs)
    resolved = CIRKnobs.from_settings(app.settings).overridden(given)
    reference_path = app.path(reference, "reference", kind="file")
    change = limits.check_text("change", change)
    model = _model_folder(app, resolved.cir_model)
    retriever = app.retriever(index)
    artifacts = ArtifactStore(app.runs_dir / "cir" / "artifacts")
    graph = build_cir_graph(
        OnFirstUse(app.vlm),  # type: ignore[arg-type]  # model_id is a property here
        captioner_for(app),
        app.generator() if resolved.proxy else None,
        retriever,
        artifacts,
        query_models=load_query_model,
        defaults=resolved.overridden({"cir_model": model}),
        paths=app.file_path,
    )
    inputs = {"reference": str(reference_path), "change": change}
    state = play(graph, inputs, on_step=on_step, on_progress=on_progress)
    proxy_image = state.get("proxy_image")
    return CIRResult(
        reference=str(reference_path),
        change=change,
        reference_description=state.get("reference_description"),
        edited_description=state.get("edited_description"),
        results=shown_list(state.get("results", [])),
        proxy_image=str(artifacts.path(proxy_image)) if proxy_image else None,
        stop_reason=state.get("stop_reason"),
        verifications=state.get("verification", 0),
        attempts=state.get("attempts", []),
        knobs=state["knobs"].record(),
        steps=state.get("steps", []),
    )


@dataclass(frozen=True)
class CIRQueries:
    """A CIR evaluation's per-query work, as any process (this one, or a cluster's worker) binds it: the
    benchmarks, the index, the knobs, the results folder and the references described before."""

    benchmarks: tuple[CIRBenchmark, ...]
    index: Path
    knobs: CIRKnobs
    out: Path
    known: Mapping[str, str]

    def bind(self, app: App) -> Callable[[BenchmarkQuery], dict[str, Any]]:
        """Each benchmark's graph over its gallery (searched exactly), with `app`'s models."""
        image_index, embedder = app.index(self.index), app.embedder()
        captioner = MemoCaptioner(captioner_for(app), self.known)
        generator = app.generator() if self.knobs.proxy else None
        llm: Any = OnFirstUse(app.vlm)  # a VisionLanguageModel whose model_id is a property
        artifacts = ArtifactStore(self.out / "artifacts")
        runs = []
        for benchmark in self.benchmarks:
            gallery = GalleryRetriever(image_index, embedder, benchmark.gallery)
            graph = build_cir_graph(
                llm, captioner, generator, gallery, artifacts, query_models=load_query_model, defaults=self.knobs,
                paths=app.file_path,
            )  # fmt: skip
            runs.append((benchmark, gallery, graph))
        return query_search(runs)


def run_cir_eval(
    app: App,
    index: str | Path,
    annotations: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    split: str | None = None,
    images: str | Path | None = None,
    knobs: Given = None,
    concurrency: int = 1,
    ray: RayGiven = None,
    on_query: OnQuery | None = None,
) -> dict[str, Any]:
    """Run every benchmark query not yet in `out_dir` through the CIR graph; write and return the summary.

    `concurrency` queries run at once (on each worker with `ray`: see `imageloop.app.cluster`).
    CIRR: `{"n", "recall_at", "recall_subset_at", "avg", "settings"}` (test1: `{"n", "submission"}`);
    FashionIQ: `{"n", "categories", "avg_at_10", "avg_at_50", "avg", "settings"}`; recalls in percent.
    """
    limits.check("concurrency", concurrency)
    cluster = ray_options(ray, confined=app.roots is not None)
    resolved = CIRKnobs.from_settings(app.settings).overridden(knobs)
    spec = locate(app.path(annotations, "annotations"), fmt, split)
    benchmarks = load_benchmarks(spec, app.path(images, "images", kind="dir") if images is not None else None)
    resolved = resolved.overridden({"cir_model": _model_folder(app, resolved.cir_model)})
    image_index = app.index(index)
    embedder = app.embedder()
    out = app.path(out_dir, "out", kind="out")
    out.mkdir(parents=True, exist_ok=True)
    settings = app.settings
    eval_settings = CIREvalSettings(
        format=spec.format,
        split=spec.split,
        benchmarks=[b.name for b in benchmarks],
        index=str(image_index.root),
        embedder=embedder.model_id,
        vlm="-" if resolved.cir_model else str(settings.role_spec("vlm")),
        generator=str(settings.role_spec("generator")) if resolved.proxy else "-",
        knobs=resolved.record(),
    )
    known = known_descriptions(finished(out / QUERIES).values(), benchmarks)
    work = CIRQueries(tuple(benchmarks), image_index.root, resolved, out, known)
    # Here the galleries are read now: one missing from the index is named before anything is written.
    run = runner(app, work, concurrency=concurrency, ray=cluster)
    settings_file = out / EVAL_SETTINGS
    if settings_file.exists() and json.loads(settings_file.read_text(encoding="utf-8")) != asdict(eval_settings):
        raise ImageloopError(f"{out} holds an evaluation with other settings: use another `out` folder")
    write_json_atomic(settings_file, asdict(eval_settings))
    done = evaluate_queries(benchmarks, out, run, on_query=on_query)
    summary = summarise(benchmarks, done, eval_settings, out)
    write_json_atomic(out / SUMMARY, summary)
    return summary
