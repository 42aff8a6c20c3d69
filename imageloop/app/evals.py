"""Evaluations over the application's backends: the harnesses live in `imageloop.eval`, the wiring here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop import limits
from imageloop.app.cluster import RayGiven, asked_options, ray_options, runner
from imageloop.app.paths import make_out_dir
from imageloop.app.runs import FINISHED, RUN_RECORD, run_imagerag
from imageloop.config import Settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.eval.genir import (
    EVAL_SETTINGS,
    SUMMARY,
    TEXT_RESCORE,
    GenIREvalSettings,
    Target,
    benchmark_targets,
    evaluate_targets,
    load_targets,
    read_dialogues,
    rescore_text,
    summarise,
    target_search,
)
from imageloop.eval.genir_data import GENIR_SAMPLE_SEED, load_genir_benchmark, sample
from imageloop.eval.imagerag import EVAL_SETTINGS as IMAGERAG_EVAL_SETTINGS
from imageloop.eval.imagerag import (
    METRICS,
    PromptCase,
    Scorer,
    evaluate_prompts,
    load_prompts,
    prompt_evaluation,
    real_image_files,
    write_eval_report,
)
from imageloop.eval.imagerag import SUMMARY as IMAGERAG_SUMMARY
from imageloop.eval.imagerag import summarise as summarise_imagerag
from imageloop.files import write_json_atomic
from imageloop.graphs.genir import build_genir_graph, refuse_caption_route
from imageloop.knobs import GenIREvalKnobs, Given, ImageRAGKnobs, SimulatedUserKnobs
from imageloop.report import read_record
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.image_index import ImageIndex

if TYPE_CHECKING:
    from imageloop.app.core import App

OnTarget = Callable[[int, int], None]
OnPrompt = Callable[[int, int], None]


def _targets(
    app: App,
    index: ImageIndex,
    targets: str | Path | None,
    benchmark: str | None,
    images: str | Path | None,
    annotations: str | Path | None,
    sample_size: int | None,
) -> list[Target]:
    """The targets: a folder or list of images, or a benchmark read from the user's disk (optionally sampled)."""
    if (targets is None) == (benchmark is None):
        raise ConfigError("give the targets (`targets`) or a benchmark (`benchmark` with `images`), not both")
    if targets is not None:
        if sample_size is not None or images is not None or annotations is not None:
            raise ConfigError("`sample`, `images` and `annotations` go with `benchmark`")
        return load_targets(app.path(targets, "targets"), index)
    if images is None:
        raise ConfigError(f"`benchmark` {benchmark} needs `images`: the folder the benchmark's images are in")
    limits.check("sample", sample_size)
    listed = load_genir_benchmark(
        str(benchmark),
        app.path(images, "images", kind="dir"),
        app.path(annotations, "annotations", kind="file") if annotations is not None else None,
    )
    return benchmark_targets(sample(listed, sample_size, GENIR_SAMPLE_SEED), index)


@dataclass(frozen=True)
class GenIRTargets:
    """A GenIR evaluation's per-target work, as any process (this one, or a cluster's worker) binds it."""

    index: Path
    out: Path
    settings: GenIREvalSettings

    def bind(self, app: App) -> Callable[[Target], dict[str, Any]]:
        """The target search over `app`'s models: the simulated user, the drawing (visual feedback) and retrieval."""
        knobs = self.settings.knobs
        graph = build_genir_graph(
            app.vlm(),
            app.generator() if knobs.feedback in ("visual", "hybrid") else None,
            app.retriever(self.index),
            ArtifactStore(self.out / "artifacts"),
            defaults=SimulatedUserKnobs.model_validate(knobs.model_dump(include=set(SimulatedUserKnobs.model_fields))),
            paths=app.file_path,
        )
        return target_search(graph, self.settings, self.out)


def run_genir_eval(
    app: App,
    index: str | Path,
    targets: str | Path | None,
    out_dir: str | Path,
    *,
    benchmark: str | None = None,
    images: str | Path | None = None,
    annotations: str | Path | None = None,
    sample: int | None = None,
    knobs: Given = None,
    concurrency: int = 1,
    ray: RayGiven = None,
    on_target: OnTarget | None = None,
) -> dict[str, Any]:
    """Run the simulated-user loop for every target not yet done in `out_dir`; write and return the summary.

    Targets are a folder or list of images (`targets`), or a benchmark (`benchmark`, `images`,
    `annotations`; `sample` draws that many with GenIR's seed 42). `knobs` are an evaluation's
    (`GenIREvalKnobs`: feedback, rounds, k, ks, the hybrid rule, the simulated user and its decoding, the
    drawing knobs; unset: the settings'). `concurrency` targets are searched at once (on each worker with
    `ray`: see `imageloop.app.cluster`).
    """
    resolved = GenIREvalKnobs.from_settings(app.settings).overridden(knobs)
    limits.check("concurrency", concurrency)
    cluster = ray_options(ray, confined=app.roots is not None)
    # Concurrent searches share the application's micro-batched models: one batch of model calls costs
    # about what one call does on a GPU.
    retriever = app.retriever(index)
    folder = retriever.index.root
    refuse_caption_route(resolved, retriever.route, f"the index at {folder}")
    draws = resolved.feedback in ("visual", "hybrid")
    eval_settings = GenIREvalSettings(
        resolved, vlm=str(app.settings.role_spec("vlm")),
        generator=str(app.settings.role_spec("generator")) if draws else "-",
        embedder=retriever.embedder.model_id, index=str(folder),
    )  # fmt: skip
    target_list = _targets(app, retriever.index, targets, benchmark, images, annotations, sample)
    out = make_out_dir(app.path(out_dir, "results folder", kind="out"), "results folder")
    settings_file = out / EVAL_SETTINGS
    if settings_file.exists() and json.loads(settings_file.read_text()) != eval_settings.to_json():
        raise ImageloopError(f"{out} holds an evaluation with other settings: use another `out` folder")
    write_json_atomic(settings_file, eval_settings.to_json())
    run = runner(app, GenIRTargets(folder, out, eval_settings), concurrency=concurrency, ray=cluster)
    done = evaluate_targets(run, target_list, out, on_target=on_target)
    wanted = {t.id for t in target_list}
    summary = summarise((r for target_id, r in done.items() if target_id in wanted), eval_settings)
    write_json_atomic(out / SUMMARY, summary)
    return summary


def rescore_genir_text(
    app: App, out_dir: str | Path, index: str | Path | None = None, *, ray: RayGiven = None
) -> dict[str, Any]:
    """Re-score an evaluation's saved queries with text-only retrieval; writes and returns `text_rescore.json`.

    The index defaults to the one the evaluation searched; the configured embedder must be the one that
    built it (its text tower embeds the queries). It runs in this process: a `ray` option is refused, not ignored.
    """
    if asked := asked_options(ray):  # the saved queries are searched here: there is nothing to hand out
        raise ConfigError(f"text re-scoring searches the saved queries in this process: drop `{min(asked)}`")
    out = app.path(out_dir, "evaluation folder", kind="dir")
    settings_file = out / EVAL_SETTINGS
    if not settings_file.is_file():
        raise ImageloopError(f"{out} is not a GenIR evaluation folder (no {EVAL_SETTINGS})")
    recorded = GenIREvalSettings.from_json(json.loads(settings_file.read_text()))
    retriever = app.retriever(index if index is not None else recorded.index)
    summary = rescore_text(read_dialogues(out).values(), retriever, recorded)
    summary["embedder"] = retriever.embedder.model_id
    write_json_atomic(out / TEXT_RESCORE, summary)
    return summary


def _metric_names(metrics: str | Sequence[str] | None, cases: Sequence[PromptCase]) -> list[str]:
    """The metrics asked for (`clip,siglip,...`), or all of them (dino only where there are real images)."""
    has_real = any(real_image_files(case) for case in cases)
    if metrics is None:
        return [name for name in METRICS if name != "dino" or has_real]
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = list(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ConfigError(f"`metrics` {metrics!r}: expected some of {','.join(METRICS)}")
    if "dino" in names and not has_real:
        raise ConfigError("dino compares with real images: pass `real_images` DIR, or a folder of classes as `prompts`")
    return names


def _scorer(app: App, settings: Settings, name: str) -> Scorer:
    """The scorer of metric `name`, its model built once per process like every backend."""
    from imageloop.eval.scorers import DinoScorer, TextImageScorer, VLMJudge, dino_encoder

    if name in ("clip", "siglip"):
        spec = settings.eval_clip if name == "clip" else settings.eval_siglip
        return TextImageScorer(name, app.embedder(settings.with_overrides({"embedder": spec})))
    if name == "dino":
        return DinoScorer(dino_encoder(settings.eval_dino, settings))
    return VLMJudge(app.vlm(settings.with_overrides({"vlm": settings.judge})))


@dataclass(frozen=True)
class ImageRAGPrompts:
    """An ImageRAG evaluation's per-prompt work, as any process (this one, or a cluster's worker) binds it:
    the index, the results folder, the knobs the run asked for and the metrics."""

    index: Path
    out: Path
    knobs: dict[str, Any]
    metrics: tuple[str, ...]

    def bind(self, app: App) -> Callable[[PromptCase], dict[str, Any]]:
        """The prompt's run (resumed where a killed one left it) and its scoring with `app`'s scorers."""
        scorers = [_scorer(app, app.settings, name) for name in self.metrics]

        def run_case(case: PromptCase, run_dir: Path) -> Mapping[str, Any]:
            if (run_dir / RUN_RECORD).is_file():
                previous = read_record(run_dir)
                # A record without a status is from before runs were recorded from their first step: finished.
                if previous.get("status", FINISHED) == FINISHED and previous.get("stop_reason") != "error":
                    return previous  # ran to its end before: score it as it is
                return run_imagerag(app, None, None, out_dir=run_dir, resume=True)  # failed, stopped or killed
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a run killed before it wrote any record: start it again
            return run_imagerag(app, case.prompt, self.index, out_dir=run_dir, knobs=self.knobs)

        return prompt_evaluation(self.out, run_case, scorers)


def run_imagerag_eval(
    app: App,
    prompts: str | Path,
    index: str | Path,
    out_dir: str | Path,
    *,
    real_images: str | Path | None = None,
    metrics: str | Sequence[str] | None = None,
    knobs: Given = None,
    concurrency: int = 1,
    ray: RayGiven = None,
    on_prompt: OnPrompt | None = None,
) -> dict[str, Any]:
    """Run ImageRAG for every prompt not yet scored in `out_dir`, score draft and final; write and return the summary.

    `prompts` is a text file or a folder of classes (`imageloop.eval.imagerag`); `knobs` are the loop's
    (`ImageRAGKnobs`; a preset profile sets them all); `concurrency` prompts run at once (on each worker with
    `ray`: see `imageloop.app.cluster`). The summary is `{"n", "metrics": {NAME: {"draft", "final",
    "delta"}}, "stop_reasons", "settings"}`, each entry a mean with its 95% interval.
    """
    settings = app.settings
    given = ImageRAGKnobs.given(knobs)
    resolved = ImageRAGKnobs.from_settings(settings).overridden(given)
    limits.check("concurrency", concurrency)
    cluster = ray_options(ray, confined=app.roots is not None)
    real_root = app.path(real_images, "real images", kind="dir") if real_images is not None else None
    cases = load_prompts(app.path(prompts, "prompts"), real_root)
    names = _metric_names(metrics, cases)
    folder = app.retriever(index).index.root  # refuses a missing, empty or mismatched index first
    specs = {"clip": settings.eval_clip, "siglip": settings.eval_siglip, "dino": settings.eval_dino,
             "vlmscore": settings.judge or str(settings.role_spec("vlm"))}  # fmt: skip
    eval_settings: dict[str, Any] = json.loads(
        json.dumps(
            {
                "metrics": {name: specs[name] for name in names},
                "models": {role: str(settings.role_spec(role)) for role in ("vlm", "generator", "embedder")},
                "index": str(folder),
                "knobs": resolved.record(),
            }
        )
    )
    out = make_out_dir(app.path(out_dir, "results folder", kind="out"), "results folder")
    settings_file = out / IMAGERAG_EVAL_SETTINGS
    if settings_file.exists() and json.loads(settings_file.read_text()) != eval_settings:
        raise ImageloopError(f"{out} holds an evaluation with other settings: use another `out` folder")
    write_json_atomic(settings_file, eval_settings)
    work = ImageRAGPrompts(folder, out, given.set_values(), tuple(names))
    run = runner(app, work, concurrency=concurrency, ray=cluster)
    done = evaluate_prompts(cases, out, run, on_prompt=on_prompt)
    records = [done[case.key] for case in cases if case.key in done]
    summary = {**summarise_imagerag(records, names), "settings": eval_settings}
    write_json_atomic(out / IMAGERAG_SUMMARY, summary)
    write_eval_report(out, summary, records)
    return summary
