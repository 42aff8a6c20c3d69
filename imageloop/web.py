"""What the faces that serve HTTP (LangGraph Server's custom routes, the browser UI) serve beside their own pages:
the files runs wrote, at `/imageloop/runs/<path under the runs folder>` (an image, a run's `report.html` with the
images it links to, `run.json`). The one rule of what may be served is `App.run_file`; each face puts the route
behind its own authentication.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from imageloop.app import App
from imageloop.errors import ImageloopError

RUNS_ROUTE = "/imageloop/runs"


def run_url(relative: str) -> str:
    """The address (from the server's root) of a run file named by its path under the runs folder."""
    return f"{RUNS_ROUTE}/{relative}"


def run_files(app: Callable[[], App]) -> Route:
    """`GET /imageloop/runs/<path>`: one file a run of `app()` wrote, or 404 with the one-line reason."""

    async def run_output(request: Request) -> Response:
        try:
            path, media_type = await anyio.to_thread.run_sync(app().run_file, request.path_params["path"])
        except ImageloopError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        return FileResponse(path, media_type=media_type)

    return Route(RUNS_ROUTE + "/{path:path}", run_output, methods=["GET"])
