"""The application layer every face calls: `App` (settings, backends, roots, indexes, runs, sessions)."""

from imageloop.app.core import App, parse_where

__all__ = ["App", "parse_where"]
