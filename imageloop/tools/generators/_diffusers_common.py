"""What every diffusers generator shares: placement, loading errors, seeded noise, batching.

Only logic that must change together for all backends lives here; each backend's pipeline calls stay
in its own module, and how a request's references become a prompt is `references.render`. Every
backend draws a list of requests in one pipeline call (`generate_batch`) and a single request as a
list of one. Only requests of one `BatchKind` share a call, and each brings its own CPU noise
generator, so a request gets the same noise and conditioning in any batch as alone: the same
picture, up to the rounding of kernels that sum in another order for another batch size.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from imageloop.errors import ConfigError
from imageloop.progress import report_progress
from imageloop.protocols import GenerationRequest, GenerationResult
from imageloop.runtime import (
    BatchMemory,
    device_lock,
    explain_load_failure,
    pick_device,
    pick_dtype,
    translated_out_of_memory,
)
from imageloop.tools.generators.references import Rendered

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def resolve_placement(device: str | None, dtype: str | None, offload: bool) -> tuple[str, torch.dtype]:
    """The device and torch dtype to load on, checked before anything is downloaded or loaded."""
    resolved = pick_device(device)
    if offload and not resolved.startswith("cuda"):
        raise ConfigError(f"`offload` moves pipeline parts between the CPU and a CUDA GPU; the device is {resolved}")
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
    """Move a loaded pipeline to `device`, or let it visit the GPU one model at a time (``offload``)."""
    with translated_out_of_memory(f"loading {pipe.__class__.__name__} onto {device}"):
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
    # The VAE decodes a batch one picture at a time: batched convolutions can round differently from
    # single ones, and decoding is where a batch's memory peaks. A single picture is unaffected.
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
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


def noise_generator(seed: int | None) -> torch.Generator:
    """A CPU generator from `seed` (else a random one): diffusers moves its draws to the device, so one seed
    gives one picture on any device."""
    import torch

    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def noise_generators(requests: Sequence[GenerationRequest]) -> list[torch.Generator]:
    """One CPU generator per request, from its seed: one seed, one picture, alone or batched.

    diffusers draws each picture's noise from its own generator when given a list, so the picture does
    not depend on the other requests in the batch.
    """
    return [noise_generator(request.seed) for request in requests]


class BatchKind(NamedTuple):
    """What requests must share to be drawn in one pipeline call; size and references also set its memory."""

    width: int | None
    height: int | None
    steps: int | None
    references: int
    layout: Hashable = None
    """Anything else a backend needs equal across a batch (OmniGen: its rows' token positions)."""

    @property
    def memory_kind(self) -> Hashable:
        """What one request's device memory depends on."""
        return (self.width, self.height, self.references)


class DiffusersGenerator(ABC):
    """The batching half every diffusers backend shares: one request is a batch of one; memory is learned per kind.

    A backend sets `model_id`, `max_references`, `device` and `_memory`, and implements `batch_key` and
    `generate_batch`.
    """

    model_id: str
    max_references: int
    device: str
    _memory: BatchMemory

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Draw `request` as a batch of one, so it is the picture the same request gets in any batch."""
        return self.generate_batch([request])[0]

    @abstractmethod
    def batch_key(self, request: GenerationRequest) -> BatchKind:
        """What `request` must share with others to be drawn in the same pipeline call."""

    @abstractmethod
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Draw requests of one `BatchKind` in one pipeline call, each from its own seed."""

    def batch_capacity(self, kind: BatchKind) -> int | None:
        """How many requests of `kind` fit on the device at once (None: no estimate yet, or not a GPU)."""
        return self._memory.capacity(kind.memory_kind)

    def draw(self, kind: BatchKind, rendered: Sequence[Rendered], call: Callable[[], Any]) -> list[GenerationResult]:
        """Run `call`, one pipeline call drawing `rendered`, alone on the device (learning its memory per request,
        out of memory translated); each picture comes back with its request's prompt and notes."""
        what = f"generating {f'{kind.width}x{kind.height}' if kind.width else 'the default size'} with {self.model_id}"
        with device_lock, translated_out_of_memory(what), self._memory.measure(kind.memory_kind, len(rendered)):
            output = call()
        return [GenerationResult(image, r.prompt, r.notes) for image, r in zip(output.images, rendered, strict=True)]
