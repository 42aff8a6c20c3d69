"""What the faces that serve HTTP (LangGraph Server's custom routes, the browser UI) serve beside their own pages:
the files they name for remote clients (`imageloop.app.links`), at `/imageloop/runs/<path under the runs folder>`
(an image, a run's `report.html` with the images it links to, `run.json`) and `/imageloop/roots/<i>/<path>` (an
image under the i-th root: an indexed image). What may be served is `Links.resolve`'s rule; each face puts the
route behind its own authentication.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from imageloop.app import App
from imageloop.app.links import HTTP_BASE, Links
from imageloop.errors import ImageloopError
from imageloop.tools.images import open_regular


def run_url(relative: str) -> str:
    """The address (from the server's root) of a run file named by its path under the runs folder."""
    return f"{HTTP_BASE}runs/{relative}"


def _member_bytes(path: Path) -> bytes:
    with open_regular(path) as member:
        return member.read()


def served_files(app: Callable[[], App]) -> Route:
    """`GET /imageloop/<name>`: one file `app()` names for remote clients, or 404 with the one-line reason."""

    async def serve(request: Request) -> Response:
        links = Links(app(), HTTP_BASE)
        try:
            path, media_type = await anyio.to_thread.run_sync(links.resolve, request.path_params["name"])
            if not path.is_file():  # an image inside an indexed shard (`shard.tar#key.jpg`): its bytes, read in place
                return Response(await anyio.to_thread.run_sync(_member_bytes, path), media_type=media_type)
        except ImageloopError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        return FileResponse(path, media_type=media_type)

    return Route(HTTP_BASE + "{name:path}", serve, methods=["GET"])
