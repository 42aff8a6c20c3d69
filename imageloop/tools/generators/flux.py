"""FLUX.1 through diffusers: `FluxPipeline` from text, and FLUX.1 Redux for references.

Why Redux: of the FLUX.1 reference mechanisms in diffusers, it is the one that takes several
images in one call. `FluxPriorReduxPipeline` turns each reference into SigLIP image tokens appended
to the prompt's T5 tokens and sums the per-image conditionings with one weight each; we weight them
equally (1/n), so the text keeps its full weight and the references share theirs. FLUX.1 Kontext
takes one input image in diffusers (several only through a community pipeline the model was not
trained for), and the FLUX IP-Adapter takes one image per adapter. The images enter beside the text,
so the prompt is ImageRAG's adapter wording ("According to this image of <c>, generate <p>", or
"these images of <c_1>, <c_2>"): T5 cannot resolve "image 1", so the text never numbers them.

Batching: requests with references share a call as prompt embeddings, one Redux prior run each;
text-only requests share a call as prompts. Size and steps must agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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

DEFAULT_REDUX = "black-forest-labs/FLUX.1-Redux-dev"
# diffusers' FluxPipeline defaults, tuned for FLUX.1 [dev]; [schnell] wants 4 steps and guidance 0.
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE_SCALE = 3.5
DEFAULT_SIZE = (1024, 1024)
MAX_REFERENCES = 3
"""Redux has no hard limit; averaged references blur into each other, so we keep the paper's 3."""


class FluxGenerator(DiffusersGenerator):
    """FLUX.1 text-to-image; with references, FLUX.1 Redux adds their image tokens to the prompt's."""

    def __init__(
        self,
        model: str,
        *,
        redux: str | None = DEFAULT_REDUX,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool = False,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        size: tuple[int, int] = DEFAULT_SIZE,
        max_references: int = MAX_REFERENCES,
    ) -> None:
        FluxPipeline = diffusers_class("FluxPipeline")
        FluxPriorReduxPipeline = diffusers_class("FluxPriorReduxPipeline")

        self.model_id = f"flux:{model}"
        # Without a Redux prior this backend draws from text alone and says so when given references.
        self.max_references = max_references if redux else 0
        self.steps = steps
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        self.size = size
        self.device, torch_dtype = resolve_placement(device, dtype, offload)
        where = (self.device, str(torch_dtype), offload)

        def load_base() -> Any:
            pipe = from_hub(model, lambda: FluxPipeline.from_pretrained(model, dtype=torch_dtype))
            place(pipe, self.device, offload)
            return pipe

        self._pipe = load_cached(("flux", model, *where), load_base)
        self._prior: Any = None
        if redux:
            base = self._pipe

            def load_prior() -> Any:
                # The prior encodes the prompt with the base pipeline's own text encoders (no second copy).
                prior = from_hub(
                    redux,
                    lambda: FluxPriorReduxPipeline.from_pretrained(
                        redux,
                        text_encoder=base.text_encoder,
                        tokenizer=base.tokenizer,
                        text_encoder_2=base.text_encoder_2,
                        tokenizer_2=base.tokenizer_2,
                        dtype=torch_dtype,
                    ),
                )
                # Only the prior's own parts move: the shared encoders stay wherever the base put them.
                prior.image_encoder.to(self.device)
                prior.image_embedder.to(self.device)
                prior.set_progress_bar_config(disable=None)
                return prior

            self._prior = load_cached(("flux-redux", redux, model, *where), load_prior)
        self._memory = BatchMemory(self.device)

    def batch_key(self, request: GenerationRequest) -> BatchKind:
        """Size, steps, and whether references come (Redux merges any number into prompt tokens of one shape)."""
        width, height = request.size or self.size
        references = 1 if request.references and self.max_references else 0
        return BatchKind(width, height, request.steps or self.steps, references)

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Draw requests of one kind in one call; each request's references are weighted equally through Redux,
        beside ImageRAG's adapter prompt."""
        import torch

        rendered = [render(r, self.max_references, self.model_id, adapter_prompt) for r in requests]
        kind = self.batch_key(requests[0])
        options = {
            "width": kind.width,
            "height": kind.height,
            "num_inference_steps": kind.steps,
            "guidance_scale": self.guidance_scale,
            "generator": noise_generators(requests),
            **progress_options(self._pipe),
        }

        def call() -> Any:
            if not kind.references:
                return self._pipe(prompt=[r.prompt for r in rendered], **options)
            priors = []
            for r in rendered:
                weights = [1.0 / len(r.images)] * len(r.images)
                priors.append(
                    self._prior(
                        image=r.images, prompt=r.prompt, prompt_embeds_scale=weights, pooled_prompt_embeds_scale=weights
                    )
                )
            return self._pipe(
                prompt_embeds=torch.cat([p.prompt_embeds for p in priors]),
                pooled_prompt_embeds=torch.cat([p.pooled_prompt_embeds for p in priors]),
                **options,
            )

        return self.draw(kind, rendered, call)
