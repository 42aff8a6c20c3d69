"""Drawing CIR diptychs (reference left, target right) for DAIG's triplet synthesis, and splitting them.

Two painters: `GeneratorDiptychs` asks any configured generator for a 2:1 picture of the in-context
description (no LoRA: what a base model gives), and `FluxLoRADiptychs` draws with FLUX and a trained
CIR-LoRA (`imageloop.training.cir_lora`), whose experts are mixed for each description by
`apply_cir_lora` before the call, exactly as it was trained to be read. The LoRA painter loads its own
FLUX pipeline (never the generators' shared one: loading adapters changes the transformer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from imageloop.errors import ConfigError
from imageloop.protocols import GenerationRequest, ImageGenerator
from imageloop.runtime import device_lock, diffusers_class, load_cached, translated_out_of_memory
from imageloop.tools.generators._diffusers_common import from_hub, noise_generator, place, resolve_placement

DEFAULT_DIPTYCH_SIZE = (1024, 512)
"""Two 512-pixel panels, CIR-LoRA's default training resolution."""


class DiptychPainter(Protocol):
    """Draws one diptych for an in-context description."""

    model_id: str

    def draw(self, description: str, seed: int | None, size: tuple[int, int], steps: int | None) -> Image.Image: ...


def split_diptych(diptych: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The left (reference) and right (target) halves, the same size; an odd width loses its middle column."""
    half = diptych.width // 2
    if half < 1:
        raise ConfigError(f"a diptych {diptych.width} pixels wide cannot be split into two panels")
    left = diptych.crop((0, 0, half, diptych.height))
    right = diptych.crop((diptych.width - half, 0, diptych.width, diptych.height))
    return left.convert("RGB"), right.convert("RGB")


class GeneratorDiptychs:
    """Diptychs from any text-to-image generator, asked for the whole 2:1 canvas."""

    def __init__(self, generator: ImageGenerator) -> None:
        self.generator = generator
        self.model_id = generator.model_id

    def draw(self, description: str, seed: int | None, size: tuple[int, int], steps: int | None) -> Image.Image:
        """The generator's picture of `description` at `size`."""
        return self.generator.generate(GenerationRequest(prompt=description, seed=seed, size=size, steps=steps)).image


def read_cir_lora_config(folder: Path) -> dict[str, Any]:
    """A CIR-LoRA folder's `cir_lora.json` (base model, diptych size, text length), or a one-line error."""
    from imageloop.training.cir_lora import CONFIG_FILE

    path = folder / CONFIG_FILE
    try:
        config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{folder}: no CIR-LoRA here (expected {CONFIG_FILE}; train one with `imageloop train cir-lora`)"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    return config


class FluxLoRADiptychs:
    """FLUX.1 with a CIR-LoRA: each draw routes the LoRA experts for its description, then draws it."""

    def __init__(
        self,
        model: str,
        lora: Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        offload: bool = False,
        steps: int = 28,
        guidance_scale: float = 3.5,
    ) -> None:
        FluxPipeline = diffusers_class("FluxPipeline")

        config = read_cir_lora_config(lora)
        self.lora = lora
        self.model_id = f"flux:{model}+cir-lora:{lora.name}"
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.max_sequence_length = int(config.get("max_sequence_length", 512))
        self.device, torch_dtype = resolve_placement(device, dtype, offload)

        def load() -> Any:
            pipe = from_hub(model, lambda: FluxPipeline.from_pretrained(model, dtype=torch_dtype))
            place(pipe, self.device, offload)
            return pipe

        where = (self.device, str(torch_dtype), offload)
        self._pipe = load_cached(("flux-cir-lora", model, str(lora.resolve()), *where), load)

    def draw(self, description: str, seed: int | None, size: tuple[int, int], steps: int | None) -> Image.Image:
        """Set the experts' weights for `description` and draw it, alone on the device."""
        from imageloop.training.cir_lora import apply_cir_lora

        width, height = size
        with device_lock, translated_out_of_memory(f"drawing a {width}x{height} diptych with {self.model_id}"):
            apply_cir_lora(self._pipe, self.lora, description)
            output = self._pipe(
                prompt=description,
                width=width,
                height=height,
                num_inference_steps=steps or self.steps,
                guidance_scale=self.guidance_scale,
                max_sequence_length=self.max_sequence_length,
                generator=noise_generator(seed),
            )
        image: Image.Image = output.images[0]
        return image
