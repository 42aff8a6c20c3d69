"""What an index is built from: a folder of images, WebDataset shards, or a parquet table of image paths.

An index always lives in a folder (`FOLDER/.imageloop`), and each record's `path` is an address relative
to that folder, which one reader (`imageloop.tools.images.open_regular`, so `open_image` and every face
behind it) reads back:

- a folder: every image file under it (`imageloop.tools.images.image_files`); captions and tags from
  sidecar `NAME.txt` / `NAME.json` files. Addresses: `sub/name.jpg`.
- WebDataset shards (`data/{00000..00099}.tar`, as img2dataset writes LAION subsets): the index lives in
  the folder holding the shards. A sample is the members sharing a key (the member name up to the first
  dot of its last component, WebDataset's rule): its image (`jpg`, `png`, `webp`, ...), its caption
  (`txt`) and its metadata (`json`; its text, number and boolean values become the record's tags, the
  indexer's own keys left out). Addresses: `00000.tar#000000123.jpg`. Shards are plain (uncompressed)
  tar files, read in place by offset, never extracted: a member whose name is absolute, climbs out
  (`..`) or is not a regular file (links, devices) is reported and skipped, so no address can point
  outside its tar.
- a parquet file of image paths and captions: the index lives in the parquet's folder; the path column
  (`path`, `image_path`, `image`, `file` or `filepath`) names images relative to that folder (or
  absolute inside it), the caption column (`caption` or `text`) their captions, and the other columns
  of text, numbers or booleans become tags. A path outside the folder is reported and skipped, as a
  symlink leaving an indexed folder is.

The index records which source built it (meta `source`); indexing the same folder from another kind of
source is refused, since each run prunes the records its source no longer holds.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from imageloop.errors import ImageDecodeError, ImageloopError
from imageloop.tools.images import IMAGE_SUFFIXES, TAR_MEMBER, image_files

SourceKind = Literal["folder", "webdataset", "parquet"]
TAR_SEPARATOR = "#"
PATH_COLUMNS = ("path", "image_path", "image", "file", "filepath")
CAPTION_COLUMNS = ("caption", "text")


@dataclass(frozen=True)
class Item:
    """One image a source holds: its address under the root, and what the source itself says of it.

    `caption` and `extra` (its tags) None mean the source says nothing: the sidecar files' rule applies.
    `problem` is why the source cannot hand the image out (an unsafe tar member, a path outside the folder).
    """

    address: str
    caption: str | None = None
    extra: Mapping[str, Any] | None = None
    problem: str | None = None

    @property
    def folder(self) -> str:
        """The record's `folder`: the shard of a tar member, else the address's parent folder."""
        shard, inside, _ = self.address.partition(TAR_MEMBER)
        return f"{shard}.tar" if inside else PurePosixPath(self.address).parent.as_posix()


@dataclass(frozen=True)
class Source:
    """Where an index's images come from: its root folder, its kind, its files, and the items they hold."""

    root: Path
    kind: SourceKind
    files: tuple[str, ...] = ()

    def items(self) -> list[Item]:
        """Every image of the source, in a stable order (by address)."""
        if self.kind == "folder":
            files = image_files(self.root)
            return sorted((Item(path.relative_to(self.root).as_posix()) for path in files), key=_by_address)
        if self.kind == "webdataset":
            return [item for name in self.files for item in _shard_items(self.root, name)]
        return _parquet_items(self.root, self.files[0])

    def record(self) -> dict[str, Any]:
        """The index meta that names this source."""
        return {"kind": self.kind, "files": list(self.files)}


def _by_address(item: Item) -> str:
    return item.address


def resolve_source(given: Sequence[str | Path]) -> Source:
    """The source a command line names: one folder, one parquet file, or tar shards (brace patterns expanded)."""
    names = [str(name) for name in given]
    if not names:
        raise ImageloopError("nothing to index: name a folder, a parquet file or WebDataset shards")
    paths = [Path(expanded).expanduser() for name in names for expanded in expand_braces(name)]
    if len(paths) == 1 and paths[0].is_dir():
        return Source(paths[0].resolve(), "folder")
    if len(paths) == 1 and paths[0].suffix == ".parquet":
        if not paths[0].is_file():
            raise ImageloopError(f"{paths[0]}: no such parquet file")
        return Source(paths[0].parent.resolve(), "parquet", (paths[0].name,))
    not_tars = [str(path) for path in paths if path.suffix != ".tar"]
    if not_tars:
        raise ImageloopError(
            f"{not_tars[0]}: index a folder, a parquet file or WebDataset shards (e.g. 'data/{{00000..00009}}.tar')"
        )
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ImageloopError(f"{missing[0]}: no such shard ({len(missing)} of {len(paths)} missing)")
    folders = {path.resolve().parent for path in paths}
    if len(folders) != 1:
        raise ImageloopError("shards must lie in one folder: the index goes there")
    root = folders.pop()
    return Source(root, "webdataset", tuple(sorted(dict.fromkeys(path.name for path in paths))))


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: `{00000..00099}` (zero-padded ranges) and `{a,b}` lists, every group expanded."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers is not None:
        low, high = numbers.group(1), numbers.group(2)
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        choices = [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


# --- WebDataset shards --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int
    regular: bool


_tables: dict[tuple[str, int, int], dict[str, _Member]] = {}
_tables_lock = threading.Lock()


def _members(tar: Path) -> dict[str, _Member]:
    """The tar's members by name (data offset, size, whether a regular file), read once per version of the file."""
    stat = tar.stat()
    key = (str(tar.resolve()), stat.st_mtime_ns, stat.st_size)
    with _tables_lock:
        table = _tables.get(key)
    if table is not None:
        return table
    try:
        with tarfile.open(tar, mode="r:") as archive:
            table = {m.name: _Member(m.offset_data, m.size, m.isreg()) for m in archive.getmembers()}
    except (tarfile.TarError, OSError) as e:
        raise ImageloopError(f"{tar}: not a readable uncompressed tar ({e})") from e
    with _tables_lock:
        _tables[key] = table
    return table


def _unsafe(name: str) -> bool:
    """A member name an address must never carry: absolute, climbing out, or Windows-style."""
    pure = PurePosixPath(name)
    return not name or pure.is_absolute() or ".." in pure.parts or "\\" in name


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension): the name up to the first dot of its last component, and the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def _shard_items(root: Path, name: str) -> list[Item]:
    """A shard's samples with an image: its address, caption (`txt`) and tags (`json`)."""
    tar = root / name
    members = _members(tar)
    samples: dict[str, dict[str, str]] = {}
    items: list[Item] = []
    for member, info in members.items():
        key, extension = _split_key(member)
        address = f"{name}{TAR_SEPARATOR}{member}"
        if f".{extension.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES and (_unsafe(member) or not info.regular):
            items.append(Item(address, "", {}, "unsafe or non-regular tar member; not read"))
            continue
        if not _unsafe(member) and info.regular:
            samples.setdefault(key, {})[extension] = member
    for parts in samples.values():
        image = next((parts[e] for e in sorted(parts) if f".{e.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES), None)
        if image is None:
            continue
        address = f"{name}{TAR_SEPARATOR}{image}"
        try:
            caption = _read_text(tar, members[parts["txt"]]).strip() if "txt" in parts else None
            extra = _json_tags(_read_text(tar, members[parts["json"]])) if "json" in parts else {}
        except (OSError, UnicodeDecodeError, ValueError) as e:
            items.append(Item(address, "", {}, f"unreadable caption or metadata ({e})"))
            continue
        items.append(Item(address, caption, extra))
    return sorted(items, key=_by_address)


def _read_text(tar: Path, member: _Member) -> str:
    with open(tar, "rb") as f:
        return os.pread(f.fileno(), member.size, member.offset).decode("utf-8")


def _json_tags(text: str) -> dict[str, Any]:
    """A sample's json as tags: its text, number and boolean values (and lists of them); the rest left out."""
    import json

    data = json.loads(text)
    return {key: value for key, value in data.items() if _tag_value(key, value)} if isinstance(data, dict) else {}


def _tag_value(key: str, value: Any) -> bool:
    """Whether a source's field can be a record's tag: text, numbers, booleans or lists of them, not a reserved key."""
    from imageloop.tools.indexing.indexer import RESERVED_KEYS

    values = value if isinstance(value, list) else [value]
    return key not in RESERVED_KEYS and bool(values) and all(isinstance(v, str | int | float | bool) for v in values)


def tar_address(path: Path) -> tuple[Path, str] | None:
    """(tar file, member name) when `path` addresses a member (`shard.tar#key.jpg`), else None."""
    text = str(path)
    at = text.find(TAR_MEMBER)
    if at < 0:
        return None
    return Path(text[: at + len(".tar")]), text[at + len(TAR_MEMBER) :]


def open_tar_member(tar: Path, member: str) -> io.BufferedReader:
    """A tar member's bytes as a read-only, seekable file, or ImageDecodeError saying why it cannot be read."""
    where = f"{tar}{TAR_SEPARATOR}{member}"
    if _unsafe(member):
        raise ImageDecodeError(f"{where}: unsafe tar member name; not read")
    try:
        info = _members(tar).get(member)
    except (ImageloopError, OSError) as e:
        raise ImageDecodeError(f"{where}: cannot read ({e})") from e
    if info is None:
        raise ImageDecodeError(f"{where}: no such member in the tar")
    if not info.regular:
        raise ImageDecodeError(f"{where}: not a regular file in the tar; not read")
    try:
        fd = os.open(tar, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageDecodeError(f"{where}: cannot read ({e.strerror or e})") from e
    return io.BufferedReader(_MemberFile(fd, info.offset, info.size))


class _MemberFile(io.RawIOBase):
    """A window [offset, offset + size) of an open file, read with pread (so threads may share nothing)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd, self._offset, self._size, self._position = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Read up to len(buffer) bytes of the member from the current position."""
        wanted = min(len(buffer), self._size - self._position)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._offset + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move within the member (positions are the member's own)."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


# --- parquet -----------------------------------------------------------------------------------------


def _parquet_items(root: Path, name: str) -> list[Item]:
    """Each row's image (its path column, relative to the parquet's folder), caption and scalar columns as tags."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImageloopError(f"reading parquet needs pyarrow: pip install 'imageloop[parquet]' ({e})") from e
    try:
        table = pq.read_table(root / name)
    except Exception as e:  # pyarrow's own error types vary by version
        raise ImageloopError(f"{root / name}: not a readable parquet file ({e})") from e
    columns = table.column_names
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise ImageloopError(
            f"{root / name}: no column of image paths (one of {', '.join(PATH_COLUMNS)}); it has {', '.join(columns)}"
        )
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    items = []
    for row in table.to_pylist():
        given = row.get(path_column)
        if not isinstance(given, str) or not given:
            continue
        path = Path(given) if Path(given).is_absolute() else root / given
        caption = row.get(caption_column) if caption_column else None
        extra = {k: v for k, v in row.items() if k not in (path_column, caption_column) and _tag_value(k, v)}
        resolved = Path(os.path.normpath(path))
        if not resolved.is_relative_to(root) or not path.resolve().is_relative_to(root):
            items.append(Item(given, "", {}, f"{given}: outside {root}, the parquet's folder; not indexed"))
            continue
        text = caption.strip() if isinstance(caption, str) else None
        items.append(Item(resolved.relative_to(root).as_posix(), text, extra))
    return sorted(items, key=_by_address)
