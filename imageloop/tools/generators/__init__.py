"""Local image generators on diffusers, one module per backend.

- `omnigen`: OmniGen, references as `<img><|image_i|></img>` tokens (at most 3).
- `sdxl_ip_adapter`: SDXL (base, Turbo, Lightning) + an IP-Adapter: one reference as in the paper, several
  as an option.
- `flux`: FLUX.1 from text; references through FLUX.1 Redux.
- `text2image`: any diffusers text-to-image checkpoint (`AutoPipelineForText2Image`), text only.
- `presets`: text-to-image pipelines at the settings a paper drew with (`preset:sd3.5-large`, ...), text only.

`references` (no heavy imports) decides which references a backend keeps and words the prompt that
names them, one function per family (in-context placeholders, or adapters beside the text).

Every pipeline loads once per process through `imageloop.runtime.load_cached` (keyed by what and
where), runs under the device lock, takes its noise from a CPU generator seeded by the request, and
turns "not found" and "out of memory" into one-line errors that say what to do. Importing this
package imports neither torch nor diffusers.
"""

from __future__ import annotations

from typing import TypedDict

from imageloop.protocols import ImageGenerator

TINY_GENERATORS = ("omnigen", "sdxl-ip-adapter", "flux", "sd")
"""The `tiny:` generator names."""


class _TinyRun(TypedDict):
    device: str | None
    dtype: str | None
    offload: bool
    steps: int
    size: tuple[int, int]


def tiny_generator(
    name: str, device: str | None = None, dtype: str | None = None, offload: bool = False
) -> ImageGenerator:
    """A backend over a tiny random pipeline (`tiny:NAME`), built on first use; it draws noise, and says so."""
    from imageloop.errors import ConfigError
    from imageloop.tiny import print_noise_notice
    from imageloop.tiny.diffusion import IP_ADAPTER_IMAGE_ENCODER, IP_ADAPTER_WEIGHT, TINY_SIZE, TINY_STEPS
    from imageloop.tiny.diffusion import tiny_generator_dir as tiny_dir

    where = _TinyRun(device=device, dtype=dtype, offload=offload, steps=TINY_STEPS, size=TINY_SIZE)
    generator: ImageGenerator
    if name == "omnigen":
        from imageloop.tools.generators.omnigen import OmniGenGenerator

        generator = OmniGenGenerator(str(tiny_dir("omnigen")), **where)
    elif name == "sdxl-ip-adapter":
        from imageloop.tools.generators.sdxl_ip_adapter import SDXLIPAdapterGenerator

        generator = SDXLIPAdapterGenerator(
            str(tiny_dir("sdxl")),
            ip_adapter=str(tiny_dir("ip-adapter")),
            ip_adapter_weight=IP_ADAPTER_WEIGHT,
            ip_adapter_image_encoder=IP_ADAPTER_IMAGE_ENCODER,
            **where,
        )
    elif name == "flux":
        from imageloop.tools.generators.flux import FluxGenerator

        generator = FluxGenerator(str(tiny_dir("flux")), redux=str(tiny_dir("flux-redux")), **where)
    elif name == "sd":
        from imageloop.tools.generators.text2image import Text2ImageGenerator

        generator = Text2ImageGenerator(str(tiny_dir("sdxl")), **where)
    else:
        known = ", ".join(f"tiny:{n}" for n in TINY_GENERATORS)
        raise ConfigError(f"unknown tiny generator {name!r}; known: {known}")
    print_noise_notice()
    return generator
