"""Where the application may read and write: root confinement for agent-facing faces, default folders.

A person at a terminal (the CLI) may name any path their account can read. A face that takes paths
from a model or a remote client (MCP, LangChain tools, LangGraph Server, the browser UI) is confined
to its roots: a path is resolved (symlinks included) before it is checked, `..` is refused outright,
and nothing outside the roots is even probed for existence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from imageloop.errors import ConfigError, ImageloopError, StorageError
from imageloop.files import os_error_message
from imageloop.limits import PATH_CHARS

Kind = Literal["file", "dir", "out"]


class PathNotAllowedError(ImageloopError):
    """A path argument outside the roots, or written with `..`."""


def default_sessions_db() -> Path:
    """`IMAGELOOP_SESSIONS`, else `$XDG_STATE_HOME/imageloop/sessions.sqlite` (default `~/.local/state/...`).

    One database for every face, so a search started in one face continues in another.
    """
    if os.environ.get("IMAGELOOP_SESSIONS"):
        return Path(os.environ["IMAGELOOP_SESSIONS"]).expanduser()
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "imageloop" / "sessions.sqlite"


class Roots:
    """The folders path arguments may reach; relative paths are taken from the first one."""

    def __init__(self, folders: Sequence[Path]) -> None:
        resolved: list[Path] = []
        for folder in folders:
            try:
                path = Path(folder).expanduser().resolve(strict=True)
            except (OSError, RuntimeError):
                raise ConfigError(f"root {folder}: no such folder") from None
            if not path.is_dir():
                raise ConfigError(f"root {folder}: not a folder")
            resolved.append(path)
        if not resolved:
            raise ConfigError("at least one root folder is needed")
        self.folders: tuple[Path, ...] = tuple(dict.fromkeys(resolved))

    def contains(self, path: Path) -> bool:
        """Whether an already resolved path lies inside a root."""
        return any(path.is_relative_to(root) for root in self.folders)

    def describe(self) -> str:
        """The roots, for messages."""
        return ", ".join(str(root) for root in self.folders)


def resolve_path(
    text: str | Path, what: str, roots: Roots | None, *, extra: Sequence[Path] = (), kind: Kind | None = None
) -> Path:
    """The resolved path `text` names; confined to `roots` (plus `extra` folders) when there are roots.

    "file" and "dir" must exist as such; "out" (an output folder) may not exist yet but is no file;
    without a kind, anything goes. Relative paths are taken from the first root (confined) or the
    working directory.
    """
    given = str(text)
    if not given.strip():
        raise PathNotAllowedError(f"{what}: the path is empty")
    if "\x00" in given or len(given) > PATH_CHARS:
        raise PathNotAllowedError(f"{what}: not a usable path (NUL character, or over {PATH_CHARS} characters)")
    path = Path(given).expanduser()
    if roots is not None:
        if ".." in path.parts:
            raise PathNotAllowedError(f"{what} {given!r}: '..' is not allowed in paths")
        path = path if path.is_absolute() else roots.folders[0] / path
    try:
        # Symlinks are resolved first, so a link inside a root that points outside is refused; the
        # check comes before any existence test, so nothing outside the roots can be probed.
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:
        raise PathNotAllowedError(f"{what} {given!r}: cannot resolve ({e})") from None
    if roots is not None and not (roots.contains(resolved) or any(resolved.is_relative_to(f) for f in extra)):
        raise PathNotAllowedError(f"{what} {given!r} is outside the folders this service may use ({roots.describe()})")
    if kind in ("file", "dir") and not resolved.exists():
        raise ImageloopError(f"{what} {given!r}: no such file or folder")
    if kind == "dir" and not resolved.is_dir():
        raise ImageloopError(f"{what} {given!r} is not a folder")
    if kind == "file" and not resolved.is_file():
        raise ImageloopError(f"{what} {given!r} is not a file")
    if kind == "out" and resolved.exists() and not resolved.is_dir():
        raise ImageloopError(f"{what} {given!r} is a file, not a folder")
    return resolved


def make_out_dir(folder: Path, what: str) -> Path:
    """Create the output folder `folder` (parents too), or say in one line why it cannot be: a file
    in the way (at it or above it), a read-only disk, a full one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ImageloopError(f"{what} {folder} is a file, not a folder: choose another path") from None
    except OSError as e:
        raise StorageError(os_error_message(e, f"creating the {what} {folder}")) from None
    return folder
