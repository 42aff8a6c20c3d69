"""A small world for composed-retrieval tests: flat-colour pictures and an embedder that sees colours.

`FakeColourEmbedder` puts a text and a picture in one space by colour: a text on the axes of the colour
words it names, a picture on the axis of the palette colour nearest its mean pixel, both with a small
shared component so every cosine is defined. "a red square" thus retrieves the red picture, and a
reference "changed to red" has one right answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from imageloop.protocols import GenerationRequest, GenerationResult, Vector

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 50, 220),
    "yellow": (230, 220, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
COLOURS = list(PALETTE)
SHARED = 0.2


def _unit(rows: np.ndarray) -> Vector:
    return np.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


class FakeColourEmbedder:
    """Texts by the colour words they name, pictures by their nearest palette colour; one shared axis."""

    def __init__(self, model_id: str = "fake:colour") -> None:
        self.model_id = model_id
        self.embeds_images = True
        self.dim = len(COLOURS) + 1
        self.texts: list[str] = []
        self.images = 0

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        self.texts += list(texts)
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = text.lower().replace(",", " ").replace(".", " ").split()
            for axis, colour in enumerate(COLOURS):
                rows[row, axis] = words.count(colour)
            rows[row, -1] = SHARED
        return _unit(rows)

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        self.images += len(images)
        rows = np.zeros((len(images), self.dim), dtype=np.float32)
        for row, image in enumerate(images):
            mean = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(axis=0)
            nearest = min(range(len(COLOURS)), key=lambda i: float(np.sum((mean - PALETTE[COLOURS[i]]) ** 2)))
            rows[row, nearest] = 1.0
            rows[row, -1] = SHARED
        return _unit(rows)


def colour_picture(colour: str, size: int = 16) -> Image.Image:
    """A flat picture of a palette colour."""
    return Image.new("RGB", (size, size), PALETTE[colour])


def colour_folder(root: Path, colours: Sequence[str] = COLOURS, captions: bool = True) -> dict[str, Path]:
    """One picture per colour (`<colour>.png`), each with a sidecar "a <colour> square" when `captions`."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for colour in colours:
        path = root / f"{colour}.png"
        colour_picture(colour).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a {colour} square")
        paths[colour] = path
    return paths


class ScriptedColourGenerator:
    """Draws the first palette colour its prompt names (grey if none), recording each request."""

    model_id = "scripted:colour"

    def __init__(self, max_references: int = 1) -> None:
        self.max_references = max_references
        self.requests: list[GenerationRequest] = []

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        words = request.prompt.lower().replace(",", " ").replace(".", " ").split()
        named = next((word for word in words if word in PALETTE), None)
        colour = PALETTE[named] if named else (128, 128, 128)
        width, height = request.size or (16, 16)
        return GenerationResult(Image.new("RGB", (width, height), colour), request.prompt)
