"""imageloop as an MCP server: the application layer's operations as tools an agent can call.

Parts: `server` (the tools: arguments, calls into `imageloop.app.App`, rendering; images under a
result's size cap by `imageloop.thumbnails`, shared with the LangChain tools), `transport` (stdio and
streamable HTTP with their checks). `serve` runs it until stdin closes (stdio) or the process is
stopped (HTTP: Ctrl-C or SIGTERM), then lets running jobs finish briefly, cancels the rest at a step
boundary (their records stay whole) and closes every index.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

import anyio
from mcp.server.transport_security import TransportSecuritySettings

from imageloop.access import MIN_TOKEN_CHARS, is_loopback, listen
from imageloop.app import App
from imageloop.errors import ConfigError
from imageloop.mcp.server import build_server
from imageloop.mcp.transport import check_origin, parse_http, protect_stdout, serve_http, transport_security
from imageloop.runtime import limit_malloc_arenas

__all__ = ["build_server", "serve"]


def serve(
    app: App,
    *,
    http: str | None = None,
    token: str | None = None,
    allow_hosts: Sequence[str] = (),
    allow_origins: Sequence[str] = (),
) -> None:
    """Serve `app`'s tools over stdio, or streamable HTTP at `http` (HOST:PORT), until stopped.

    Browser pages may call the HTTP server from its own origin and from `allow_origins`.
    """
    limit_malloc_arenas()  # before any thread: a server's memory stays flat over hours
    security: TransportSecuritySettings | None = None
    sock: socket.socket | None = None
    if http is not None:
        host, port = parse_http(http)
        if not is_loopback(host) and not token:
            raise ConfigError(
                f"--http {http} is reachable from other machines: "
                "set a bearer token with --token or IMAGELOOP_MCP_TOKEN"
            )
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"the bearer token is too short: use at least {MIN_TOKEN_CHARS} characters")
        origins = [check_origin(origin) for origin in allow_origins]  # refused before the port is taken
        sock = listen(host, port, f"--http {http}")
        security = transport_security(host, sock.getsockname()[1], allow_hosts, origins)
    server = build_server(app, security, remote=http is not None)

    def terminate(signum: int, frame: FrameType | None) -> None:
        # systemd, Docker, Kubernetes and stdio clients stop a server with SIGTERM: stop the runs at their
        # next step (records stay whole), then unwind like Ctrl-C so the cleanup below runs. Over HTTP,
        # uvicorn holds the signal while it serves, calls `app.jobs.cancel_all` itself, and raises the
        # signal again once it has shut down, which lands here.
        app.jobs.cancel_all()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        if sock is None:
            protect_stdout()
            anyio.run(server.run_stdio_async)
        else:
            anyio.run(serve_http, server, sock, token, app.jobs.cancel_all)
    except KeyboardInterrupt:
        pass
    finally:
        if sock is not None:
            sock.close()
        # A stdio client allows ~2 s between closing stdin and SIGTERM, Docker 10 s between SIGTERM and
        # SIGKILL: runs get one second to finish, one more to reach a step boundary; a run still inside a
        # step after that (a model call) is recorded as interrupted, and the process leaves without it.
        stuck = app.close(grace_s=1.0)
        if stuck:
            print(f"imageloop mcp: {stuck} run(s) stopped inside a step, recorded as interrupted", file=sys.stderr)
            sys.stderr.flush()
            os._exit(0)  # not waiting for their threads: each record already says where its run stopped
