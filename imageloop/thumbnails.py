"""Thumbnails for tool results (MCP, LangChain): images downscaled so one result stays under a client's size cap.

Claude Desktop caps a whole tool result near 1 MiB; a result's images share `RESULT_IMAGE_BUDGET`
base64 characters, each encoded as PNG and shrunk until it fits. Repeat queries (and a run polled
until it finishes) skip the decoder and encoder through a small cache keyed by path, modification
time and size, and bounded by the bytes it holds: a server fills it and stays there.
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from PIL import Image

from imageloop.tools.images import open_image, png_bytes

# Images per result and their budget: base64 bytes of all images in one result (the JSON text beside
# the images needs a little room too).
RESULT_IMAGE_BUDGET = 960_000
THUMBNAIL_SIDE = 512
THUMBNAIL_CACHE_BYTES = 16 * 2**20
"""Encoded thumbnails a process keeps, in base64 characters: 17 full results (ten thumbnails at most ~96,000
characters each) or a few hundred small ones. It was 64 MiB, and filling it was the whole of the RSS growth the
30-minute MCP soak still showed (+6.7%; flat with the cache off, since every run's pictures are new keys)."""


def image_budgets(count: int, total: int = RESULT_IMAGE_BUDGET) -> int:
    """The base64 budget of each of `count` images sharing one result."""
    return total // max(count, 1)


class _EncodedCache:
    """Recently encoded thumbnails, bounded by their total size (repeat queries skip the PNG encoder)."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[Hashable, str | None] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bool, str | None]:
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key]

    @property
    def held_bytes(self) -> int:
        """The base64 characters held, never more than the bound."""
        return self._bytes

    def put(self, key: Hashable, value: str | None) -> None:
        with self._lock:
            if key in self._items or len(value or "") > self._max_bytes:
                return
            self._items[key] = value
            self._bytes += len(value or "")
            while self._bytes > self._max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped or "")


_encoded = _EncodedCache(THUMBNAIL_CACHE_BYTES)


def encode_png_under(path: Path, budget: int, max_side: int = THUMBNAIL_SIDE) -> str | None:
    """`path` as base64 PNG no longer than `budget` characters, downscaled as needed; None if it won't fit."""
    stat = path.stat()
    # Keyed by mtime and size as well as path, so a rewritten file is encoded afresh.
    key = (str(path), stat.st_mtime_ns, stat.st_size, budget, max_side)
    hit, data = _encoded.get(key)
    if not hit:
        data = _encode_png(path, budget, max_side)
        _encoded.put(key, data)
    return data


def _encode_png(path: Path, budget: int, max_side: int) -> str | None:
    image = open_image(path)
    # First guess from the budget: photos compress to roughly 1.5 bytes a pixel as PNG.
    side = int(((budget * 3 / 4) / 1.5) ** 0.5)
    image.thumbnail((max(16, min(max_side, side)), max(16, min(max_side, side))))
    for _ in range(8):
        data = png_bytes(image)
        encoded = 4 * ((len(data) + 2) // 3)
        if encoded <= budget:
            return base64.b64encode(data).decode("ascii")
        scale = min(0.9, 0.95 * (budget / encoded) ** 0.5)
        if image.width * scale < 8 or image.height * scale < 8:
            return None
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    return None
