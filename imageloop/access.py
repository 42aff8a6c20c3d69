"""Who may reach a served face (MCP over HTTP, the browser UI): this machine freely, anyone else with a token;
and the socket it listens on (`listen`).

`TokenGate` is an ASGI middleware comparing the token in constant time. API clients send it as
`Authorization: Bearer <token>`; a browser (`browser=True`) opens the printed link `?token=<token>` once,
is redirected to the same page without it and keeps an HttpOnly, same-site cookie, so the token never
stays in the address bar or the history, and every later request (pages, images, the websocket) carries it.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from imageloop.errors import ConfigError

MIN_TOKEN_CHARS = 16
COOKIE = "imageloop_token"
TOKEN_JSON = b'{"error": "missing or wrong token"}'
TOKEN_PAGE = b"""<!doctype html><meta charset="utf-8"><title>imageloop: access token needed</title>
<style>body{font-family:sans-serif;margin:3em;max-width:40em;line-height:1.5}</style>
<h1>This page needs its access token</h1>
<p>This imageloop server is reachable from other machines, so it opens only with its token. Open the link
that <code>imageloop ui</code> printed when it started (it ends in <code>?token=...</code>); your browser
then keeps the token for this site. Lost the link? The token is the one given with <code>--token</code> or
<code>IMAGELOOP_UI_TOKEN</code>: add <code>?token=TOKEN</code> to this address.</p>
"""
"""What a browser that asks for a page (Accept: text/html) gets without the token; API clients get JSON."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int, option: str) -> socket.socket:
    """A listening socket at HOST:PORT (port 0: any free one), or a one-line ConfigError naming `option`.

    Bound before the server is built and before its address is printed, so the printed port is the real
    one and an early client waits in the backlog instead of being refused.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{option}: cannot listen there ({e.strerror}); choose another port") from None
    return sock


class TokenGate:
    """Refuses requests without the token (HTTP 401, websocket close 1008)."""

    def __init__(self, app: Any, token: str, *, browser: bool = False) -> None:
        self.app = app
        self.expected = token.encode()
        self.browser = browser

    def _matches(self, given: bytes) -> bool:
        return bool(given) and hmac.compare_digest(given, self.expected)

    def _presented(self, scope: dict[str, Any]) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
        # The scheme is case-insensitive (RFC 7235).
        if scheme.lower() == b"bearer" and self._matches(credentials.strip()):
            return True
        if self.browser:
            cookies = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
            if COOKIE in cookies and self._matches(cookies[COOKIE].value.encode()):
                return True
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self._presented(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        token = next((value for key, value in query if key == "token"), "")
        if self.browser and self._matches(token.encode()):
            await self._enter(scope, query, token, send)
            return
        headers = dict(scope.get("headers") or [])
        page = self.browser and b"text/html" in headers.get(b"accept", b"")
        body, media_type = (TOKEN_PAGE, b"text/html; charset=utf-8") if page else (TOKEN_JSON, b"application/json")
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", media_type),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="imageloop"'),
            ],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def _enter(self, scope: dict[str, Any], query: list[tuple[str, str]], token: str, send: Any) -> None:
        """A browser opened the link with the token: set the cookie and show the page without the token."""
        rest = urlencode([(key, value) for key, value in query if key != "token"])
        location = quote(scope.get("root_path", "") + scope["path"]) + (f"?{rest}" if rest else "")
        cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
        await send({
            "type": "http.response.start",
            "status": 303,
            "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode()), (b"content-length", b"0")],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": b""})
