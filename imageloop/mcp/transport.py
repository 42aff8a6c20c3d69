"""How the MCP server is reached: stdio (desktop clients) or streamable HTTP, with its safety checks.

HTTP binds to localhost unless told otherwise and checks Host and Origin headers (the SDK's
DNS-rebinding protection): a browser page may call the server only from the server's own origin or
one named with --allow-origin (a page on another localhost port is another site); requests without
an Origin header (every non-browser client) pass. Any address beyond localhost needs a bearer token.
SIGTERM and Ctrl-C stop uvicorn gracefully and, at the same moment, ask running jobs to stop at their
next step. Over stdio nothing but the protocol may reach stdout, so the protocol gets a private copy
of it and stray output goes to stderr.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, BinaryIO

import anyio
from mcp.server.fastmcp import FastMCP
from mcp.server.transport_security import TransportSecuritySettings

from imageloop.access import TokenGate, is_loopback
from imageloop.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SCHEMES = ("http", "https")
# How long a stopping server lets open requests (a call waiting on a run, an idle event stream) finish
# before it cancels them: service managers send SIGKILL some seconds after SIGTERM (Docker: 10 s).
GRACEFUL_SHUTDOWN_S = 3
_ORIGIN = re.compile(r"https?://[^/\s?#]+", re.ASCII)


def parse_http(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) for --http; a bare `PORT` or `:PORT` binds 127.0.0.1."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT such as 127.0.0.1:8765")
    return host, int(port)


def _host_pattern(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def transport_security(
    host: str, port: int, allow_hosts: Sequence[str] = (), allow_origins: Sequence[str] = ()
) -> TransportSecuritySettings:
    """Host/Origin checks (the SDK's DNS-rebinding protection) for a server bound at `host`:`port`.

    Hosts: loopback names, the bound host and `allow_hosts`. Origins: the server's own (those names at
    `port`) and `allow_origins` (`scheme://host[:port]`), nothing else.
    """
    names = list(LOOPBACK_HOSTS)
    if not is_loopback(host):
        if host in ("0.0.0.0", "::"):
            names.append(socket.gethostname())
        else:
            names.append(_host_pattern(host))
    names += [_host_pattern(name) for name in allow_hosts]
    names = list(dict.fromkeys(names))
    origins = [f"{scheme}://{name}:{port}" for name in names for scheme in SCHEMES]
    # Browsers leave a scheme's default port out of the Origin header.
    origins += [
        f"{scheme}://{name}" for name in names for scheme, default in (("http", 80), ("https", 443)) if port == default
    ]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*names, *(f"{name}:*" for name in names)],
        allowed_origins=list(dict.fromkeys([*origins, *map(check_origin, allow_origins)])),
    )


def check_origin(text: str) -> str:
    """An --allow-origin value as browsers send it (`scheme://host[:port]`, no path), or a ConfigError."""
    origin = text.strip().rstrip("/")
    if not _ORIGIN.fullmatch(origin):
        raise ConfigError(f"--allow-origin {text!r}: expected an origin such as https://app.example.com:8443")
    return origin


class _ProtocolStdout:
    """`sys.stdout` while serving stdio: the SDK's transport takes `.buffer` (the protocol's private copy of
    fd 1); anything printed goes to stderr instead of corrupting the JSON-RPC stream."""

    def __init__(self, protocol: BinaryIO) -> None:
        self.buffer = protocol

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def protect_stdout() -> None:
    """Give the protocol a private handle on the real stdout; fd 1 then points at stderr, so a stray
    print from any library (or C code) lands in the log instead of corrupting the protocol stream."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = _ProtocolStdout(protocol)


class QuietDisconnects(logging.Filter):
    """Drops the SDK's error log (a 40-line traceback) for a client that closed its stream: a normal end."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream))


def quiet_disconnects() -> None:
    """Install `QuietDisconnects` on the SDK's streamable-HTTP logger (once)."""
    sdk = logging.getLogger("mcp.server.streamable_http")
    if not any(isinstance(f, QuietDisconnects) for f in sdk.filters):
        sdk.addFilter(QuietDisconnects())


async def serve_http(server: FastMCP[Any], sock: socket.socket, token: str | None, on_stop: Callable[[], None]) -> None:
    """Serve streamable HTTP on the bound `sock` at /mcp until SIGTERM or Ctrl-C; `on_stop` runs as either arrives."""
    import uvicorn

    quiet_disconnects()

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn owns SIGTERM and SIGINT while it serves (and raises them again once it has
            # stopped): stopping the runs here lets calls waiting on them return within the grace period.
            on_stop()
            super().handle_exit(sig, frame)

    app: Any = server.streamable_http_app()
    if token:
        app = TokenGate(app, token)
    host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    print(f"imageloop mcp: serving http://{_host_pattern(host)}:{bound_port}/mcp", file=sys.stderr, flush=True)
    await StoppingServer(config).serve(sockets=[sock])
