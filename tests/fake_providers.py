"""Registers scripted fakes as a `fake:` provider, so code that builds its backends from Settings runs on them.

The CLI, `run_imagerag`, the LangChain tools and the server factories all go through
`imageloop.backends`; registering the fakes there tests that real wiring rather than a test-only path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

import imageloop.backends as backends
from imageloop.config import Settings
from tests.fakes import FakeHashEmbedder, ScriptedGenerator, ScriptedVLM

FAKE_SETTINGS = {"vlm": "fake:vlm", "generator": "fake:generator", "embedder": "fake:hash"}


@dataclass
class FakeBackends:
    """The fakes every `fake:` role resolves to, and settings that select them."""

    vlm: ScriptedVLM
    generator: ScriptedGenerator
    embedder: FakeHashEmbedder
    settings: Settings


@contextmanager
def fake_backends(monkeypatch: pytest.MonkeyPatch, vlm_answers: list[object] | None = None) -> Iterator[FakeBackends]:
    """Within the block, `fake:*` roles are the returned scripted VLM, generator and hashing embedder."""
    fakes = FakeBackends(
        vlm=ScriptedVLM(list(vlm_answers or [])),
        generator=ScriptedGenerator(),
        embedder=FakeHashEmbedder(),
        settings=Settings.model_validate(FAKE_SETTINGS),
    )

    def vlm(model: str, *where: object) -> ScriptedVLM:  # (model, endpoint, placement)
        return fakes.vlm

    def generator(model: str, *where: object) -> ScriptedGenerator:  # (model, endpoint, placement)
        return fakes.generator

    def embedder(model: str, *where: object) -> FakeHashEmbedder:  # (model, endpoint, placement)
        return fakes.embedder

    monkeypatch.setitem(backends.VLM_PROVIDERS, "fake", vlm)
    monkeypatch.setitem(backends.GENERATOR_PROVIDERS, "fake", generator)
    monkeypatch.setitem(backends.EMBEDDER_PROVIDERS, "fake", embedder)
    backends.clear_backends()
    try:
        yield fakes
    finally:
        backends.clear_backends()


CAPTIONS = {
    "jay": "a blue jay with a blue crest on a branch",
    "snow": "a snowy branch in winter",
    "cat": "a tabby cat asleep on a sofa",
}


def captioned_folder(root: Path) -> Path:
    """jay.png, snow.png and cat.png with sidecar captions (the caption route needs no captioner)."""
    root.mkdir(parents=True, exist_ok=True)
    for shade, (name, caption) in enumerate(CAPTIONS.items()):
        Image.new("RGB", (24, 24), (60 * (shade + 1), 200 - 50 * shade, 90)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption)
    return root
