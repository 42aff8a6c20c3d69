"""Reading and encoding images, with the checks every entry point needs."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from imageloop.errors import ImageDecodeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Pillow warns above ~89 Mpx and raises above twice that; we refuse anything over this bound outright
# so a hostile or broken file cannot exhaust memory while decoding.
MAX_PIXELS = 64_000_000


def open_image(path: Path) -> Image.Image:
    """Decode `path` fully into an RGB image, or raise ImageDecodeError saying why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageDecodeError(f"{path}: {img.width}x{img.height} exceeds the {MAX_PIXELS:,}-pixel limit")
                img.load()
                return img.convert("RGB")
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{path}: not a readable image ({e})") from e


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG (lossless, deterministic for identical pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
