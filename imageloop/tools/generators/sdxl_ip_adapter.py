"""SDXL (base, Turbo, Lightning) with an IP-Adapter: references enter as image prompts, the text names them.

The adapter is loaded with diffusers' `load_ip_adapter`. As in the paper, SDXL takes ONE reference by
default, and the prompt is the released code's "According to this image of <c>, generate <p>" with
<c> the retrieval caption (imageRAG_SDXL.py l.131): SDXL's text encoders cannot resolve "image 1", so
the text names what the image shows and never numbers it. Several references are an option
(`max_references`): they go to the one adapter together, each adding its image tokens to every
cross-attention layer, weighted by `ip_adapter_scale`. ImageRAG's released SDXL script used SDXL base
1.0 + `ip-adapter-plus_sdxl_vit-h` at scale 0.5, 50 steps, its own negative prompt, and a second
pipeline without the adapter for drafts; we keep one pipeline and run drafts with the adapter at
scale 0, where diffusers skips its attention (the same picture, half the memory).

Batching: the adapter's `ip_adapter_image` gives every picture of a call the same references, so a
batch encodes each request's references itself and passes them as per-picture image embeddings.
Requests share a call when size, steps and the number of references agree (0: drafts, at scale 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

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

DEFAULT_IP_ADAPTER = "h94/IP-Adapter"
DEFAULT_IP_ADAPTER_WEIGHT = "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
DEFAULT_IP_ADAPTER_IMAGE_ENCODER = "models/image_encoder"
DEFAULT_IP_ADAPTER_SCALE = 0.5
# The released ImageRAG SDXL script's settings; guidance and size are SDXL's own defaults (5.0, 1024 px).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 5.0
PAPER_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
MAX_REFERENCES = 1
"""The paper's SDXL setting: one retrieved image (imageRAG_SDXL.py asks for one concept and retrieves k=1)."""


class SDXLIPAdapterGenerator(DiffusersGenerator):
    """SDXL text-to-image; with references (one by default), an IP-Adapter conditions on them at `ip_adapter_scale`."""

    def __init__(
        self,
        model: str,
        *,
        ip_adapter: str = DEFAULT_IP_ADAPTER,
        ip_adapter_weight: str = DEFAULT_IP_ADAPTER_WEIGHT,
        ip_adapter_image_encoder: str = DEFAULT_IP_ADAPTER_IMAGE_ENCODER,
        ip_adapter_scale: float = DEFAULT_IP_ADAPTER_SCALE,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool = False,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        size: tuple[int, int] | None = None,
        negative_prompt: str | None = PAPER_NEGATIVE_PROMPT,
        max_references: int = MAX_REFERENCES,
    ) -> None:
        StableDiffusionXLPipeline = diffusers_class("StableDiffusionXLPipeline")
        from transformers import CLIPVisionModelWithProjection

        self.model_id = f"sdxl-ip-adapter:{model}"
        self.max_references = max_references
        self.ip_adapter_scale = ip_adapter_scale
        self.steps = steps
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        self.size = size
        self.negative_prompt = negative_prompt
        self.device, torch_dtype = resolve_placement(device, dtype, offload)
        # "sdxl_models/x.safetensors": the folder inside the adapter repo (or directory) and the file.
        subfolder, _, weight_name = ip_adapter_weight.rpartition("/")

        def load() -> Any:
            # The image encoder is loaded explicitly (as the paper's code does) so its folder is always
            # relative to the adapter's root, whatever folder the weight file sits in.
            image_encoder = from_hub(
                ip_adapter,
                lambda: CLIPVisionModelWithProjection.from_pretrained(
                    ip_adapter, subfolder=ip_adapter_image_encoder, dtype=torch_dtype
                ),
            )
            pipe = from_hub(
                model,
                lambda: StableDiffusionXLPipeline.from_pretrained(
                    model, image_encoder=image_encoder, dtype=torch_dtype
                ),
            )
            from_hub(
                ip_adapter,
                lambda: pipe.load_ip_adapter(
                    ip_adapter, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None
                ),
            )
            place(pipe, self.device, offload)
            return pipe

        key = ("sdxl-ip-adapter", model, ip_adapter, ip_adapter_weight, ip_adapter_image_encoder)
        self._pipe = load_cached((*key, self.device, str(torch_dtype), offload), load)
        self._memory = BatchMemory(self.device)

    def batch_key(self, request: GenerationRequest) -> BatchKind:
        """Size, steps and the number of references kept (the adapter's embeddings stack only when it agrees)."""
        width, height = request.size or self.size or (None, None)
        references = min(len(request.references), self.max_references)
        return BatchKind(width, height, request.steps or self.steps, references)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Draw requests of one kind in one call; each request's references condition its own picture, and its
        prompt says what they show."""
        import torch

        rendered = [render(r, self.max_references, self.model_id, adapter_prompt) for r in requests]
        # A loaded adapter needs an image: drafts get a blank one, at scale 0, where diffusers skips the adapter.
        pictures = [r.images or [Image.new("RGB", (224, 224))] for r in rendered]
        kind = self.batch_key(requests[0])
        generators = noise_generators(requests)
        scale = self.ip_adapter_scale if kind.references else 0.0
        pipe = self._pipe
        # Whether the pipeline guides, as StableDiffusionXLPipeline.do_classifier_free_guidance decides it.
        guided = self.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

        def call() -> Any:
            # The pipeline is shared by every backend built on it: set the scale under the device lock.
            pipe.set_ip_adapter_scale(scale)
            device = pipe._execution_device
            embeds = [pipe.prepare_ip_adapter_image_embeds([p], None, device, 1, guided)[0] for p in pictures]
            # Guided, each request's embeddings are (negative, positive); the batch wants all negatives first.
            stacked = torch.cat([e[:1] for e in embeds] + [e[1:] for e in embeds]) if guided else torch.cat(embeds)
            return pipe(
                prompt=[r.prompt for r in rendered],
                negative_prompt=self.negative_prompt,
                ip_adapter_image_embeds=[stacked],
                width=kind.width,
                height=kind.height,
                num_inference_steps=kind.steps,
                guidance_scale=self.guidance_scale,
                generator=generators,
                **progress_options(pipe),
            )

        return self.draw(kind, rendered, call)
