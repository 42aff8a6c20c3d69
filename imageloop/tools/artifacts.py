"""Content-addressed image storage.

Graph state and checkpoints carry artifact ids (sha256 of the PNG bytes), never pixels: a checkpoint
stays a few hundred bytes however many images a run makes, and identical images are stored once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from imageloop.files import write_atomic
from imageloop.tools.images import open_image, png_bytes


class ArtifactStore:
    """Images stored as `<root>/<sha256>.png`; writes are atomic (temp file, then rename)."""

    def __init__(self, root: Path) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        """The folder the images are stored in (created with the first one)."""
        return self._root

    def put(self, image: Image.Image) -> str:
        """Store `image` and return its id; storing the same pixels twice is a no-op."""
        data = png_bytes(image)
        artifact_id = hashlib.sha256(data).hexdigest()
        target = self.path(artifact_id)
        if not target.exists():
            write_atomic(target, data)
        return artifact_id

    def path(self, artifact_id: str) -> Path:
        """Where the artifact lives on disk (it may not exist yet)."""
        if len(artifact_id) != 64 or any(c not in "0123456789abcdef" for c in artifact_id):
            raise ValueError(f"not an artifact id: {artifact_id!r}")
        return self.root / f"{artifact_id}.png"

    def file(self, artifact_id: str | None) -> str | None:
        """The artifact's file, as its path (None for no image): how a record or a remote reader names it."""
        return str(self.path(artifact_id)) if artifact_id else None

    def open(self, artifact_id: str) -> Image.Image:
        """Load a stored image."""
        return open_image(self.path(artifact_id))
