"""Any diffusers text-to-image pipeline, by hub id or local directory, for drafts and text-only loops.

`AutoPipelineForText2Image` reads the checkpoint's `model_index.json` and picks its pipeline class
(Stable Diffusion 1.x/2.x/3, SDXL, FLUX, PixArt, ...). It takes no references: given some, it
draws from the text alone and records that it did. Steps, guidance and size default to the
pipeline's own values.
"""

from __future__ import annotations

from typing import Any

from imageloop.protocols import GenerationRequest, GenerationResult
from imageloop.runtime import load_cached
from imageloop.tools.generators._diffusers_common import (
    from_hub,
    place,
    progress_options,
    resolve_placement,
    run_pipeline,
    seeded_generator,
)
from imageloop.tools.generators.references import keep_references


class Text2ImageGenerator:
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

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Draw `request.prompt`; references, if any, are left out with a note."""
        _, notes = keep_references(request, self.max_references, self.model_id)
        width, height = request.size or self.size or (None, None)
        options: dict[str, Any] = progress_options(self._pipe)
        if request.steps or self.steps:
            options["num_inference_steps"] = request.steps or self.steps
        if self.guidance_scale is not None:
            options["guidance_scale"] = self.guidance_scale
        size_text = f"{width}x{height}" if width else "the default size"
        output = run_pipeline(
            f"generating {size_text} with {self.model_id}",
            lambda: self._pipe(
                prompt=request.prompt, width=width, height=height, generator=seeded_generator(request.seed), **options
            ),
        )
        return GenerationResult(output.images[0], request.prompt, notes)
