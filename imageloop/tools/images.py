"""Reading and encoding images, with the checks every entry point needs."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from imageloop.errors import ImageDecodeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# The decompression-bomb guard: a file is refused before any pixel is decoded when it is larger than
# MAX_FILE_BYTES on disk or its header declares more than MAX_PIXELS, so one hostile or broken file
# costs at most ~MAX_PIXELS * 4 bytes while decoding. Pillow only warns above ~89 Mpx and raises
# above twice that; 64 Mpx is larger than any camera or scanner image an index needs.
MAX_PIXELS = 64_000_000
# The largest honest file at MAX_PIXELS: an uncompressed 16-bit RGBA TIFF (8 bytes a pixel).
MAX_FILE_BYTES = 512 * 2**20

# warnings.catch_warnings swaps process-wide state; the indexer opens images from several threads,
# so the header reads that use it take turns (the decoding that follows runs in parallel).
_HEADER_LOCK = threading.Lock()


def _open_checked(path: Path) -> Image.Image:
    """Open `path`'s header (no pixels decoded yet) after the size checks, or raise ImageDecodeError saying why."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read ({e})") from e
    if size > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{path}: {size:,} bytes exceeds the {MAX_FILE_BYTES:,}-byte limit; not decoded")
    try:
        with _HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Image.open reads the header only; Pillow's own bomb check runs here, on the declared size.
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{path}: exceeds the {MAX_PIXELS:,}-pixel limit; not decoded ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"{path}: not a readable image ({e})") from e
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise ImageDecodeError(f"{path}: {img.width}x{img.height} exceeds the {MAX_PIXELS:,}-pixel limit; not decoded")
    return img


def open_image(path: Path) -> Image.Image:
    """Decode `path` fully into an RGB image, or raise ImageDecodeError saying why."""
    with _open_checked(path) as img:
        try:
            img.load()
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageDecodeError(f"{path}: not a readable image ({e})") from e


def image_size(path: Path) -> tuple[int, int]:
    """`path`'s (width, height) from its header alone, with open_image's checks."""
    with _open_checked(path) as img:
        return img.size


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG (lossless, deterministic for identical pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def content_id(path: Path) -> str:
    """The sha256 of a file's bytes: an indexed image's id, the same whatever its name or folder."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def image_files(root: Path) -> Iterator[Path]:
    """Image files under `root`, skipping hidden files and folders (the index's own `.imageloop` among them).

    A symlink whose target lies outside `root` is skipped: an index must not hand out files from
    outside the folder it was asked to index (servers confine paths to the folders they serve).
    """
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place so os.walk never descends into .imageloop, .git and the like.
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                continue
            yield path
