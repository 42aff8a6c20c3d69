"""DAIG's two trainings over the application's settings: the composed-query model and CIR-LoRA.

`train_cir` embeds with the configured embedder (the model must later serve an index built with that
same embedder); `train_cir_lora` trains on the configured FLUX generator (`flux:MODEL` or `tiny:flux`),
else on `base_model`, else FLUX.1-dev. Both place their work with the settings' device and dtype and
answer the same summary (`TrainResult` as JSON).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop.errors import ConfigError
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


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")


def train_cir(
    app: App,
    triplets: str | Path,
    out_dir: str | Path,
    *,
    real: str | Path | None = None,
    steps: int | None = None,
    finetune_steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Pre-train a composed-query model on synthetic triplets (DRSP), then fine-tune on `real` ones (FRA)."""
    from dataclasses import replace

    from imageloop.training.cir import DEFAULT_FINETUNE_STEPS, DEFAULT_STEPS, CIRTrainingOptions
    from imageloop.training.cir import train_cir as train

    if (steps is not None and steps < 0) or (finetune_steps is not None and finetune_steps < 0):
        raise ConfigError("step counts must not be negative")
    _positive("batch_size", batch_size)
    options = CIRTrainingOptions(device=app.settings.device)
    if batch_size is not None:
        options = replace(options, batch_size=batch_size)
    if learning_rate is not None:
        options = replace(options, learning_rate=learning_rate)
    embedder = app.embedder()
    result = train(
        app.path(triplets, "triplets"),
        app.path(out_dir, "out", kind="out"),
        embedder=embedder,
        real=app.path(real, "real triplets") if real is not None else None,
        steps=DEFAULT_STEPS if steps is None else steps,
        finetune_steps=DEFAULT_FINETUNE_STEPS if finetune_steps is None else finetune_steps,
        options=options,
        progress=progress,
    )
    return training_summary(result, model=str(result.out_dir), embedder=embedder.model_id)


def train_cir_lora(
    app: App,
    triplets: str | Path,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    experts: int | None = None,
    rank: int | None = None,
    resolution: int | None = None,
    batch_size: int | None = None,
    base_model: str | None = None,
    progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Fine-tune a CIR-LoRA (K experts with a router when `experts` > 1) on FLUX from a few real triplets."""
    from imageloop.training.cir_lora import DEFAULT_BASE_MODEL, DEFAULT_STEPS, CIRLoRAOptions
    from imageloop.training.cir_lora import train_cir_lora as train

    for name, value in (("steps", steps), ("experts", experts), ("rank", rank), ("resolution", resolution)):
        _positive(name, value)
    _positive("batch_size", batch_size)
    settings = app.settings
    defaults = CIRLoRAOptions()
    options = CIRLoRAOptions(
        experts=experts or defaults.experts,
        rank=rank or defaults.rank,
        resolution=resolution or defaults.resolution,
        batch_size=batch_size or defaults.batch_size,
        guidance_scale=defaults.guidance_scale if settings.guidance_scale is None else settings.guidance_scale,
        device=settings.device,
        dtype=settings.dtype,
    )
    model = base_model or settings.generator or DEFAULT_BASE_MODEL
    result = train(
        app.path(triplets, "triplets"),
        app.path(out_dir, "out", kind="out"),
        base_model=model,
        steps=DEFAULT_STEPS if steps is None else steps,
        options=options,
        progress=progress,
    )
    return training_summary(result, lora=str(result.out_dir), experts=options.experts, base_model=model)
