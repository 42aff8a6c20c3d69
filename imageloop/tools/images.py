"""Reading and encoding images, with the checks every entry point needs.

Every image file is opened through `open_regular`: without blocking (a FIFO named `x.png` would
otherwise wait forever for a writer) and only when it is a regular file once symlinks are followed
(a FIFO, a device or a folder is refused by its kind; a symlink loop by the OS's ELOOP).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from imageloop.errors import ImageDecodeError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TAR_MEMBER = ".tar#"
"""Marks an address inside a WebDataset shard: `00000.tar#000000123.jpg`."""

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


def open_regular(path: Path) -> io.BufferedReader:
    """`path` opened for binary reading, or ImageDecodeError when it is no regular file or cannot be opened.

    O_NONBLOCK makes opening a FIFO return at once (for a regular file it changes nothing); the kind is
    checked on the open descriptor, so a file swapped for a FIFO after a check is still caught. An address
    inside a tar (`shard.tar#key.jpg`) opens that member, read in place (`imageloop.tools.indexing.sources`).
    """
    if TAR_MEMBER in str(path) and not os.path.lexists(path):
        # An image inside a WebDataset shard (`shard.tar#key.jpg`), as an index of shards records it.
        from imageloop.tools.indexing.sources import open_tar_member, tar_address

        address = tar_address(path)
        if address is not None:
            return open_tar_member(*address)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageDecodeError(f"{path}: not a regular file ({_kind(mode)}); not read")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")]
    kinds += [(stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_image(path: Path, *, shortest_side: int | None = None) -> Image.Image:
    """Decode `path` into an RGB image, or raise ImageDecodeError saying why.

    With `shortest_side`, a larger picture is reduced while it is decoded (JPEG decodes at 1/2, 1/4 or
    1/8 scale directly) and then resized so its shortest side is `shortest_side`: what an embedder
    needs, at a fraction of the memory of the full picture.
    """
    with open_regular(path) as f:
        return decode_image(f, path, shortest_side=shortest_side)


def image_size(path: Path) -> tuple[int, int]:
    """`path`'s (width, height) from its header alone, with open_image's checks."""
    with open_regular(path) as f, _open_header(f, path) as img:
        return img.size


def decode_image(f: BinaryIO, path: Path, *, shortest_side: int | None = None) -> Image.Image:
    """Decode the open image file `f` (named `path` in messages) from where it stands; see `open_image`."""
    with _open_header(f, path) as img:
        try:
            wanted = _reduced_size(img.size, shortest_side)
            if wanted is not None and img.format == "JPEG":
                img.draft("RGB", wanted)  # decode at the smallest DCT scale still at least `wanted`
            img.load()
            rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageDecodeError(f"{path}: not a readable image ({e})") from e
    return reduce_image(rgb, shortest_side)


def _open_header(f: BinaryIO, path: Path) -> Image.Image:
    """Open `f`'s header (no pixels decoded yet) after the size checks, or raise ImageDecodeError saying why."""
    start = f.tell()
    size = f.seek(0, os.SEEK_END) - start  # the bytes from here: a file's, or a tar member's
    f.seek(start)
    if size > MAX_FILE_BYTES:
        raise ImageDecodeError(f"{path}: {size:,} bytes exceeds the {MAX_FILE_BYTES:,}-byte limit; not decoded")
    try:
        with _HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Image.open reads the header only; Pillow's own bomb check runs here, on the declared size.
            img = Image.open(f)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"{path}: exceeds the {MAX_PIXELS:,}-pixel limit; not decoded ({e})") from e
    except UnidentifiedImageError as e:
        # Pillow's own message names the file object (`<_io.BufferedReader name=7>`), not the file.
        raise ImageDecodeError(f"{path}: not a readable image (no image format Pillow knows)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"{path}: not a readable image ({e})") from e
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise ImageDecodeError(f"{path}: {img.width}x{img.height} exceeds the {MAX_PIXELS:,}-pixel limit; not decoded")
    return img


def reduce_image(image: Image.Image, shortest_side: int | None) -> Image.Image:
    """`image` resized so its shortest side is `shortest_side` when it is larger (aspect kept), else as is."""
    wanted = _reduced_size(image.size, shortest_side)
    return image if wanted is None else image.resize(wanted, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _reduced_size(size: tuple[int, int], shortest_side: int | None) -> tuple[int, int] | None:
    """The size with its shortest side at `shortest_side`, aspect kept; None when no smaller is wanted."""
    if shortest_side is None or min(size) <= shortest_side:
        return None
    scale = shortest_side / min(size)
    return max(1, math.ceil(size[0] * scale - 1e-9)), max(1, math.ceil(size[1] * scale - 1e-9))


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG (lossless, deterministic for identical pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def content_id(path: Path) -> str:
    """The sha256 of a file's bytes: an indexed image's id, the same whatever its name or folder."""
    with open_regular(path) as f:
        return file_digest(f)


def file_digest(f: io.BufferedReader) -> str:
    """The sha256 of an open file's bytes from where it stands (see `content_id`)."""
    return hashlib.file_digest(f, "sha256").hexdigest()


def image_files(root: Path) -> Iterator[Path]:
    """Image files under `root`, skipping hidden files and folders (the index's own `.imageloop` among them).

    Only regular files are listed, symlinks followed: a FIFO, socket or device named like an image, a
    dangling link or a symlink loop is left out without being opened. A symlink whose target lies
    outside `root` is skipped too: an index must not hand out files from outside the folder it was
    asked to index (servers confine paths to the folders they serve).
    """
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place so os.walk never descends into .imageloop, .git and the like.
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                if not stat.S_ISREG(path.stat().st_mode):
                    continue
                if path.is_symlink() and not path.resolve(strict=True).is_relative_to(real_root):
                    continue
            except (OSError, RuntimeError):  # dangling, a loop (ELOOP; RuntimeError from older resolvers)
                continue
            yield path
