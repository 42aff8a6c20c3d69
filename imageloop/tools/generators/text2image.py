"""Any diffusers text-to-image pipeline, by hub id or local directory, for drafts and text-only loops.

`AutoPipelineForText2Image` reads the checkpoint's `model_index.json` and picks its pipeline class
(Stable Diffusion 1.x/2.x/3, SDXL, FLUX, PixArt, ...), unless a pipeline class is named (the
`preset:` generators do). It takes no references: given some, it draws from the text alone and
records that it did. Steps, guidance and size default to the pipeline's own values. Requests of one
size and step count share a pipeline call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from imageloop.errors import ConfigError
from imageloop.protocols import GenerationRequest, GenerationResult
from imageloop.runtime import BatchMemory, diffusers_class, load_cached
from imageloop.tools.generators._diffusers_common import (
    BatchKind,
    DiffusersGenerator,
    from_hub,
    noise_generators,
    place,
    progress_options,
    resolve_placement,
)
from imageloop.tools.generators.references import adapter_prompt, render

if TYPE_CHECKING:
    import torch

Components = Callable[["torch.dtype"], dict[str, Any]]
"""Extra pipeline components a checkpoint does not ship, loaded in the pipeline's dtype (HiDream's Llama)."""


class Text2ImageGenerator(DiffusersGenerator):
    """Text-to-image with whatever pipeline class the checkpoint names; no reference images."""

    max_references = 0

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool = False,
        steps: int | None = None,
        guidance_scale: float | None = None,
        size: tuple[int, int] | None = None,
        pipeline: str | None = None,
        call_options: Mapping[str, Any] | None = None,
        components: Components | None = None,
        model_id: str | None = None,
    ) -> None:
        """`pipeline` names a diffusers class (default: the checkpoint's own); `call_options` go to every call."""
        self.model_id = model_id or f"diffusers:{model}"
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.size = size
        self.call_options = dict(call_options or {})
        self.device, torch_dtype = resolve_placement(device, dtype, offload)
        pipeline_class = diffusers_class(pipeline or "AutoPipelineForText2Image")
        if pipeline_class is None:
            raise ConfigError(f"diffusers has no pipeline {pipeline!r}: name one of its pipeline classes")

        def load() -> Any:
            extra = components(torch_dtype) if components is not None else {}
            pipe = from_hub(model, lambda: pipeline_class.from_pretrained(model, dtype=torch_dtype, **extra))
            place(pipe, self.device, offload)
            return pipe

        key = ("text2image", pipeline or "auto", model, self.device, str(torch_dtype), offload)
        self._pipe = load_cached(key, load)
        self._memory = BatchMemory(self.device)

    def batch_key(self, request: GenerationRequest) -> BatchKind:
        """Size and steps: all a text-to-image call needs equal across its pictures."""
        width, height = request.size or self.size or (None, None)
        return BatchKind(width, height, request.steps or self.steps, 0)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Draw the prompts of requests of one kind in one call; references, if any, are left out with a note."""
        kind = self.batch_key(requests[0])
        options: dict[str, Any] = {**progress_options(self._pipe), **self.call_options}
        if kind.steps:
            options["num_inference_steps"] = kind.steps
        if self.guidance_scale is not None:
            options["guidance_scale"] = self.guidance_scale
        # No reference is kept, so every family's wording is the prompt itself.
        rendered = [render(r, self.max_references, self.model_id, adapter_prompt) for r in requests]
        prompts = [r.prompt for r in rendered]
        generators = noise_generators(requests)
        return self.draw(
            kind,
            rendered,
            lambda: self._pipe(prompt=prompts, width=kind.width, height=kind.height, generator=generators, **options),
        )
