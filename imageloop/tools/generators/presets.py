"""Text-to-image generators at the settings a paper ran them with: `--generator preset:NAME[:MODEL]`.

GenIR draws every round's feedback image from the query alone (no references), so these are
`Text2ImageGenerator`s, which take none. Each preset names its diffusers pipeline class, checkpoint,
steps, guidance, size and any extra call options; `MODEL` (a hub id or local directory) replaces the
checkpoint, keeping the settings. A diffusers without the pipeline class is refused in one line
before anything is downloaded.

- `sd3.5-large`: GenIR's default (genIR_CaptionImageRefinement.py l.237-246, l.492-496): 28 steps,
  guidance 3.5, the pipeline's own 1024 px.
- `flux.1-dev`: GenIR's FLUX setting (l.247-253, l.498-506): `FluxPipeline` without Redux, 50 steps,
  guidance 3.5, 1024x1024, T5 prompts up to 512 tokens.
- `lumina-2`: Lumina-Image 2.0 at the 50 steps of the GenIR paper's table of generators (its code has no
  setting for it); guidance and size are diffusers' (4.0, the pipeline's own).
- `hidream-i1-fast`: HiDream-I1 Fast at its distilled setting (16 steps, no guidance, 1024x1024); its
  fourth text encoder is Llama-3.1-8B-Instruct, loaded beside it as diffusers' pipeline requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imageloop.errors import ConfigError
from imageloop.runtime import diffusers_class
from imageloop.tools.generators._diffusers_common import from_hub
from imageloop.tools.generators.text2image import Components, Text2ImageGenerator

if TYPE_CHECKING:
    import torch

HIDREAM_LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"


@dataclass(frozen=True)
class GeneratorPreset:
    """A pipeline class, a checkpoint and the settings a paper drew with (None: the pipeline's default)."""

    pipeline: str
    model: str
    steps: int | None
    guidance_scale: float | None
    size: tuple[int, int] | None
    source: str
    call_options: Mapping[str, Any] = field(default_factory=dict)
    llama_text_encoder: str | None = None


GENERATOR_PRESETS: dict[str, GeneratorPreset] = {
    "sd3.5-large": GeneratorPreset(
        "StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-large", 28, 3.5, None,
        "GenIR genIR_CaptionImageRefinement.py l.237-246, l.492-496",
    ),
    "flux.1-dev": GeneratorPreset(
        "FluxPipeline", "black-forest-labs/FLUX.1-dev", 50, 3.5, (1024, 1024),
        "GenIR genIR_CaptionImageRefinement.py l.247-253, l.498-506 (no Redux)",
        call_options={"max_sequence_length": 512},
    ),
    "lumina-2": GeneratorPreset(
        "Lumina2Pipeline", "Alpha-VLLM/Lumina-Image-2.0", 50, None, None,
        "the GenIR paper's generators table: 50 steps (its code sets none; guidance diffusers')",
    ),
    "hidream-i1-fast": GeneratorPreset(
        "HiDreamImagePipeline", "HiDream-ai/HiDream-I1-Fast", 16, 0.0, (1024, 1024),
        "HiDream-I1 Fast's distilled setting (16 steps, no guidance)",
        llama_text_encoder=HIDREAM_LLAMA,
    ),
}  # fmt: skip


def resolve_preset(spec: str) -> tuple[str, GeneratorPreset]:
    """`NAME` or `NAME:MODEL` → (the checkpoint to load, the preset); refuses an unknown name or a missing pipeline."""
    import diffusers

    name, _, model = spec.partition(":")
    preset = GENERATOR_PRESETS.get(name.strip().lower())
    if preset is None:
        raise ConfigError(f"preset:{spec}: unknown generator preset; known: {', '.join(GENERATOR_PRESETS)}")
    if diffusers_class(preset.pipeline) is None:
        raise ConfigError(
            f"preset:{name} needs diffusers' {preset.pipeline}, which diffusers {diffusers.__version__} does not "
            "have: pip install -U diffusers"
        )
    return model.strip() or preset.model, preset


def _llama_text_encoder(model: str) -> Components:
    """The fourth text encoder HiDream's pipeline needs and its checkpoint does not ship."""

    def load(dtype: torch.dtype) -> dict[str, Any]:
        from transformers import AutoTokenizer, LlamaForCausalLM

        return {
            "tokenizer_4": from_hub(model, lambda: AutoTokenizer.from_pretrained(model)),
            "text_encoder_4": from_hub(
                model,
                lambda: LlamaForCausalLM.from_pretrained(
                    model, output_hidden_states=True, output_attentions=True, dtype=dtype
                ),
            ),
        }

    return load


def preset_generator(
    spec: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    offload: bool = False,
    guidance_scale: float | None = None,
) -> Text2ImageGenerator:
    """The generator `preset:SPEC` names, drawing at its preset's settings (`guidance_scale` overrides)."""
    model, preset = resolve_preset(spec)
    llama = preset.llama_text_encoder
    return Text2ImageGenerator(
        model,
        device=device,
        dtype=dtype,
        offload=offload,
        steps=preset.steps,
        guidance_scale=preset.guidance_scale if guidance_scale is None else guidance_scale,
        size=preset.size,
        pipeline=preset.pipeline,
        call_options=preset.call_options,
        components=_llama_text_encoder(llama) if llama is not None else None,
        model_id=f"preset:{spec}",
    )
