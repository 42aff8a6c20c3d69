"""Serving the UI: Streamlit's ASGI app under uvicorn, on this machine unless told otherwise.

Bound to a loopback address, anyone on this machine may open it, as with any local notebook server;
bound elsewhere, every request needs the access token (`--token`, `IMAGELOOP_UI_TOKEN`, else a random
one), which the printed link carries once (see `imageloop.access.TokenGate`). The socket is bound before
the link is printed, so `--port 0` works and the printed port is the real one.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

from imageloop.access import MIN_TOKEN_CHARS, TokenGate, is_loopback, listen
from imageloop.app import App
from imageloop.errors import ConfigError
from imageloop.runtime import limit_malloc_arenas
from imageloop.ui.context import UIContext, current, set_context

PAGE = Path(__file__).with_name("page.py")
# Streamlit's options for an embedded, offline server: no usage statistics, no file watching or
# reloading, no "Deploy" menu, uploads bounded. Its top bar goes too: the page's work runs in the background
# with its own Stop button, and Streamlit's "Running… Stop" would stop only the page polling it, leaving the
# run going and its progress frozen.
STREAMLIT_OPTIONS: dict[str, Any] = {
    "ui.hideTopBar": True,
    "browser.gatherUsageStats": False,
    "server.headless": True,
    "server.fileWatcherType": "none",
    "server.runOnSave": False,
    "global.developmentMode": False,
    "client.toolbarMode": "viewer",
    "server.maxUploadSize": 20,
    "theme.base": "light",
}
MAX_MESSAGE_BYTES = 200 * 2**20


def access_token(host: str, token: str | None) -> str | None:
    """The token a server bound to `host` requires: none on loopback unless given, else the given or a new one."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the UI token is too short: use at least {MIN_TOKEN_CHARS} characters")
    if token is None and not is_loopback(host):
        return secrets.token_urlsafe(24)
    return token


def streamlit_app(token: str | None) -> Any:
    """Streamlit's ASGI app for the page and the files runs wrote (reports, images to download), behind the
    token gate when there is a token."""
    import streamlit as st
    from starlette.middleware import Middleware
    from streamlit.web import bootstrap

    from imageloop.web import served_files

    bootstrap.load_config_options(STREAMLIT_OPTIONS)
    middleware = [Middleware(TokenGate, token=token, browser=True)] if token else []
    return st.App(str(PAGE), routes=[served_files(lambda: current().app)], middleware=middleware)


def serve(app: App, *, index: str | Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None) -> None:
    """Serve the UI over `app` and `index` until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    limit_malloc_arenas()  # before any thread: a server's memory stays flat over hours
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected 0..65535 (0 picks a free port)")
    info = app.index_info(index)  # a missing or empty index fails here, with its own message
    token = access_token(host, token)
    set_context(UIContext(app=app, index=Path(info["root"])))
    sock = listen(host, port, f"--host {host} --port {port}")
    asgi = streamlit_app(token)
    shown = f"[{host}]" if ":" in host else host
    link = f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    print(f"imageloop ui: {info['count']} images in {info['root']}; open {link}", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        asgi, log_level="warning", lifespan="on", access_log=False, use_colors=False, ws_max_size=MAX_MESSAGE_BYTES
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        set_context(None)
        sock.close()
