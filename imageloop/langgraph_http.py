"""Routes LangGraph Server serves beside the graphs (`langgraph.json` → `http.app`): run outputs for remote clients.

A graph's answer names its images by artifact id and its record by folder, all on the server's disk; a
client on another machine fetches them here: `GET /imageloop/runs/<path under the runs folder>`, e.g.
`/imageloop/runs/server/artifacts/<final_image>.png` or `/imageloop/runs/server/<run id>/report.html`.
Only run outputs (images, run.json, report.html) under the runs folder are served (`App.run_file`); the
server's authentication covers these routes when `http.enable_custom_route_auth` is set.
"""

from __future__ import annotations

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from imageloop.app.deployment import deployed_app
from imageloop.errors import ImageloopError

RUNS_ROUTE = "/imageloop/runs"


async def run_output(request: Request) -> Response:
    """One file a run wrote, or 404 with the one-line reason."""
    try:
        path, media_type = await anyio.to_thread.run_sync(deployed_app().run_file, request.path_params["path"])
    except ImageloopError as e:
        return JSONResponse({"error": str(e)}, status_code=404)
    return FileResponse(path, media_type=media_type)


app = Starlette(routes=[Route(RUNS_ROUTE + "/{path:path}", run_output, methods=["GET"])])
