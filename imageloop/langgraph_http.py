"""Routes LangGraph Server serves beside the graphs (`langgraph.json` → `http.app`): run outputs for remote clients.

A graph's answer names its images by artifact id and its record by folder, all on the server's disk; a
client on another machine fetches them here: `GET /imageloop/runs/<path under the runs folder>`, e.g.
`/imageloop/runs/server/artifacts/<final_image>.png` or `/imageloop/runs/server/<run id>/report.html`.
Only run outputs (images, run.json, report.html) under the runs folder are served (`App.run_file`); the
server's authentication covers these routes when `http.enable_custom_route_auth` is set.
"""

from __future__ import annotations

from starlette.applications import Starlette

from imageloop.app.deployment import deployed_app
from imageloop.web import run_files

app = Starlette(routes=[run_files(deployed_app)])
