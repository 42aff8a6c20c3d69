"""Reading benchmark annotation files: JSON of any shape in, typed values or one-line errors out.

Every benchmark loader reads files a user downloaded. A wrong file, a truncated download or another
release's format must end in an ImageloopError that names the file and the entry, never in a
KeyError or TypeError from deep inside a loader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from imageloop.errors import ImageloopError


def read_json(path: Path, what: str) -> object:
    """Parse `path` as JSON, or raise ImageloopError saying which file and what it should hold."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImageloopError(f"{path} not found: expected {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImageloopError(f"{path}: cannot read {what} ({e})") from None
    try:
        return json.loads(text)
    # ValueError covers JSONDecodeError and integers beyond Python's digit limit; RecursionError
    # is what the decoder raises on nesting deeper than the interpreter's stack allows.
    except (ValueError, RecursionError) as e:
        raise ImageloopError(f"{path}: not valid JSON ({e}); expected {what}") from None


def as_list(value: object, where: str) -> list[object]:
    """`value` if it is a JSON array, else an error naming `where`."""
    if not isinstance(value, list):
        raise ImageloopError(f"{where}: expected a JSON list, found {_kind(value)}")
    return value


def as_dict(value: object, where: str) -> dict[str, object]:
    """`value` if it is a JSON object, else an error naming `where`."""
    if not isinstance(value, dict):
        raise ImageloopError(f"{where}: expected a JSON object, found {_kind(value)}")
    return value


def get_str(entry: dict[str, object], key: str, where: str) -> str:
    """The string at `entry[key]`, else an error naming `where` and the key."""
    value = entry.get(key)
    if not isinstance(value, str):
        raise ImageloopError(f"{where}: {key!r} should be a string, found {_kind(value)}")
    return value


def get_int(entry: dict[str, object], key: str, where: str) -> int:
    """The integer at `entry[key]` (JSON true/false are not integers), else an error."""
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ImageloopError(f"{where}: {key!r} should be an integer, found {_kind(value)}")
    return value


def get_str_list(entry: dict[str, object], key: str, where: str) -> list[str]:
    """The list of strings at `entry[key]`, else an error naming `where` and the key."""
    value = entry.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ImageloopError(f"{where}: {key!r} should be a list of strings, found {_kind(value)}")
    return [str(item) for item in value]


def inside(root: Path, relative: str, where: str) -> Path:
    """`root / relative`, refusing absolute paths and `..`: annotation files name files under `root`."""
    parts = PurePosixPath(relative.replace("\\", "/"))
    if not relative or parts.is_absolute() or ".." in parts.parts:
        raise ImageloopError(f"{where}: {relative!r} is not a path inside {root}")
    return root.joinpath(*parts.parts)


def require_files(files: Iterable[tuple[str, Path]], what: str) -> None:
    """Raise one ImageloopError naming the first missing image, where it was looked for, and how many more."""
    missing = [(name, path) for name, path in files if not path.is_file()]
    if missing:
        name, path = missing[0]
        raise missing_images(what, name, f"at {path}", len(missing))


def missing_images(what: str, name: str, looked: str, count: int) -> ImageloopError:
    """The error for `count` missing images: the first by name and where it was looked for, then how many more."""
    more = f" ({count - 1} more images are missing too)" if count > 1 else ""
    return ImageloopError(f"{what}: image {name!r} not found {looked}{more}")


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "an object"
    )
