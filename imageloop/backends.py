"""Turns role strings (`PROVIDER:MODEL`) into backends, each built once per process.

Providers import their libraries lazily, so choosing `openai:` never imports torch. A later
provider registers itself by adding a factory to the matching table; every factory is called as
`factory(model, endpoint, placement)` and uses what it needs (remote ones the endpoint, local ones the
placement). Generator factories also receive the settings' `GeneratorOptions` (guidance, adapters).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from imageloop.config import Endpoint, Role, RoleSpec, Settings
from imageloop.errors import ConfigError
from imageloop.protocols import Embedder, ImageGenerator, VisionLanguageModel

T = TypeVar("T")


@dataclass(frozen=True)
class Placement:
    """Where a local model runs: the settings' device, dtype and offload (None: best available)."""

    device: str | None = None
    dtype: str | None = None
    offload: bool = False

    @classmethod
    def of(cls, settings: Settings) -> Placement:
        """The placement fields of `settings` (hashable, so backends are cached per placement)."""
        return cls(settings.device, settings.dtype, settings.offload)


@dataclass(frozen=True)
class GeneratorOptions:
    """What a local generator is built with besides its placement: guidance and reference adapters."""

    guidance_scale: float | None
    ip_adapter: str
    ip_adapter_weight: str
    ip_adapter_image_encoder: str
    ip_adapter_scale: float
    flux_redux: str | None
    sdxl_max_references: int

    @classmethod
    def of(cls, settings: Settings) -> GeneratorOptions:
        """The generator fields of `settings` (hashable, so generators are cached per option set)."""
        redux = None if settings.flux_redux.strip().lower() in ("", "none") else settings.flux_redux
        return cls(
            settings.guidance_scale,
            settings.ip_adapter,
            settings.ip_adapter_weight,
            settings.ip_adapter_image_encoder,
            settings.ip_adapter_scale,
            redux,
            settings.sdxl_max_references,
        )


Factory = Callable[[str, Endpoint, Placement], T]
GeneratorFactory = Callable[[str, Endpoint, Placement, GeneratorOptions], ImageGenerator]


def _openai_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.vlms.openai_compatible import OpenAIVisionLanguageModel

    return OpenAIVisionLanguageModel(model, endpoint)


def _openai_generator(
    model: str, endpoint: Endpoint, placement: Placement, options: GeneratorOptions
) -> ImageGenerator:
    from imageloop.tools.generators.openai_images import OpenAIImageGenerator

    return OpenAIImageGenerator(model, endpoint)


def _omnigen_generator(
    model: str, endpoint: Endpoint, placement: Placement, options: GeneratorOptions
) -> ImageGenerator:
    from imageloop.tools.generators.omnigen import OmniGenGenerator

    return OmniGenGenerator(
        model,
        device=placement.device,
        dtype=placement.dtype,
        offload=placement.offload,
        guidance_scale=options.guidance_scale,
    )


def _sdxl_ip_adapter_generator(
    model: str, endpoint: Endpoint, placement: Placement, options: GeneratorOptions
) -> ImageGenerator:
    from imageloop.tools.generators.sdxl_ip_adapter import SDXLIPAdapterGenerator

    return SDXLIPAdapterGenerator(
        model,
        ip_adapter=options.ip_adapter,
        ip_adapter_weight=options.ip_adapter_weight,
        ip_adapter_image_encoder=options.ip_adapter_image_encoder,
        ip_adapter_scale=options.ip_adapter_scale,
        device=placement.device,
        dtype=placement.dtype,
        offload=placement.offload,
        guidance_scale=options.guidance_scale,
        max_references=options.sdxl_max_references,
    )


def _flux_generator(model: str, endpoint: Endpoint, placement: Placement, options: GeneratorOptions) -> ImageGenerator:
    from imageloop.tools.generators.flux import FluxGenerator

    return FluxGenerator(
        model,
        redux=options.flux_redux,
        device=placement.device,
        dtype=placement.dtype,
        offload=placement.offload,
        guidance_scale=options.guidance_scale,
    )


def _diffusers_generator(
    model: str, endpoint: Endpoint, placement: Placement, options: GeneratorOptions
) -> ImageGenerator:
    from imageloop.tools.generators.text2image import Text2ImageGenerator

    return Text2ImageGenerator(
        model,
        device=placement.device,
        dtype=placement.dtype,
        offload=placement.offload,
        guidance_scale=options.guidance_scale,
    )


def _preset_generator(
    model: str, endpoint: Endpoint, placement: Placement, options: GeneratorOptions
) -> ImageGenerator:
    from imageloop.tools.generators.presets import preset_generator

    return preset_generator(
        model,
        device=placement.device,
        dtype=placement.dtype,
        offload=placement.offload,
        guidance_scale=options.guidance_scale,
    )


def _tiny_generator(model: str, endpoint: Endpoint, placement: Placement, options: GeneratorOptions) -> ImageGenerator:
    from imageloop.tools.generators import tiny_generator

    return tiny_generator(model, placement.device, placement.dtype, placement.offload)


def _openai_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    from imageloop.tools.embedders.openai_compatible import OpenAITextEmbedder

    return OpenAITextEmbedder(model, endpoint)


def _open_clip_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    from imageloop.tools.embedders.local import open_clip_embedder

    return open_clip_embedder(model, placement.device, placement.dtype)


def _transformers_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    from imageloop.tools.embedders.local import TransformersEmbedder

    return TransformersEmbedder(model, device=placement.device, dtype=placement.dtype)


def _tiny_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    if model != "clip":
        raise ConfigError(f"tiny:{model}: the tiny embedder is tiny:clip")
    from imageloop.tools.embedders.local import tiny_clip_embedder

    return tiny_clip_embedder(placement.device, placement.dtype)


def _cir_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    from imageloop.training.models import cir_embedder

    return cir_embedder(Path(model), placement.device, placement.dtype)


def _transformers_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.vlms.transformers_local import TransformersVisionLanguageModel

    return TransformersVisionLanguageModel(model, device=placement.device, dtype=placement.dtype)


def _tiny_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.vlms.transformers_local import tiny_transformers_vlm

    return tiny_transformers_vlm(model, placement.device, placement.dtype)


def _langchain_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.vlms.langchain_chat import langchain_vlm

    return langchain_vlm(model)


VLM_PROVIDERS: dict[str, Factory[VisionLanguageModel]] = {
    "openai": _openai_vlm,
    "transformers": _transformers_vlm,
    "tiny": _tiny_vlm,
    "langchain": _langchain_vlm,
}
GENERATOR_PROVIDERS: dict[str, GeneratorFactory] = {
    "openai": _openai_generator,
    "omnigen": _omnigen_generator,
    "sdxl-ip-adapter": _sdxl_ip_adapter_generator,
    "flux": _flux_generator,
    "diffusers": _diffusers_generator,
    "preset": _preset_generator,
    "tiny": _tiny_generator,
}
EMBEDDER_PROVIDERS: dict[str, Factory[Embedder]] = {
    "openai": _openai_embedder,
    "open_clip": _open_clip_embedder,
    "transformers": _transformers_embedder,
    "tiny": _tiny_embedder,
    "cir": _cir_embedder,
}


F = TypeVar("F")


def _factory(table: dict[str, F], role: Role, spec: RoleSpec) -> F:
    factory = table.get(spec.provider)
    if factory is None:
        known = ", ".join(sorted(table))
        raise ConfigError(f"unknown {role} provider {spec.provider!r} in {str(spec)!r}; known providers: {known}")
    return factory


def _build(table: dict[str, Factory[T]], role: Role, spec: RoleSpec, endpoint: Endpoint, placement: Placement) -> T:
    return _factory(table, role, spec)(spec.model, endpoint, placement)


@functools.cache
def _vlm(spec: RoleSpec, endpoint: Endpoint, placement: Placement, role: Role) -> VisionLanguageModel:
    return _build(VLM_PROVIDERS, role, spec, endpoint, placement)


@functools.cache
def _generator(spec: RoleSpec, endpoint: Endpoint, placement: Placement, options: GeneratorOptions) -> ImageGenerator:
    return _factory(GENERATOR_PROVIDERS, "generator", spec)(spec.model, endpoint, placement, options)


@functools.cache
def _embedder(spec: RoleSpec, endpoint: Endpoint, placement: Placement) -> Embedder:
    return _build(EMBEDDER_PROVIDERS, "embedder", spec, endpoint, placement)


# Micro-batching wrappers, one per backend and process: every caller of a backend shares its batcher, so
# concurrent runs (an evaluation's targets, a server's jobs) have their model calls merged into batched calls.


@functools.cache
def _batching_vlm(
    spec: RoleSpec, endpoint: Endpoint, placement: Placement, role: Role, max_batch: int | None
) -> VisionLanguageModel:
    from imageloop.agents.vlms.batching import BatchingVisionLanguageModel

    return BatchingVisionLanguageModel(_vlm(spec, endpoint, placement, role), max_batch=max_batch)


@functools.cache
def _batching_generator(
    spec: RoleSpec, endpoint: Endpoint, placement: Placement, options: GeneratorOptions, max_batch: int | None
) -> ImageGenerator:
    from imageloop.tools.generators.batching import BatchingGenerator

    return BatchingGenerator(_generator(spec, endpoint, placement, options), max_batch=max_batch)


@functools.cache
def _batching_embedder(spec: RoleSpec, endpoint: Endpoint, placement: Placement, max_batch: int | None) -> Embedder:
    from imageloop.tools.embedders.batching import BatchingEmbedder

    return BatchingEmbedder(_embedder(spec, endpoint, placement), max_batch=max_batch)


def clear_backends() -> None:
    """Forget every built backend, so the next make_* call builds anew (tests; switching provider tables)."""
    for cached in (_vlm, _generator, _embedder, _batching_vlm, _batching_generator, _batching_embedder):
        cached.cache_clear()


def make_vlm(settings: Settings, role: Role = "vlm", *, batched: bool = False) -> VisionLanguageModel:
    """The VLM serving `role` (the critic and rewriter, or the captioner); `batched`: its process-wide batcher."""
    vlm = settings.role_spec(role), settings.endpoint(role), Placement.of(settings), role
    return _batching_vlm(*vlm, settings.max_batch) if batched else _vlm(*vlm)


def make_generator(settings: Settings, *, batched: bool = False) -> ImageGenerator:
    """The configured image generator; `batched`: its process-wide batcher."""
    generator = (
        settings.role_spec("generator"),
        settings.endpoint("generator"),
        Placement.of(settings),
        GeneratorOptions.of(settings),
    )
    return _batching_generator(*generator, settings.max_batch) if batched else _generator(*generator)


def make_embedder(settings: Settings, *, batched: bool = False) -> Embedder:
    """The configured retrieval embedder; `batched`: its process-wide batcher."""
    embedder = settings.role_spec("embedder"), settings.endpoint("embedder"), Placement.of(settings)
    return _batching_embedder(*embedder, settings.max_batch) if batched else _embedder(*embedder)
