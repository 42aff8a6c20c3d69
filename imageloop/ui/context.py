"""What the page runs on: the process's `App` and the index it serves, set once by `serve` (or a test)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imageloop.app import App
from imageloop.errors import ConfigError


@dataclass(frozen=True)
class UIContext:
    """The application behind every browser session, and the index folder the tabs use."""

    app: App
    index: Path


_current: UIContext | None = None


def set_context(context: UIContext | None) -> None:
    """Serve `context` to every page run from now on (None: none)."""
    global _current
    _current = context


def current() -> UIContext:
    """The context the page runs on; an error naming the command when the page is run any other way."""
    if _current is None:
        raise ConfigError("the UI page runs under `imageloop ui --index DIR`, which sets up its application")
    return _current
