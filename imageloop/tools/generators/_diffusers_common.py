"""What every diffusers generator shares: placement, loading errors, seeded noise, opening references, OOM.

Only logic that must change together for all backends lives here; each backend's pipeline calls stay
in its own module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

from imageloop.errors import ConfigError
from imageloop.progress import report_progress
from imageloop.protocols import ReferenceImage
from imageloop.runtime import device_lock, explain_load_failure, explain_out_of_memory, pick_device, pick_dtype
from imageloop.tools.images import open_image

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def resolve_placement(device: str | None, dtype: str | None, offload: bool) -> tuple[str, torch.dtype]:
    """The device and torch dtype to load on, checked before anything is downloaded or loaded."""
    resolved = pick_device(device)
    if offload and not resolved.startswith("cuda"):
        raise ConfigError(f"--offload moves pipeline parts between the CPU and a CUDA GPU; the device is {resolved}")
    return resolved, pick_dtype(resolved, dtype)


def from_hub(model: str, load: Callable[[], T]) -> T:
    """Run one `from_pretrained`-like `load` of `model`; "not found" becomes a one-line error saying how to get it."""
    # A path that does not exist would otherwise be read as a hub id and searched for there.
    looks_like_path = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
    if looks_like_path and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(f"cannot load {model}: no such directory")
    try:
        return load()
    except OSError as e:
        raise explain_load_failure(model, e) from e


def place(pipe: Any, device: str, offload: bool) -> None:
    """Move a loaded pipeline to `device`, or let it visit the GPU one model at a time (`--offload`)."""
    with translated_out_of_memory(f"loading {pipe.__class__.__name__} onto {device}"):
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
    # Denoising progress goes out once, through `progress_options` (LangGraph's custom stream), and each face
    # shows it its own way; diffusers' own bars would print it a second time, to stderr.
    pipe.set_progress_bar_config(disable=True)


def progress_options(pipe: Any) -> dict[str, Any]:
    """The pipeline-call option that reports each denoising step (`imageloop.progress`), if the pipeline takes it."""
    import inspect

    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        return {}

    def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        report_progress("denoising", step + 1, getattr(pipeline, "num_timesteps", None))
        return callback_kwargs

    return {"callback_on_step_end": on_step_end}


@contextmanager
def translated_out_of_memory(what: str) -> Iterator[None]:
    """Turn a CUDA/MPS out-of-memory error inside the block into the one-line error naming the knobs."""
    import torch

    try:
        yield
    except RuntimeError as e:
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e).lower():
            raise
        # Free what the failed step cached, so a smaller request can still run in this process.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise explain_out_of_memory(what) from e


def run_pipeline(what: str, call: Callable[[], T]) -> T:
    """Run one pipeline call alone on the device (GPU work is serialised), with out-of-memory translated."""
    with device_lock, translated_out_of_memory(what):
        return call()


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """CPU noise from `seed` (diffusers moves it to the device): one seed gives one picture on any device."""
    import torch

    return None if seed is None else torch.Generator(device="cpu").manual_seed(seed)


def open_references(references: Sequence[ReferenceImage]) -> list[Image.Image]:
    """Decode the reference images, in order, as RGB."""
    return [open_image(r.path) for r in references]
