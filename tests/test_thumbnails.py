"""Thumbnails for tool results: under their budget, and a cache that stays within its bound."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from imageloop.thumbnails import _EncodedCache, encode_png_under


def noisy_picture(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_a_thumbnail_fits_its_budget_and_its_side(tmp_path: Path) -> None:
    picture = noisy_picture(tmp_path / "photo.png", (600, 400))
    data = encode_png_under(picture, budget=20_000, max_side=256)
    assert data is not None and len(data) <= 20_000
    with Image.open(io.BytesIO(base64.b64decode(data))) as thumbnail:
        assert thumbnail.format == "PNG" and max(thumbnail.size) <= 256


def test_the_cache_keeps_the_newest_within_its_bound() -> None:
    cache = _EncodedCache(max_bytes=100)
    for key in range(5):
        cache.put(key, "x" * 40)
    assert cache.held_bytes <= 100
    assert cache.get(4) == (True, "x" * 40)
    assert cache.get(0) == (False, None)


def test_a_value_larger_than_the_whole_cache_neither_stays_nor_flushes_the_others() -> None:
    # It used to be stored, then everything evicted to make room, itself last: one large thumbnail emptied the cache.
    cache = _EncodedCache(max_bytes=100)
    cache.put("small", "x" * 40)
    cache.put("huge", "y" * 200)
    assert cache.get("huge") == (False, None)
    assert cache.get("small") == (True, "x" * 40)
    assert cache.held_bytes == 40


def test_a_rewritten_picture_is_encoded_afresh(tmp_path: Path) -> None:
    picture = noisy_picture(tmp_path / "photo.png", (64, 64), seed=1)
    first = encode_png_under(picture, budget=100_000)
    noisy_picture(picture, (80, 48), seed=2)
    os.utime(picture, ns=(1, 1))  # even with an older modification time: its size changed
    assert encode_png_under(picture, budget=100_000) != first
