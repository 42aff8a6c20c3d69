"""Any diffusers text-to-image pipeline, by hub id or local directory, for drafts and text-only loops.

`AutoPipelineForText2Image` reads the checkpoint's `model_index.json` and picks its pipeline class
(Stable Diffusion 1.x/2.x/3, SDXL, FLUX, PixArt, ...), unless a pipeline class is named (the
`preset:` generators do). It takes no references: given some, it draws from the text alone and
records that it did. Steps, guidance and size default to the pipeline's own values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    import torch

Components = Callable[["torch.dtype"], dict[str, Any]]
"""Extra pipeline components a checkpoint does not ship, loaded in the pipeline's dtype (HiDream's Llama)."""


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
        pipeline: str | None = None,
        call_options: Mapping[str, Any] | None = None,
        components: Components | None = None,
        model_id: str | None = None,
    ) -> None:
        """`pipeline` names a diffusers class (default: the checkpoint's own); `call_options` go to every call."""
        import diffusers

        self.model_id = model_id or f"diffusers:{model}"
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.size = size
        self.call_options = dict(call_options or {})
        self.device, torch_dtype = resolve_placement(device, dtype, offload)
        pipeline_class = diffusers.AutoPipelineForText2Image if pipeline is None else getattr(diffusers, pipeline)

        def load() -> Any:
            extra = components(torch_dtype) if components is not None else {}
            pipe = from_hub(model, lambda: pipeline_class.from_pretrained(model, dtype=torch_dtype, **extra))
            place(pipe, self.device, offload)
            return pipe

        key = ("text2image", pipeline or "auto", model, self.device, str(torch_dtype), offload)
        self._pipe = load_cached(key, load)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Draw `request.prompt`; references, if any, are left out with a note."""
        _, notes = keep_references(request, self.max_references, self.model_id)
        width, height = request.size or self.size or (None, None)
        options: dict[str, Any] = {**progress_options(self._pipe), **self.call_options}
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
