"""OmniGen through diffusers' `OmniGenPipeline`: references enter the prompt as image tokens.

OmniGen reads `<img><|image_i|></img>` placeholders (numbered from 1) in the instruction and puts the
i-th input image's latents there, so ImageRAG's prompt "According to these images of <c_1>: <img_1>,
..., generate <p>" is rendered with real image tokens, each after its retrieval caption. Verbatim, the
user's prompt is followed by the tokens (OmniGen sees no image its text does not point at). The
released ImageRAG code passes at most 3 images to OmniGen; so do we.

Batching: diffusers' OmniGen gives every row of a batch the rotary positions of its first row (its
rotary embedding keeps row 0 only), so requests share a call only when their rows line up exactly:
same token positions, which `batch_key` reads from the pipeline's own processor.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from imageloop.protocols import GenerationRequest, GenerationResult, ReferenceImage
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
from imageloop.tools.generators.references import Rendered, in_context_prompt, render

if TYPE_CHECKING:
    import torch

# The released ImageRAG OmniGen script's defaults (its steps are OmniGen's own default).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 2.5
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.6
DEFAULT_SIZE = (1024, 1024)
MAX_REFERENCES = 3


def image_token(i: int) -> str:
    """OmniGen's placeholder for the i-th input image (1-based)."""
    return f"<img><|image_{i}|></img>"


def omnigen_prompt(request: GenerationRequest, references: Sequence[ReferenceImage]) -> str:
    """ImageRAG's in-context prompt with OmniGen's image tokens; verbatim, the user's prompt, tokens after it."""
    tokens = [image_token(i) for i in range(1, len(references) + 1)]
    return in_context_prompt(request, references, tokens, placeholders_required=True)


@contextmanager
def reference_noise(pipe: Any, generators: Sequence[torch.Generator], counts: Sequence[int]) -> Iterator[None]:
    """Inside the block, each request's reference latents are drawn from its own generator.

    OmniGenPipeline samples every input image's VAE latents from torch's global generator (it takes
    no `generator` there): alone, one seed would give another picture with every call; batched, one
    request's draws would depend on the others'. Its processor lists the images as every request's
    conditional images, then every request's image-guidance copies, so each generator serves its
    request's images twice, in that order (then its picture's starting noise, as alone).
    """
    order = [generator for generator, count in zip(generators, counts, strict=True) for _ in range(count)] * 2

    # Copied from diffusers' OmniGenPipeline.encode_input_images, with one generator per image.
    def encode_input_images(pixels: list[torch.Tensor], device: Any = None, dtype: Any = None) -> list[torch.Tensor]:
        if len(pixels) != len(order):
            raise RuntimeError(f"OmniGenPipeline encoded {len(pixels)} input images where {len(order)} were expected")
        device = device or pipe._execution_device
        dtype = dtype or pipe.vae.dtype
        scale = pipe.vae.config.scaling_factor
        return [
            pipe.vae.encode(image.to(device, dtype)).latent_dist.sample(generator=generator).mul_(scale)
            for image, generator in zip(pixels, order, strict=True)
        ]

    # The pipeline is shared, but this runs under the device lock: no other call sees the override.
    pipe.encode_input_images = encode_input_images
    try:
        yield
    finally:
        del pipe.encode_input_images


class OmniGenGenerator(DiffusersGenerator):
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
        OmniGenPipeline = diffusers_class("OmniGenPipeline")

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
        self._memory = BatchMemory(self.device)
        # Batch keys are read in the callers' threads: their own copy of the processor (a tokenizer is not
        # safe to share between threads), used by one caller at a time.
        self._layout_processor = copy.deepcopy(self._pipe.multimodal_processor)
        self._layout_processor.reset_max_image_size(max_input_image_size)
        self._layout_lock = threading.Lock()

    def _render(self, request: GenerationRequest) -> Rendered:
        """The request as OmniGen takes it: up to `max_references` pictures, each pointed at by its token."""
        return render(request, self.max_references, self.model_id, omnigen_prompt)

    def batch_key(self, request: GenerationRequest) -> BatchKind:
        """Size, steps, whether references are given, and the token positions of the request's rows."""
        rendered = self._render(request)
        width, height = request.size or self.size
        with self._layout_lock:
            rows = self._layout_processor(
                [rendered.prompt],
                [rendered.images] if rendered.images else None,
                height=height,
                width=width,
                use_img_cfg=bool(rendered.images),
            )
        positions = tuple(rows["position_ids"][0].tolist())
        return BatchKind(width, height, request.steps or self.steps, len(rendered.images), positions)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Draw requests of one kind in one call; each reference becomes `<img><|image_i|></img>` in its prompt."""
        rendered = [self._render(r) for r in requests]
        width, height = requests[0].size or self.size
        kind = BatchKind(width, height, requests[0].steps or self.steps, max(len(r.images) for r in rendered))
        generators = noise_generators(requests)
        prompts = [r.prompt for r in rendered]
        options = {
            "width": width,
            "height": height,
            "num_inference_steps": kind.steps,
            "guidance_scale": self.guidance_scale,
            "img_guidance_scale": self.image_guidance_scale,
            "max_input_image_size": self.max_input_image_size,
            "generator": generators,
            **progress_options(self._pipe),
        }

        def call() -> Any:
            if not kind.references:
                return self._pipe(prompt=prompts, **options)
            with reference_noise(self._pipe, generators, [len(r.images) for r in rendered]):
                return self._pipe(prompt=prompts, input_images=[r.images for r in rendered], **options)

        return self.draw(kind, rendered, call)
