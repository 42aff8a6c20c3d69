"""imageloop as an MCP server: the application layer's operations as tools an agent can call.

Parts: `server` (the tools: arguments, calls into `imageloop.app.App`, rendering; images under a
result's size cap by `imageloop.thumbnails`, shared with the LangChain tools), `transport` (stdio and
streamable HTTP with their checks). `serve` runs it until stdin closes (stdio) or the process is
stopped (HTTP: Ctrl-C or SIGTERM), then lets running jobs finish briefly, cancels the rest at a step
boundary (their records stay whole) and closes every index.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

import anyio
from mcp.server.transport_security import TransportSecuritySettings

from imageloop.access import MIN_TOKEN_CHARS, is_loopback
from imageloop.app import App
from imageloop.errors import ConfigError
from imageloop.mcp.server import build_server
from imageloop.mcp.transport import parse_http, protect_stdout, serve_http, transport_security

__all__ = ["build_server", "serve"]


def serve(app: App, *, http: str | None = None, token: str | None = None, allow_hosts: Sequence[str] = ()) -> None:
    """Serve `app`'s tools over stdio, or streamable HTTP at `http` (HOST:PORT), until stopped."""
    security: TransportSecuritySettings | None = None
    address: tuple[str, int] | None = None
    if http is not None:
        address = parse_http(http)
        if not is_loopback(address[0]) and not token:
            raise ConfigError(
                f"--http {http} is reachable from other machines: "
                "set a bearer token with --token or IMAGELOOP_MCP_TOKEN"
            )
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"the bearer token is too short: use at least {MIN_TOKEN_CHARS} characters")
        security = transport_security(address[0], allow_hosts)
    server = build_server(app, security)

    def terminate(signum: int, frame: FrameType | None) -> None:
        # systemd, Docker, Kubernetes and stdio clients stop a server with SIGTERM: stop the runs at their
        # next step (records stay whole), then unwind like Ctrl-C so the cleanup below runs.
        app.jobs.cancel_all()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        if address is None:
            protect_stdout()
            anyio.run(server.run_stdio_async)
        else:
            anyio.run(serve_http, server, address[0], address[1], token)
    except KeyboardInterrupt:
        pass
    finally:
        # A stdio client allows ~2 s between closing stdin and SIGTERM: runs get one second to finish.
        app.close(grace_s=1.0)
