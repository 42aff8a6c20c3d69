"""DAIG's triplet synthesis over the application's backends: the LLM scripts, a painter draws, a folder keeps them.

The painter is the configured generator asked for whole diptychs, or, with a CIR-LoRA (`lora`), FLUX
with that LoRA's experts routed for each description (`imageloop.tools.generators.diptych`). The
folder records what it was made with (`synthesis.json`); a re-run must match it (only `n` may grow).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop import limits
from imageloop.config import RoleSpec, Settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.eval.annotations import read_json
from imageloop.files import write_json_atomic
from imageloop.graphs.steps import Step, play
from imageloop.graphs.triplets import DEFAULT_SIZE, EDIT_TYPES, build_triplets_graph
from imageloop.knobs import Given, TripletsKnobs
from imageloop.tools.generators.diptych import DiptychPainter, GeneratorDiptychs
from imageloop.tools.triplet_dataset import TripletDataset
from imageloop.training.triplets import triplets_file

if TYPE_CHECKING:
    from imageloop.app.core import App

SYNTHESIS_FILE = "synthesis.json"
OnStep = Callable[[Step], None]


def read_objects(path: Path) -> list[str]:
    """One object a line; blank lines and `#` comments are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageloopError(f"`objects` {path}: cannot read it ({e})") from None
    objects = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not objects:
        raise ImageloopError(f"`objects` {path}: no objects (expected one a line)")
    return objects


def parse_edits(edits: Sequence[str] | str) -> list[str]:
    """Edit types from a comma-separated list (or a list of them), checked against DAIG's."""
    items = edits.split(",") if isinstance(edits, str) else [part for e in edits for part in e.split(",")]
    chosen = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    unknown = [e for e in chosen if e not in EDIT_TYPES]
    if unknown or not chosen:
        raise ConfigError(f"`edits` {','.join(unknown) or '(none)'}: expected some of {','.join(EDIT_TYPES)}")
    return chosen


def read_examples(source: Path) -> list[dict[str, str]]:
    """Real triplets' texts (a triplets JSONL file or dataset folder; images are not needed) as few-shot examples."""
    path = triplets_file(source)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageloopError(f"`examples` {path}: cannot read it ({e})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ImageloopError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("change"), str) or not record["change"].strip():
            raise ImageloopError(f"{path}:{number}: expected an object with a non-empty 'change'")
        keys = ("reference_text", "change", "target_text", "edit")
        examples.append({key: str(record.get(key) or "").strip() for key in keys})
    if not examples:
        raise ImageloopError(f"`examples` {path}: holds no triplets")
    return examples


def _painter(app: App, settings: Settings, lora: Path | None) -> tuple[DiptychPainter, tuple[int, int]]:
    """The diptych painter and its default canvas size."""
    if lora is None:
        return GeneratorDiptychs(app.generator(settings)), DEFAULT_SIZE
    from imageloop.tools.generators.diptych import FluxLoRADiptychs, read_cir_lora_config

    config = read_cir_lora_config(lora)
    spec = RoleSpec.parse(settings.generator, "generator") if settings.generator else None
    steps = 28
    if spec is None:
        model = str(config.get("base_model") or "")
    elif spec.provider == "flux":
        model = spec.model
    elif str(spec) == "tiny:flux":
        from imageloop.tiny.diffusion import TINY_STEPS, tiny_generator_dir

        model, steps = str(tiny_generator_dir("flux")), TINY_STEPS
    else:
        raise ConfigError(
            f"`lora` draws with FLUX: pass `generator` flux:MODEL (it was trained on {config.get('base_model')})"
        )
    painter = FluxLoRADiptychs(
        model, lora, device=settings.device, dtype=settings.dtype, offload=settings.offload, steps=steps,
        guidance_scale=settings.guidance_scale if settings.guidance_scale is not None else 3.5,
    )  # fmt: skip
    width, height = config.get("diptych_size") or DEFAULT_SIZE
    return painter, (int(width), int(height))


def synthesize_triplets(
    app: App,
    objects: str | Path,
    edits: Sequence[str] | str,
    n: int,
    out_dir: str | Path,
    *,
    examples: str | Path | None = None,
    lora: str | Path | None = None,
    knobs: Given = None,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Fill `out_dir` up to `n` triplets; returns `{"written", "failed", "rejected", "total", "pending", "out"}`.

    `knobs` are the synthesis's (`TripletsKnobs`: check, max_attempts, concurrency, seed, size, steps; unset:
    the settings' drawing knobs, else the declared defaults).
    """
    limits.check("triplets", n)
    resolved = TripletsKnobs.from_settings(app.settings).overridden(knobs)
    object_list = read_objects(app.path(objects, "objects", kind="file"))
    edit_list = parse_edits(edits)
    example_list = read_examples(app.path(examples, "examples")) if examples is not None else []
    lora_dir = app.path(lora, "lora", kind="dir") if lora is not None else None
    out = app.path(out_dir, "out", kind="out")
    painter, default_size = _painter(app, app.settings, lora_dir)
    resolved = resolved.overridden({"size": resolved.size or default_size})
    made_with = {
        "objects": object_list, "edits": edit_list, "seed": resolved.seed, "painter": painter.model_id,
        "size": list(resolved.size or default_size), "steps": resolved.steps, "check": resolved.check,
    }  # fmt: skip
    with TripletDataset(out) as dataset:
        recorded = out / SYNTHESIS_FILE
        what = "the settings its triplets were made with (restore it, or use another `out` folder)"
        if recorded.is_file() and read_json(recorded, what) != made_with:
            raise ImageloopError(
                f"{out} holds triplets made with other objects, edits or models: use another `out` folder"
            )
        write_json_atomic(recorded, made_with)
        checker = app.vlm() if resolved.check else None
        graph = build_triplets_graph(app.vlm(), painter, dataset, checker=checker, defaults=resolved)
        # Two supersteps a batch (plan, synthesize): the loop's own cap is the slot list, not the recursion limit.
        config: dict[str, Any] = {"recursion_limit": 2 * (n // resolved.concurrency + 2) + 10}
        request = {"n": n, "objects": object_list, "edits": edit_list, "examples": example_list}
        state = play(graph, request, config=config, on_step=on_step)
    keys = ("written", "failed", "rejected", "total", "pending")
    return {**{key: int(state.get(key) or 0) for key in keys}, "out": str(out)}
