"""Turns role strings (`PROVIDER:MODEL`) into backends, each built once per process.

Providers import their libraries lazily, so choosing `openai:` never imports torch. A later
provider registers itself by adding a factory to the matching table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from imageloop.config import Endpoint, Role, RoleSpec, Settings
from imageloop.errors import ConfigError
from imageloop.protocols import Embedder, ImageGenerator, VisionLanguageModel

T = TypeVar("T")
Factory = Callable[[str, Endpoint], T]


def _openai_vlm(model: str, endpoint: Endpoint) -> VisionLanguageModel:
    from imageloop.agents.openai_vlm import OpenAIVisionLanguageModel

    return OpenAIVisionLanguageModel(model, endpoint)


def _openai_generator(model: str, endpoint: Endpoint) -> ImageGenerator:
    from imageloop.tools.openai_images import OpenAIImageGenerator

    return OpenAIImageGenerator(model, endpoint)


def _openai_embedder(model: str, endpoint: Endpoint) -> Embedder:
    from imageloop.tools.openai_embeddings import OpenAITextEmbedder

    return OpenAITextEmbedder(model, endpoint)


VLM_PROVIDERS: dict[str, Factory[VisionLanguageModel]] = {"openai": _openai_vlm}
GENERATOR_PROVIDERS: dict[str, Factory[ImageGenerator]] = {"openai": _openai_generator}
EMBEDDER_PROVIDERS: dict[str, Factory[Embedder]] = {"openai": _openai_embedder}


def _build(table: dict[str, Factory[T]], role: Role, spec: RoleSpec, endpoint: Endpoint) -> T:
    factory = table.get(spec.provider)
    if factory is None:
        known = ", ".join(sorted(table))
        raise ConfigError(f"unknown {role} provider {spec.provider!r} in {str(spec)!r}; known providers: {known}")
    return factory(spec.model, endpoint)


@functools.cache
def _vlm(spec: RoleSpec, endpoint: Endpoint, role: Role) -> VisionLanguageModel:
    return _build(VLM_PROVIDERS, role, spec, endpoint)


@functools.cache
def _generator(spec: RoleSpec, endpoint: Endpoint) -> ImageGenerator:
    return _build(GENERATOR_PROVIDERS, "generator", spec, endpoint)


@functools.cache
def _embedder(spec: RoleSpec, endpoint: Endpoint) -> Embedder:
    return _build(EMBEDDER_PROVIDERS, "embedder", spec, endpoint)


def make_vlm(settings: Settings, role: Role = "vlm") -> VisionLanguageModel:
    """The VLM serving `role` (the critic and rewriter, or the captioner)."""
    return _vlm(settings.role_spec(role), settings.endpoint(role), role)


def make_generator(settings: Settings) -> ImageGenerator:
    """The configured image generator."""
    return _generator(settings.role_spec("generator"), settings.endpoint("generator"))


def make_embedder(settings: Settings) -> Embedder:
    """The configured retrieval embedder."""
    return _embedder(settings.role_spec("embedder"), settings.endpoint("embedder"))
