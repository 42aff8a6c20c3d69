"""Any diffusers text-to-image pipeline, by hub id or local directory, for drafts and text-only loops.

`AutoPipelineForText2Image` reads the checkpoint's `model_index.json` and picks its pipeline class
(Stable Diffusion 1.x/2.x/3, SDXL, FLUX, PixArt, ...). It takes no references: given some, it
draws from the text alone and records that it did. Steps, guidance and size default to the
pipeline's own values. Requests of one size and step count share a pipeline call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imageloop.protocols import GenerationRequest, GenerationResult
from imageloop.runtime import BatchMemory, load_cached
from imageloop.tools.generators._diffusers_common import (
    BatchKind,
    DiffusersGenerator,
    from_hub,
    noise_generators,
    place,
    render,
    resolve_placement,
)


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
    ) -> None:
        from diffusers import AutoPipelineForText2Image

        self.model_id = f"diffusers:{model}"
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.size = size
        self.device, torch_dtype = resolve_placement(device, dtype, offload)

        def load() -> Any:
            pipe = from_hub(model, lambda: AutoPipelineForText2Image.from_pretrained(model, dtype=torch_dtype))
            place(pipe, self.device, offload)
            return pipe

        self._pipe = load_cached(("text2image", model, self.device, str(torch_dtype), offload), load)
        self._memory = BatchMemory(self.device)

    def batch_key(self, request: GenerationRequest) -> BatchKind:
        """Size and steps: all a text-to-image call needs equal across its pictures."""
        width, height = request.size or self.size or (None, None)
        return BatchKind(width, height, request.steps or self.steps, 0)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Draw the prompts of requests of one kind in one call; references, if any, are left out with a note."""
        kind = self.batch_key(requests[0])
        options: dict[str, Any] = {}
        if kind.steps:
            options["num_inference_steps"] = kind.steps
        if self.guidance_scale is not None:
            options["guidance_scale"] = self.guidance_scale
        rendered = [render(r, self.max_references, self.model_id, "image {}".format) for r in requests]
        prompts = [r.prompt for r in rendered]
        generators = noise_generators(requests)
        return self.draw(
            kind,
            rendered,
            lambda: self._pipe(prompt=prompts, width=kind.width, height=kind.height, generator=generators, **options),
        )
