"""OmniGen through diffusers' `OmniGenPipeline`: references enter the prompt as image tokens.

OmniGen reads `<img><|image_i|></img>` placeholders (numbered from 1) in the instruction and puts the
i-th input image's latents there, so ImageRAG's prompt "According to these images of <c_1>: <img_1>,
..., generate <p>" is rendered with real image tokens, each after its retrieval caption. Verbatim, the
user's prompt is followed by the tokens (OmniGen sees no image its text does not point at). The
released ImageRAG code passes at most 3 images to OmniGen; so do we.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from imageloop.protocols import GenerationRequest, GenerationResult
from imageloop.runtime import load_cached
from imageloop.tools.generators._diffusers_common import (
    from_hub,
    open_references,
    place,
    progress_options,
    resolve_placement,
    run_pipeline,
    seeded_generator,
)
from imageloop.tools.generators.references import in_context_prompt, keep_references

# The released ImageRAG OmniGen script's defaults (its steps are OmniGen's own default).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 2.5
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.6
DEFAULT_SIZE = (1024, 1024)
MAX_REFERENCES = 3


def image_token(i: int) -> str:
    """OmniGen's placeholder for the i-th input image (1-based)."""
    return f"<img><|image_{i}|></img>"


@contextmanager
def seeded_global_rng(seed: int | None, device: str) -> Iterator[None]:
    """Seed torch's global generators inside the block, then give the caller's random state back.

    OmniGenPipeline samples each reference's VAE latents from the global generator (it takes no
    `generator` there), so without this one seed would give a different picture with every call.
    """
    import torch

    if seed is None:
        yield
        return
    kind = torch.device(device).type
    gpus = [torch.device(device).index or 0] if kind == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda" if kind == "cpu" else kind):
        torch.manual_seed(seed)
        yield


class OmniGenGenerator:
    """Text-to-image and in-context generation with OmniGen; up to 3 references as image tokens."""

    max_references = MAX_REFERENCES

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool = False,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE,
        size: tuple[int, int] = DEFAULT_SIZE,
        max_input_image_size: int = 1024,
    ) -> None:
        from diffusers import OmniGenPipeline

        self.model_id = f"omnigen:{model}"
        self.steps = steps
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        self.image_guidance_scale = image_guidance_scale
        self.size = size
        # References are center-cropped to at most this many pixels a side (memory grows with it).
        self.max_input_image_size = max_input_image_size
        self.device, torch_dtype = resolve_placement(device, dtype, offload)

        def load() -> Any:
            pipe = from_hub(model, lambda: OmniGenPipeline.from_pretrained(model, dtype=torch_dtype))
            place(pipe, self.device, offload)
            return pipe

        self._pipe = load_cached(("omnigen", model, self.device, str(torch_dtype), offload), load)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Draw `request`; each reference becomes `<img><|image_i|></img>` in the prompt, in order."""
        references, notes = keep_references(request, self.max_references, self.model_id)
        tokens = [image_token(i) for i in range(1, len(references) + 1)]
        prompt_used = in_context_prompt(request, references, tokens, placeholders_required=True)
        input_images = open_references(references) if references else None
        width, height = request.size or self.size

        def call() -> Any:
            with seeded_global_rng(request.seed, self.device):
                return self._pipe(
                    prompt=prompt_used,
                    input_images=input_images,
                    width=width,
                    height=height,
                    num_inference_steps=request.steps or self.steps,
                    guidance_scale=self.guidance_scale,
                    img_guidance_scale=self.image_guidance_scale,
                    max_input_image_size=self.max_input_image_size,
                    generator=seeded_generator(request.seed),
                    **progress_options(self._pipe),
                )

        output = run_pipeline(f"generating {width}x{height} with {self.model_id}", call)
        return GenerationResult(output.images[0], prompt_used, notes)
