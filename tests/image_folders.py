"""Small image folders for the indexer and retriever tests: real PNG files, written on the spot."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

CAPTIONS = {
    "bird": "a red bird on a branch",
    "car": "a blue car in the street",
    "tree": "a green tree in a park",
}


def write_image(path: Path, shade: int, size: int = 16) -> Path:
    """A flat-colour PNG whose colour (and so its bytes and sha256) is set by `shade`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 255 - shade, (shade * 7) % 256)).save(path)
    return path


def captioned_folder(root: Path) -> Path:
    """bird.png, car.png, tree.png, each with a sidecar caption."""
    for shade, (name, caption) in enumerate(CAPTIONS.items()):
        write_image(root / f"{name}.png", 40 * (shade + 1))
        (root / f"{name}.txt").write_text(caption)
    return root


def numbered_images(root: Path, n: int, captions: bool = False) -> list[Path]:
    """img00.png … distinct images, with sidecars `picture N` when `captions`."""
    paths = [write_image(root / f"img{i:02d}.png", 5 * (i + 1)) for i in range(n)]
    if captions:
        for i, path in enumerate(paths):
            path.with_suffix(".txt").write_text(f"picture {i}")
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


PRODUCTS = {
    "red-sneaker": ("a red canvas sneaker with white laces", {"tags": ["sneaker", "footwear"], "brand": "acme"}),
    "blue-sneaker": ("a blue running sneaker with a thick sole", {"tags": ["sneaker", "footwear"], "brand": "zenith"}),
    "backpack": ("a canvas backpack with leather straps", {"tags": ["bag"], "brand": "acme"}),
    "tote": ("a canvas tote bag with a red stripe", {"tags": ["bag"], "brand": "acme"}),
    "mug": ("a white ceramic mug", {"tags": ["kitchen"], "brand": "zenith"}),
}


def product_catalogue(root: Path) -> Path:
    """A brand catalogue: a distinct image per product, a caption sidecar and a `NAME.json` of tags and brand."""
    for shade, (name, (caption, metadata)) in enumerate(PRODUCTS.items()):
        write_image(root / f"{name}.png", 30 * (shade + 1), size=24)
        (root / f"{name}.txt").write_text(caption)
        (root / f"{name}.json").write_text(json.dumps(metadata))
    return root
