"""Triplet datasets on disk for the training tests: a learnable toy world of patterns and colours.

Each picture is one of a few patterns drawn in one colour; a triplet's change names a new colour and
its target is the same pattern in that colour. The target is thus a function of the reference's
pattern and the text's colour, something a composed-query model can learn and a plain sum of the two
features does not give.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 50, 220),
    "yellow": (230, 220, 30),
    "magenta": (210, 40, 200),
    "cyan": (40, 210, 220),
}
PATTERNS = ("stripes", "bars", "checks", "dot", "frame")
SIZE = 32


def pattern_mask(pattern: str, size: int = SIZE) -> np.ndarray:
    """Where a pattern is drawn, as a boolean (size, size) array."""
    y, x = np.mgrid[0:size, 0:size]
    masks = {
        "stripes": (y // 4) % 2 == 0,
        "bars": (x // 4) % 2 == 0,
        "checks": ((x // 8) + (y // 8)) % 2 == 0,
        "dot": (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2,
        "frame": (np.minimum(np.minimum(x, y), np.minimum(size - 1 - x, size - 1 - y)) < 5),
    }
    return masks[pattern]


def picture(pattern: str, colour: str, size: int = SIZE) -> Image.Image:
    """`pattern` in `colour` on a grey ground."""
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    pixels[pattern_mask(pattern, size)] = COLOURS[colour]
    return Image.fromarray(pixels)


def write_pictures(folder: Path, size: int = SIZE) -> dict[tuple[str, str], Path]:
    """Every (pattern, colour) picture as a PNG under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for pattern, colour in itertools.product(PATTERNS, COLOURS):
        path = folder / f"{pattern}-{colour}.png"
        picture(pattern, colour, size).save(path)
        paths[pattern, colour] = path
    return paths


def colour_triplets(
    folder: Path, combos: list[tuple[str, str, str]] | None = None, size: int = SIZE, relative: bool = True
) -> list[dict[str, str]]:
    """Triplet records (pattern, from colour, to colour) with pictures under `folder/images`."""
    paths = write_pictures(folder / "images", size)
    combos = combos if combos is not None else all_combos()
    records = []
    for pattern, old, new in combos:
        reference, target = paths[pattern, old], paths[pattern, new]
        records.append(
            {
                "id": f"{pattern}-{old}-{new}",
                "object": pattern,
                "edit": "colour",
                "reference_text": f"{old} {pattern} on grey",
                "change": f"make it {new}",
                "target_text": f"{new} {pattern} on grey",
                "reference_image": str(reference.relative_to(folder)) if relative else str(reference),
                "target_image": str(target.relative_to(folder)) if relative else str(target),
            }
        )
    return records


def all_combos() -> list[tuple[str, str, str]]:
    return [(p, a, b) for p, a, b in itertools.product(PATTERNS, COLOURS, COLOURS) if a != b]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_dataset(folder: Path, combos: list[tuple[str, str, str]] | None = None, size: int = SIZE) -> Path:
    """A dataset folder as triplet synthesis writes it: `folder/triplets.jsonl` with relative image paths."""
    write_jsonl(folder / "triplets.jsonl", colour_triplets(folder, combos, size))
    return folder
