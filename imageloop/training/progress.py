"""What a training run reports while it runs, and the loss curve it leaves: JSON for tools, SVG for reports."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path

from imageloop.files import write_atomic, write_json_atomic

LOSS_CURVE_JSON = "loss_curve.json"
LOSS_CURVE_SVG = "loss_curve.svg"


@dataclass(frozen=True)
class LossPoint:
    """The training loss after one optimisation step (`step` counts from 1 across stages)."""

    step: int
    stage: str
    loss: float


@dataclass(frozen=True)
class TrainProgress:
    """One finished step: where the run is (`step` of `total_steps`, in `stage`) and its loss."""

    stage: str
    step: int
    total_steps: int
    loss: float


ProgressCallback = Callable[[TrainProgress], None]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left in `out_dir`, its loss curve, and how fast this call's steps ran."""

    out_dir: Path
    steps: int
    final_loss: float
    loss_curve: list[LossPoint]
    loss_curve_json: Path
    loss_curve_svg: Path
    seconds: float
    steps_per_second: float
    resumed_from_step: int = 0


def finish_training(
    out_dir: Path, curve: Sequence[LossPoint], title: str, *, seconds: float, resumed_from_step: int = 0
) -> TrainResult:
    """Write the run's loss curve into `out_dir` and describe the run (`seconds`: this call's training loop)."""
    json_path, svg_path = write_loss_curve(out_dir, curve, title)
    done = curve[-1].step - resumed_from_step
    return TrainResult(
        out_dir=out_dir,
        steps=curve[-1].step,
        final_loss=curve[-1].loss,
        loss_curve=list(curve),
        loss_curve_json=json_path,
        loss_curve_svg=svg_path,
        seconds=seconds,
        steps_per_second=done / seconds if done and seconds > 0 else 0.0,
        resumed_from_step=resumed_from_step,
    )


def write_loss_curve(out_dir: Path, points: Sequence[LossPoint], title: str) -> tuple[Path, Path]:
    """Write `loss_curve.json` and `loss_curve.svg` into `out_dir`; return their paths."""
    json_path, svg_path = out_dir / LOSS_CURVE_JSON, out_dir / LOSS_CURVE_SVG
    write_json_atomic(json_path, {"title": title, "points": [asdict(p) for p in points]})
    write_atomic(svg_path, loss_curve_svg(points, title))
    return json_path, svg_path


def read_loss_curve(path: Path) -> list[LossPoint]:
    """The points of a `loss_curve.json`."""
    return [LossPoint(**p) for p in json.loads(path.read_text(encoding="utf-8"))["points"]]


_WIDTH, _HEIGHT, _MARGIN = 480, 240, 40
_STAGE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def loss_curve_svg(points: Sequence[LossPoint], title: str) -> str:
    """A small self-contained SVG line plot of loss over steps, one colour per stage, for an HTML report."""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="white"/>',
        f'<text x="{_WIDTH / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
    ]
    if points:
        first, last = points[0].step, max(points[-1].step, points[0].step + 1)
        low, high = min(p.loss for p in points), max(p.loss for p in points)
        high = high if high > low else low + 1.0
        plot_w, plot_h = _WIDTH - 2 * _MARGIN, _HEIGHT - 2 * _MARGIN

        def x(step: int) -> float:
            return _MARGIN + plot_w * (step - first) / (last - first)

        def y(loss: float) -> float:
            return _MARGIN + plot_h * (high - loss) / (high - low)

        bottom = _HEIGHT - _MARGIN
        parts += [
            f'<line x1="{_MARGIN}" y1="{bottom}" x2="{_WIDTH - _MARGIN}" y2="{bottom}" stroke="black"/>',
            f'<line x1="{_MARGIN}" y1="{_MARGIN}" x2="{_MARGIN}" y2="{bottom}" stroke="black"/>',
            f'<text x="{_MARGIN - 4}" y="{_MARGIN + 4}" text-anchor="end">{high:.3g}</text>',
            f'<text x="{_MARGIN - 4}" y="{bottom}" text-anchor="end">{low:.3g}</text>',
            f'<text x="{_MARGIN}" y="{bottom + 14}" text-anchor="middle">{first}</text>',
            f'<text x="{_WIDTH - _MARGIN}" y="{bottom + 14}" text-anchor="middle">{last}</text>',
            f'<text x="{_WIDTH / 2}" y="{_HEIGHT - 6}" text-anchor="middle">step</text>',
        ]
        stages = list(dict.fromkeys(p.stage for p in points))
        for index, stage in enumerate(stages):
            colour = _STAGE_COLOURS[index % len(_STAGE_COLOURS)]
            coords = " ".join(f"{x(p.step):.1f},{y(p.loss):.1f}" for p in points if p.stage == stage)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
            parts.append(
                f'<text x="{_WIDTH - _MARGIN}" y="{_MARGIN + 12 * index}" text-anchor="end" '
                f'fill="{colour}">{escape(stage)}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
