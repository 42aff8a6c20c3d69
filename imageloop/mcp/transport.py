"""How the MCP server is reached: stdio (desktop clients) or streamable HTTP, with its safety checks.

HTTP binds to localhost unless told otherwise and checks Host and Origin headers (the SDK's
DNS-rebinding protection); any other address needs a bearer token. Over stdio nothing but the protocol
may reach stdout, so the protocol gets a private copy of it and stray output goes to stderr.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

import anyio
from mcp.server.fastmcp import FastMCP
from mcp.server.transport_security import TransportSecuritySettings

from imageloop.access import TokenGate, is_loopback
from imageloop.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SCHEMES = ("http", "https")


def parse_http(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) for --http; a bare `PORT` or `:PORT` binds 127.0.0.1."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT such as 127.0.0.1:8765")
    return host, int(port)


def _host_pattern(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def transport_security(host: str, allow_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """Host/Origin checks (the SDK's DNS-rebinding protection): loopback names, the bound host, and extras."""
    names = list(LOOPBACK_HOSTS)
    if not is_loopback(host):
        if host in ("0.0.0.0", "::"):
            names.append(socket.gethostname())
        else:
            names.append(_host_pattern(host))
    names += [_host_pattern(name) for name in allow_hosts]
    names = list(dict.fromkeys(names))
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*names, *(f"{name}:*" for name in names)],
        allowed_origins=[f"{scheme}://{name}{port}" for name in names for scheme in SCHEMES for port in ("", ":*")],
    )


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


async def serve_http(server: FastMCP[Any], host: str, port: int, token: str | None) -> None:
    """Serve streamable HTTP at HOST:PORT/mcp until interrupted (the socket is bound before it is announced)."""
    import uvicorn

    quiet_disconnects()

    app: Any = server.streamable_http_app()
    if token:
        app = TokenGate(app, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--http {host}:{port}: cannot listen there ({e.strerror}); choose another port") from None
    sock.listen(2048)  # before the address is announced: early clients wait in the backlog, not refused
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"imageloop mcp: serving http://{_host_pattern(host)}:{bound_port}/mcp", file=sys.stderr, flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])
