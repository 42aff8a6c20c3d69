"""Tiny CIRR- and FashionIQ-format folders on disk, laid out as the releases are, with real PNG files.

For the loaders' own tests and for end-to-end CIR evaluations: every image has its own flat colour
(so its bytes, sha256 and pixel statistics differ), and every query's target is a different image
than its reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.image_folders import write_image

CIRR_MODIFICATIONS = ("make it brighter", "add a second dog", "show it at night", "remove the people")
FASHIONIQ_CAPTIONS = (("is darker", "has long sleeves."), ("is red.", "Shorter and with a belt"))


@dataclass(frozen=True)
class CIRRFixture:
    """A CIRR-format folder: `root` holds captions/ and image_splits/, `images` the raw images."""

    root: Path
    images: Path
    names: list[str]
    pairs: list[dict[str, object]]


@dataclass(frozen=True)
class FashionIQFixture:
    """A FashionIQ-format folder: captions/, image_splits/ and images/ under `root`."""

    root: Path
    galleries: dict[str, list[str]]
    triplets: dict[str, list[dict[str, object]]]


def write_cirr(root: Path, groups: int = 2, split: str = "val") -> CIRRFixture:
    """`groups` image sets of six (`dev-<g>-<i>-img0`), two query pairs each, as CIRR's `split` files.

    In each set, member 0 is changed into member 1 and member 2 into member 3; the test1 split is
    written without `target_hard`, as released.
    """
    folder = {"val": "dev", "test1": "test1", "train": "train"}[split]
    images = root / "img_raw"
    names: list[str] = []
    pairs: list[dict[str, object]] = []
    for g in range(groups):
        members = [f"{folder}-{g}-{i}-img0" for i in range(6)]
        names += members
        for q, (reference, target) in enumerate([(members[0], members[1]), (members[2], members[3])]):
            pair: dict[str, object] = {
                "pairid": 100 * g + q,
                "reference": reference,
                "target_hard": target,
                "target_soft": {target: 1.0},
                "caption": CIRR_MODIFICATIONS[(2 * g + q) % len(CIRR_MODIFICATIONS)],
                "img_set": {"id": g, "members": members},
            }
            if split == "test1":
                del pair["target_hard"], pair["target_soft"]
            pairs.append(pair)
    for shade, name in enumerate(names):
        write_image(images / folder / f"{name}.png", 7 * (shade + 1))
    _write_json(root / "captions" / f"cap.rc2.{split}.json", pairs)
    _write_json(root / "image_splits" / f"split.rc2.{split}.json", {n: f"./{folder}/{n}.png" for n in names})
    return CIRRFixture(root, images, names, pairs)


def write_fashioniq(
    root: Path,
    categories: Sequence[str] = ("dress", "shirt", "toptee"),
    per_category: int = 4,
    suffix: str = ".png",
    split: str = "val",
) -> FashionIQFixture:
    """`per_category` images per category under images/, and queries changing image i into image i+1 (`split`)."""
    galleries: dict[str, list[str]] = {}
    triplets: dict[str, list[dict[str, object]]] = {}
    shade = 0
    for category in categories:
        names = [f"B0{category.upper()[:4]}{i:04d}" for i in range(per_category)]
        for name in names:
            shade += 1
            write_image(root / "images" / f"{name}{suffix}", 9 * shade)
        galleries[category] = names
        triplets[category] = [
            {"candidate": names[i], "target": names[i + 1], "captions": list(FASHIONIQ_CAPTIONS[i % 2])}
            for i in range(per_category - 1)
        ]
        _write_json(root / "image_splits" / f"split.{category}.{split}.json", names)
        _write_json(root / "captions" / f"cap.{category}.{split}.json", triplets[category])
    return FashionIQFixture(root, galleries, triplets)


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
