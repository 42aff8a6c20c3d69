"""Indexing an image folder: content-addressed, incremental, and resumable after an interruption.

Each image is stored once under the sha256 of its bytes, so re-running over a folder only embeds
files it has not seen, and a run that was killed loses at most the batch it was filling.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from imageloop.errors import ImageloopError
from imageloop.protocols import Embedder, VectorRecord
from imageloop.tools.image_index import ImageIndex, Route, create_or_open_index
from imageloop.tools.images import IMAGE_SUFFIXES, open_image


@dataclass
class IndexSummary:
    """What one indexing run did; `indexed + skipped + failed == total` image files seen."""

    indexed: int = 0
    skipped: int = 0
    failed: int = 0
    total: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The counts and the failures (path, reason) as a JSON-ready dict for the CLI and MCP."""
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "failed": self.failed,
            "total": self.total,
            "failures": [{"path": path, "reason": reason} for path, reason in self.failures],
        }


@dataclass(frozen=True)
class _Pending:
    """A decoded image waiting for its batch to be embedded; `image` is kept on the image route only."""

    id: str
    relative: Path
    caption: str
    image: Image.Image | None


def index_folder(
    folder: Path,
    embedder: Embedder,
    captioner: Callable[[Path], str] | None,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> IndexSummary:
    """Add every new image under `folder` to its index; unreadable files are reported, never fatal."""
    if batch_size <= 0:
        raise ImageloopError(f"batch_size must be positive, got {batch_size}")
    index = create_or_open_index(folder, embedder)
    try:
        return _index_into(index, embedder, captioner, batch_size=batch_size, progress=progress)
    finally:
        index.close()


def _index_into(
    index: ImageIndex,
    embedder: Embedder,
    captioner: Callable[[Path], str] | None,
    *,
    batch_size: int,
    progress: bool,
) -> IndexSummary:
    """The indexing loop proper: hash, skip known content, decode, caption, embed and commit per batch."""
    files = sorted(_image_files(index.root), key=lambda path: path.relative_to(index.root).as_posix())
    summary = IndexSummary(total=len(files))
    seen: set[str] = set()
    pending: list[_Pending] = []

    def commit() -> None:
        # One upsert per batch, one transaction per upsert: an interruption loses this batch only.
        if index.route == "image":
            vectors = embedder.embed_images([item.image for item in pending if item.image is not None])
        else:
            vectors = embedder.embed_texts([item.caption for item in pending])
        index.store.upsert(
            [
                VectorRecord(
                    id=item.id,
                    vector=vector,
                    metadata={
                        "path": item.relative.as_posix(),
                        "caption": item.caption,
                        "folder": item.relative.parent.as_posix(),
                    },
                )
                for item, vector in zip(pending, vectors, strict=True)
            ]
        )
        summary.indexed += len(pending)
        pending.clear()

    disable = not progress or not sys.stderr.isatty()
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=disable) as bar:
        for path in files:
            relative = path.relative_to(index.root)
            outcome = _prepare(path, relative, index, captioner, seen)
            if isinstance(outcome, _Pending):
                pending.append(outcome)
                if len(pending) == batch_size:
                    commit()
            elif outcome is None:
                summary.skipped += 1
            else:
                summary.failed += 1
                summary.failures.append((relative.as_posix(), outcome))
            bar.update()
            bar.set_postfix(indexed=summary.indexed, skipped=summary.skipped, failed=summary.failed)
        if pending:
            commit()
            bar.set_postfix(indexed=summary.indexed, skipped=summary.skipped, failed=summary.failed)
    return summary


def _prepare(
    path: Path,
    relative: Path,
    index: ImageIndex,
    captioner: Callable[[Path], str] | None,
    seen: set[str],
) -> _Pending | str | None:
    """A record-to-be for `path`, None when its content is already indexed, else why it failed."""
    try:
        with path.open("rb") as f:
            image_id = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        return f"{path}: cannot read ({e})"
    # Known content is skipped before decoding: a re-run over a large folder only hashes bytes.
    if image_id in seen or index.store.get([image_id]):
        return None
    try:
        image = open_image(path)
        caption = _caption(path, relative, index.route, captioner)
    except ImageloopError as e:
        return str(e)
    seen.add(image_id)
    return _Pending(image_id, relative, caption, image if index.route == "image" else None)


def _caption(path: Path, relative: Path, route: Route, captioner: Callable[[Path], str] | None) -> str:
    """The sidecar `NAME.txt` if present, else the captioner's; the caption route needs one of them."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        try:
            return sidecar.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ImageloopError(f"{sidecar}: cannot read caption ({e})") from e
    if captioner is not None:
        return captioner(path)
    if route == "caption":
        raise ImageloopError(f"no caption: add {relative.with_suffix('.txt').as_posix()} or configure a captioner")
    return ""


def _image_files(root: Path) -> Iterator[Path]:
    """Image files under `root`, skipping hidden files and folders (the index's own `.imageloop` among them)."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruned in place so os.walk never descends into .imageloop, .git and the like.
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(dirpath) / name
