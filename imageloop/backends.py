"""Turns role strings (`PROVIDER:MODEL`) into backends, each built once per process.

Providers import their libraries lazily, so choosing `openai:` never imports torch. A later
provider registers itself by adding a factory to the matching table; every factory is called as
`factory(model, endpoint, placement)` and uses what it needs (remote ones the endpoint, local ones the
placement).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
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


Factory = Callable[[str, Endpoint, Placement], T]


def _openai_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.openai_vlm import OpenAIVisionLanguageModel

    return OpenAIVisionLanguageModel(model, endpoint)


def _openai_generator(model: str, endpoint: Endpoint, placement: Placement) -> ImageGenerator:
    from imageloop.tools.openai_images import OpenAIImageGenerator

    return OpenAIImageGenerator(model, endpoint)


def _openai_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    from imageloop.tools.openai_embeddings import OpenAITextEmbedder

    return OpenAITextEmbedder(model, endpoint)


def _open_clip_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    from imageloop.tools.local_embedders import open_clip_embedder

    return open_clip_embedder(model, placement.device, placement.dtype)


def _transformers_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    from imageloop.tools.local_embedders import TransformersEmbedder

    return TransformersEmbedder(model, device=placement.device, dtype=placement.dtype)


def _tiny_embedder(model: str, endpoint: Endpoint, placement: Placement) -> Embedder:
    if model != "clip":
        raise ConfigError(f"tiny:{model}: the tiny embedder is tiny:clip")
    from imageloop.tools.local_embedders import tiny_clip_embedder

    return tiny_clip_embedder(placement.device, placement.dtype)


def _transformers_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.transformers_vlm import TransformersVisionLanguageModel

    return TransformersVisionLanguageModel(model, device=placement.device, dtype=placement.dtype)


def _tiny_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.transformers_vlm import tiny_transformers_vlm

    return tiny_transformers_vlm(model, placement.device, placement.dtype)


def _langchain_vlm(model: str, endpoint: Endpoint, placement: Placement) -> VisionLanguageModel:
    from imageloop.agents.langchain_vlm import langchain_vlm

    return langchain_vlm(model)


VLM_PROVIDERS: dict[str, Factory[VisionLanguageModel]] = {
    "openai": _openai_vlm,
    "transformers": _transformers_vlm,
    "tiny": _tiny_vlm,
    "langchain": _langchain_vlm,
}
GENERATOR_PROVIDERS: dict[str, Factory[ImageGenerator]] = {"openai": _openai_generator}
EMBEDDER_PROVIDERS: dict[str, Factory[Embedder]] = {
    "openai": _openai_embedder,
    "open_clip": _open_clip_embedder,
    "transformers": _transformers_embedder,
    "tiny": _tiny_embedder,
}


def _build(table: dict[str, Factory[T]], role: Role, spec: RoleSpec, endpoint: Endpoint, placement: Placement) -> T:
    factory = table.get(spec.provider)
    if factory is None:
        known = ", ".join(sorted(table))
        raise ConfigError(f"unknown {role} provider {spec.provider!r} in {str(spec)!r}; known providers: {known}")
    return factory(spec.model, endpoint, placement)


@functools.cache
def _vlm(spec: RoleSpec, endpoint: Endpoint, placement: Placement, role: Role) -> VisionLanguageModel:
    return _build(VLM_PROVIDERS, role, spec, endpoint, placement)


@functools.cache
def _generator(spec: RoleSpec, endpoint: Endpoint, placement: Placement) -> ImageGenerator:
    return _build(GENERATOR_PROVIDERS, "generator", spec, endpoint, placement)


@functools.cache
def _embedder(spec: RoleSpec, endpoint: Endpoint, placement: Placement) -> Embedder:
    return _build(EMBEDDER_PROVIDERS, "embedder", spec, endpoint, placement)


def make_vlm(settings: Settings, role: Role = "vlm") -> VisionLanguageModel:
    """The VLM serving `role` (the critic and rewriter, or the captioner)."""
    return _vlm(settings.role_spec(role), settings.endpoint(role), Placement.of(settings), role)


def make_generator(settings: Settings) -> ImageGenerator:
    """The configured image generator."""
    return _generator(settings.role_spec("generator"), settings.endpoint("generator"), Placement.of(settings))


def make_embedder(settings: Settings) -> Embedder:
    """The configured retrieval embedder."""
    return _embedder(settings.role_spec("embedder"), settings.endpoint("embedder"), Placement.of(settings))
