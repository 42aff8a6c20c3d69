"""Routes LangGraph Server serves beside the graphs (`langgraph.json` → `http.app`): the files a run hands its remote
clients, by the addresses its answers and questions give them (`imageloop.app.links`).

A server run's interrupts and output name every image by such an address, never by a path on the server:
`/imageloop/runs/<path under the runs folder>` (drawings, `final.png`, a record's `report.html`) and
`/imageloop/roots/<i>/<path>` (an indexed image under the i-th of `IMAGELOOP_ROOTS`), relative to the server's
own address. Only those files are served (`Links.resolve`); the server's authentication covers these routes
when `http.enable_custom_route_auth` is set.
"""

from __future__ import annotations

from starlette.applications import Starlette

from imageloop.app.deployment import deployed_app
from imageloop.web import served_files

app = Starlette(routes=[served_files(deployed_app)])
