"""DAIG's triplet synthesis over the application's backends: the LLM scripts, a painter draws, a folder keeps them.

The painter is the configured generator asked for whole diptychs, or, with a CIR-LoRA (`lora`), FLUX
with that LoRA's experts routed for each description (`imageloop.tools.generators.diptych`). The
folder records what it was made with (`synthesis.json`); a re-run must match it (only `n` may grow).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop import limits
from imageloop.app.cluster import RayGiven, ray_options, runner
from imageloop.config import RoleSpec, Settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.eval import Run
from imageloop.eval.annotations import read_json
from imageloop.files import write_json_atomic
from imageloop.graphs.steps import Step, play
from imageloop.graphs.triplets import (
    DEFAULT_SIZE,
    EDIT_TYPES,
    SlotOutcome,
    SlotTask,
    TripletMaker,
    build_triplets_graph,
    check_request,
    few_shot,
    held_counts,
    missing_slots,
    slot_task,
)
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


def _diptych_size(lora: Path | None) -> tuple[int, int]:
    """The default canvas: the CIR-LoRA's diptych size, else DAIG's 1024x512."""
    if lora is None:
        return DEFAULT_SIZE
    from imageloop.tools.generators.diptych import read_cir_lora_config

    width, height = read_cir_lora_config(lora).get("diptych_size") or DEFAULT_SIZE
    return int(width), int(height)


def _painter(app: App, settings: Settings, lora: Path | None) -> DiptychPainter:
    """The diptych painter: the configured generator, or FLUX with the CIR-LoRA `lora`."""
    if lora is None:
        return GeneratorDiptychs(app.generator(settings))
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
    return FluxLoRADiptychs(
        model, lora, device=settings.device, dtype=settings.dtype, offload=settings.offload, steps=steps,
        guidance_scale=settings.guidance_scale if settings.guidance_scale is not None else 3.5,
    )  # fmt: skip


@dataclass(frozen=True)
class TripletSlots:
    """DAIG's per-slot work as a Ray cluster's worker binds it: the LLM, the painter (with the CIR-LoRA `lora`)
    and, with `check`, the VLM that checks each drawing."""

    lora: Path | None
    check: bool

    def bind(self, app: App) -> Callable[[SlotTask], SlotOutcome]:
        """`TripletMaker.make` over `app`'s models."""
        painter = _painter(app, app.settings, self.lora)
        return TripletMaker(app.vlm(), painter, app.vlm() if self.check else None).make


def _claim(out: Path, made_with: dict[str, Any]) -> None:
    """Refuse a folder made with other objects, edits or models, and record what this run makes with.

    A `painter` of None is one not known yet (a cluster's workers build it): the rest is checked now, the
    painter with the first triplet made.
    """
    recorded_file = out / SYNTHESIS_FILE
    what = "the settings its triplets were made with (restore it, or use another `out` folder)"
    recorded = read_json(recorded_file, what) if recorded_file.is_file() else None
    painter = made_with["painter"] or (recorded.get("painter") if isinstance(recorded, dict) else None)
    if recorded is not None and recorded != {**made_with, "painter": painter}:
        raise ImageloopError(f"{out} holds triplets made with other objects, edits or models: use another `out` folder")
    if made_with["painter"] is not None:
        write_json_atomic(recorded_file, made_with)


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
    ray: RayGiven = None,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Fill `out_dir` up to `n` triplets; returns `{"written", "failed", "rejected", "total", "pending", "out"}`.

    `knobs` are the synthesis's (`TripletsKnobs`: check, max_attempts, concurrency, seed, size, steps; unset:
    the settings' drawing knobs, else the declared defaults). With `ray` the slots are made by that cluster's
    workers (`concurrency` at once on each, see `imageloop.app.cluster`) and written here.
    """
    limits.check("triplets", n)
    resolved = TripletsKnobs.from_settings(app.settings).overridden(knobs)
    cluster = ray_options(ray, confined=app.roots is not None)
    object_list = read_objects(app.path(objects, "objects", kind="file"))
    edit_list = parse_edits(edits)
    example_list = read_examples(app.path(examples, "examples")) if examples is not None else []
    lora_dir = app.path(lora, "lora", kind="dir") if lora is not None else None
    out = app.path(out_dir, "out", kind="out")
    resolved = resolved.overridden({"size": resolved.size or _diptych_size(lora_dir)})

    def made_with(painter: str | None) -> dict[str, Any]:
        return {
            "objects": object_list, "edits": edit_list, "seed": resolved.seed, "painter": painter,
            "size": list(resolved.size or DEFAULT_SIZE), "steps": resolved.steps, "check": resolved.check,
        }  # fmt: skip

    request = {"n": n, "objects": object_list, "edits": edit_list, "examples": example_list}
    with TripletDataset(out) as dataset:
        if cluster is not None:
            app.settings.role_spec("vlm")  # the workers' scripter: none configured fails here, before a cluster
            _claim(out, made_with(None))
            run = runner(app, TripletSlots(lora_dir, resolved.check), concurrency=resolved.concurrency, ray=cluster)
            claim = partial(_claim, out)
            made = _made_by(run, dataset, request, resolved, lambda painter: claim(made_with(painter)), on_step)
            return {**made, "out": str(out)}
        painter = _painter(app, app.settings, lora_dir)
        _claim(out, made_with(painter.model_id))
        checker = app.vlm() if resolved.check else None
        graph = build_triplets_graph(app.vlm(), painter, dataset, checker=checker, defaults=resolved)
        # Two supersteps a batch (plan, synthesize): the loop's own cap is the slot list, not the recursion limit.
        config: dict[str, Any] = {"recursion_limit": 2 * (n // resolved.concurrency + 2) + 10}
        state = play(graph, request, config=config, on_step=on_step)
    keys = ("written", "failed", "rejected", "total", "pending")
    return {**{key: int(state.get(key) or 0) for key in keys}, "out": str(out)}


def _made_by(
    run: Run[SlotTask, SlotOutcome],
    dataset: TripletDataset,
    request: Mapping[str, Any],
    knobs: TripletsKnobs,
    claim: Callable[[str], None],
    on_step: OnStep | None,
) -> dict[str, int]:
    """The slots the folder lacks, made by `run` (a cluster's workers) and appended here as each arrives.

    The same slots, tasks, counts and writes as the graph's `prepare`, `synthesize` and `finish`: only who
    makes each triplet differs. `claim(painter)` checks and records the painter of the first one made.
    """
    n, objects, edits = check_request(request["n"], request["objects"], request["edits"])
    examples, example_edits = few_shot(request["examples"])
    tasks = [
        slot_task(knobs, slot, objects, edits, examples, example_edits) for slot in missing_slots(dataset.ids(), n)
    ]
    counts = {"written": 0, "failed": 0, "rejected": 0}
    claimed: str | None = None
    for outcome in run(tasks):
        if outcome.painter != claimed:
            claim(outcome.painter)
            claimed = outcome.painter
        outcome.keep(dataset)
        counts[outcome.counted] += 1
        if on_step is not None:
            on_step(outcome.step)
    total, pending = held_counts(dataset, n)
    return {**counts, "total": total, "pending": pending}
