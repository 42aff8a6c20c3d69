"""A triplet dataset folder as DAIG's synthesis writes it, in the format `imageloop.training.triplets` reads.

`DIR/triplets.jsonl` holds one record a line, `{"id", "object", "edit", "reference_text", "change",
"target_text", "reference_image", "target_image"}`, the image paths relative to DIR (`images/<id>_
reference.png` and `images/<id>_target.png`: the two halves of one diptych). Images are written
atomically before their record, and a record is appended as one fsynced write, so a process killed at
any point leaves whole records only (a line it cut short is dropped when the folder is next opened)
and at worst the images of a record it never wrote, which the next write of that id replaces (and the
temporary files of an image write it cut short, which the next opening of the folder deletes).

One writer at a time: opening the folder takes an exclusive lock on `DIR/.triplets.lock`, which the
operating system releases when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from PIL import Image

from imageloop.errors import ImageloopError
from imageloop.files import write_atomic
from imageloop.tools.images import png_bytes
from imageloop.training.triplets import TRIPLETS_FILENAME

IMAGES_DIR = "images"
LOCK_FILE = ".triplets.lock"


@dataclass(frozen=True)
class TripletRecord:
    """One line of `triplets.jsonl` (image paths relative to the dataset folder)."""

    id: str
    object: str
    edit: str
    reference_text: str
    change: str
    target_text: str
    reference_image: str
    target_image: str


class TripletDataset:
    """An append-only triplet dataset folder, held by one writer while it is open (`with TripletDataset(...)`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file = folder / TRIPLETS_FILENAME
        self._lock_file: IO[bytes] | None = None
        self._append = threading.Lock()
        self._ids: set[str] = set()

    def __enter__(self) -> TripletDataset:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = (self.folder / LOCK_FILE).open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ImageloopError(
                f"{self.folder} is being written by another process: wait for it, or use another `out` folder"
            ) from None
        self._lock_file = lock
        self._ids = self._repair_and_read()
        self._remove_unfinished_images()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the lock
            self._lock_file = None

    def ids(self) -> set[str]:
        """The ids of the records the folder holds."""
        with self._append:
            return set(self._ids)

    def add(self, record: TripletRecord, reference: Image.Image, target: Image.Image) -> None:
        """Write both images, then append the record (fsynced); an id already present is refused."""
        if self._lock_file is None:
            raise ImageloopError(f"{self.folder}: open the dataset (with TripletDataset(...)) before adding to it")
        write_atomic(self.folder / record.reference_image, png_bytes(reference))
        write_atomic(self.folder / record.target_image, png_bytes(target))
        line = (json.dumps(asdict(record), ensure_ascii=False) + "\n").encode("utf-8")
        with self._append:
            if record.id in self._ids:
                raise ImageloopError(f"{self.file} already holds triplet {record.id}")
            # One write() of the whole line on an O_APPEND descriptor: no other record can interleave.
            fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._ids.add(record.id)

    @staticmethod
    def image_paths(triplet_id: str) -> tuple[str, str]:
        """Where a triplet's reference and target halves go, relative to the folder."""
        return f"{IMAGES_DIR}/{triplet_id}_reference.png", f"{IMAGES_DIR}/{triplet_id}_target.png"

    def _remove_unfinished_images(self) -> None:
        """Delete the temporary files of image writes a killed process left (`images/.NAME.*.tmp`): with the
        lock held, no other writer can be half-way through one."""
        images = self.folder / IMAGES_DIR
        for leftover in images.glob(".*.tmp") if images.is_dir() else ():
            leftover.unlink(missing_ok=True)

    def _repair_and_read(self) -> set[str]:
        """Drop a last line a crash cut short, then read the ids of every record (a bad whole line is an error)."""
        if not self.file.is_file():
            return set()
        data = self.file.read_bytes()
        keep = data.rfind(b"\n") + 1  # a line without its newline is one whose write was cut short
        if keep != len(data):
            with self.file.open("rb+") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        ids: set[str] = set()
        for number, line in enumerate(data[:keep].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            triplet_id = _record_id(line)
            if triplet_id is None:
                raise ImageloopError(f"{self.file}:{number}: not a triplet record; fix or remove that line")
            ids.add(triplet_id)
        return ids


def _record_id(line: bytes) -> str | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    triplet_id = record.get("id") if isinstance(record, dict) else None
    return triplet_id if isinstance(triplet_id, str) else None
