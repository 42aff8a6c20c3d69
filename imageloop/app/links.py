"""How a remote client names the files a server face hands out: an address it can fetch, never a server path.

One rule for every remote face (MCP over HTTP, LangGraph Server): a file under the runs folder is
`<base>runs/<its path there>`; an image under the server's i-th root (an indexed image, a reference) is
`<base>roots/<i>/<its path there>`; anything else is not handed out at all. The base is the face's own:
`imageloop://` for MCP resources, `/imageloop/` for LangGraph Server's HTTP route (relative to the
server's address). Each face fetches what a name names with `Links.resolve`, which serves nothing but
those files (images, those inside an indexed WebDataset shard included, and a run's report and record).
Local faces (the CLI, LangChain tools in process, MCP over stdio) keep paths: they run on the machine the
paths name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from imageloop.errors import ImageloopError

if TYPE_CHECKING:
    from imageloop.app.core import App

HTTP_BASE = "/imageloop/"
"""Where an HTTP face (LangGraph Server's custom route, the browser UI) serves the files it names."""
MCP_BASE = "imageloop://"
"""How the MCP server names them: resources."""
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
NOT_SHARED = "(a file on the server, not shared)"
"""What stands in for a path outside the runs folder and the roots, which no remote client may fetch."""


class Links:
    """The names a face with base `base` gives its remote clients for files (see the module's rule)."""

    def __init__(self, app: App, base: str, *, one_segment: bool = False) -> None:
        """`one_segment`: a root's image is named by one path segment (its slashes quoted), as MCP resource templates
        match one segment per placeholder; over HTTP its path stays a path."""
        self.app = app
        self.base = base
        self.safe = "" if one_segment else "/"

    def name(self, path: str | Path) -> str | None:
        """`runs/<path>` or `roots/<i>/<path>` (URL-quoted), or None for a path elsewhere."""
        resolved = Path(path).resolve()
        runs = self.app.runs_dir.resolve()
        if resolved.is_relative_to(runs):
            return "runs/" + quote(resolved.relative_to(runs).as_posix())
        for number, root in enumerate(self.app.roots.folders if self.app.roots is not None else ()):
            if resolved.is_relative_to(root):
                return f"roots/{number}/" + quote(resolved.relative_to(root).as_posix(), safe=self.safe)
        return None

    def url(self, path: str | Path) -> str:
        """The address a remote client fetches `path` at, or `NOT_SHARED`."""
        named = self.name(path)
        return self.base + named if named is not None else NOT_SHARED

    def publish(self, value: Any) -> Any:
        """`value` (JSON-like: dicts, lists, strings) with every absolute path in it replaced by its address."""
        if isinstance(value, Mapping):
            return {key: self.publish(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.publish(item) for item in value]
        if isinstance(value, str) and self._is_path(value):
            return self.url(value)
        return value

    def _is_path(self, text: str) -> bool:
        """Whether `text` is an absolute path here (in the served folders, or existing), not words that merely
        start with a slash."""
        if not text.startswith("/") or "\n" in text or "\x00" in text or len(text) > 4096:
            return False
        return self.name(text) is not None or Path(text).exists()

    def publish_text(self, text: str) -> str:
        """A message with the runs folder and the roots named as a remote client names them."""
        folders = [(self.app.runs_dir.resolve(), "runs")]
        folders += [(root, f"roots/{n}") for n, root in enumerate(self.app.roots.folders if self.app.roots else ())]
        for folder, named in sorted(folders, key=lambda pair: len(str(pair[0])), reverse=True):
            text = text.replace(str(folder), self.base + named)
        return text

    def resolve(self, name: str) -> tuple[Path, str]:
        """The file a name (without the base, unquoted) stands for, and its media type: a run file, or an image
        under a root; anything else, or anything resolving out of its folder, is refused in one line."""
        kind, _, rest = name.partition("/")
        if kind == "runs":
            return self.app.run_file(rest)
        number, _, relative = rest.partition("/")
        roots = self.app.roots.folders if self.app.roots is not None else ()
        if kind == "roots" and number.isdigit() and int(number) < len(roots):
            root = roots[int(number)]
            path = (root / relative).resolve()
            media_type = IMAGE_TYPES.get(path.suffix.lower())
            if media_type is not None and path.is_relative_to(root) and (path.is_file() or _in_shard(path, root)):
                return path, media_type
        raise ImageloopError(f"no such image {name!r} under the server's folders")


def _in_shard(path: Path, root: Path) -> bool:
    """Whether `path` addresses an image inside a WebDataset shard under `root` (`shard.tar#key.jpg`, as an index
    of shards names its images), which `imageloop.tools.images.open_regular` reads in place."""
    from imageloop.tools.indexing.sources import tar_address

    address = tar_address(path)
    return address is not None and address[0].resolve().is_relative_to(root) and address[0].is_file()
