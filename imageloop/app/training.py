"""DAIG's two trainings over the application's settings: the composed-query model and CIR-LoRA.

`train_cir` trains the composed-query model its options name: a combiner over the configured embedder's
features (it then serves an index built with that embedder), or clip4cir / sprc, which fine-tune their
own encoders (they serve an index built with the `cir:OUT` embedder); `train_cir_lora` trains on
`base_model`, else the configured FLUX generator (`flux:MODEL` or `tiny:flux`), else FLUX.1-dev, and
captions real triplets that come without descriptions. Both take their options as one typed model
(`imageloop.training.options`), place their work with the settings' device and dtype, and answer the
same summary (`TrainResult` as JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop.knobs import Given
from imageloop.training.progress import TrainProgress, TrainResult

if TYPE_CHECKING:
    from imageloop.app.core import App

OnProgress = Callable[[TrainProgress], None]


def training_summary(result: TrainResult, **extra: Any) -> dict[str, Any]:
    """A finished training as JSON: where it is, how far it went, how fast, and its loss curve files."""
    return {
        "out": str(result.out_dir),
        "steps": result.steps,
        "final_loss": round(result.final_loss, 6),
        "seconds": round(result.seconds, 3),
        "steps_per_second": round(result.steps_per_second, 3),
        "resumed_from_step": result.resumed_from_step,
        "loss_curve_json": str(result.loss_curve_json),
        "loss_curve_svg": str(result.loss_curve_svg),
        **extra,
    }


def triplet_image_folders(app: App, images: str | Path | None) -> list[Path]:
    """The folders triplet images may lie in besides their file's own: `images` when named (cir-data's
    output points into the benchmark's images) and, on a confined face, the roots themselves."""
    folders = [app.path(images, "images", kind="dir")] if images is not None else []
    return folders + (list(app.roots.folders) if app.roots is not None else [])


def train_cir(
    app: App,
    triplets: str | Path,
    out_dir: str | Path,
    *,
    real: str | Path | None = None,
    images: str | Path | None = None,
    options: Given = None,
    progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Train a composed-query model (`options.model`) on synthetic triplets (DRSP), then on `real` ones (FRA).

    `options` are `CIRTrainingOptions` (a mapping or the model; unset: their defaults). The combiner learns
    over the configured embedder's frozen features; clip4cir fine-tunes the configured embedder's CLIP (or
    `base_model`); sprc fine-tunes its BLIP-2 checkpoint (`base_model`).
    """
    from imageloop.training.cir import train_cir as train
    from imageloop.training.options import DEFAULT_SPRC_BASE, CIRTrainingOptions

    resolved = CIRTrainingOptions().overridden(options)
    embedder = app.embedder() if resolved.model == "combiner" else None
    if resolved.base_model is None and resolved.model != "combiner":
        base = str(app.settings.role_spec("embedder")) if resolved.model == "clip4cir" else DEFAULT_SPRC_BASE
        resolved = resolved.overridden({"base_model": base})
    result = train(
        app.path(triplets, "triplets"),
        app.path(out_dir, "out", kind="out"),
        embedder=embedder,
        real=app.path(real, "real triplets") if real is not None else None,
        image_folders=triplet_image_folders(app, images),
        options=resolved,
        device=app.settings.device,
        progress=progress,
    )
    trained_from = embedder.model_id if embedder is not None else resolved.base_model
    return training_summary(result, model=str(result.out_dir), embedder=trained_from, cir_model=resolved.model)


def train_cir_lora(
    app: App,
    triplets: str | Path,
    out_dir: str | Path,
    *,
    images: str | Path | None = None,
    options: Given = None,
    progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Fine-tune a CIR-LoRA (K experts with a router when `experts` > 1) on FLUX from a few real triplets.

    `options` are `CIRLoRAOptions`. With a captioner configured (`captioner`), the images a real triplet has
    no caption for are described by it, once each, before training (the indexing rule: captions are extras,
    asked of a VLM only when a captioner is named).
    """
    from imageloop.app.cir import captioner_for
    from imageloop.training.cir_lora import DEFAULT_BASE_MODEL
    from imageloop.training.cir_lora import train_cir_lora as train
    from imageloop.training.options import CIRLoRAOptions

    settings = app.settings
    resolved = CIRLoRAOptions().overridden(options)
    if resolved.base_model is None:
        resolved = resolved.overridden({"base_model": settings.generator or DEFAULT_BASE_MODEL})
    result = train(
        app.path(triplets, "triplets"),
        app.path(out_dir, "out", kind="out"),
        image_folders=triplet_image_folders(app, images),
        options=resolved,
        guidance_scale=settings.guidance_scale,
        device=settings.device,
        dtype=settings.dtype,
        captioner=captioner_for(app) if settings.captioner is not None else None,
        progress=progress,
    )
    return training_summary(result, lora=str(result.out_dir), experts=resolved.experts, base_model=resolved.base_model)


def real_triplets(
    app: App,
    annotations: str | Path,
    fmt: str,
    out: str | Path,
    *,
    images: str | Path | None = None,
    shots: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A benchmark's train split as real triplets (a seeded K-shot, fractional or full sample) in a JSONL file.

    With a captioner configured (`captioner`), each triplet also gets `reference_text` and `target_text`,
    every image captioned once (journaled next to `out`, so a re-run captions no image twice). Answers
    `{"written", "out", "images", "split_size", "benchmarks", "captioned"}`; `images` is the folder the
    triplets' images lie in, which training is given as its `images` (they are outside `out`'s folder).
    """
    import json
    import os

    from imageloop.app.cir import captioner_for
    from imageloop.errors import ImageloopError
    from imageloop.eval.cir import load_benchmarks, locate
    from imageloop.eval.cir_sampling import sample_queries, triplet_records
    from imageloop.files import write_atomic
    from imageloop.training.triplets import Triplet, describe_triplets

    source = app.path(annotations, "annotations")
    spec = locate(source, fmt, "train" if source.is_dir() else None)
    if spec.split != "train":
        raise ImageloopError(f"`annotations` {source.name} is the {spec.split} split: real triplets come from train")
    benchmarks = load_benchmarks(spec, app.path(images, "images", kind="dir") if images is not None else None)
    records = triplet_records(sample_queries(benchmarks, shots=shots, fraction=fraction, seed=seed))
    target = app.path(out, "out")
    if target.is_dir():
        raise ImageloopError(f"`out` {target} is a folder: name the JSONL file to write")
    captioned = app.settings.captioner is not None
    if captioned:
        triplets = [Triplet(r["id"], Path(r["reference_image"]), r["change"], Path(r["target_image"])) for r in records]
        journal = target.with_name(target.name + ".captions.jsonl")
        described = describe_triplets(triplets, captioner_for(app), journal)
        for record, triplet in zip(records, described, strict=True):
            record |= {"reference_text": triplet.reference_text, "target_text": triplet.target_text}
    write_atomic(target, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return {
        "written": len(records),
        "out": str(target),
        "images": os.path.commonpath([r[key] for r in records for key in ("reference_image", "target_image")]),
        "split_size": sum(len(b.queries) for b in benchmarks),
        "benchmarks": [b.name for b in benchmarks],
        "captioned": captioned,
    }
