"""Who may open the UI: anyone on this machine when it listens on loopback; elsewhere only with the token,
which a browser presents once in the printed link and then keeps as a cookie."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from imageloop.access import COOKIE, TokenGate, is_loopback
from imageloop.cli import main
from imageloop.errors import ConfigError
from tests.fake_openai_server import FakeOpenAIServer
from tests.test_ui_browser import MODELS, indexed_photos, openai_env, serving

__all__ = ["openai_env"]  # a fixture shared with the browser test

TOKEN = "a-long-enough-token-0123456789"


async def page(request: Any) -> PlainTextResponse:
    return PlainTextResponse("the page")


async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def gated(browser: bool = True) -> TestClient:
    app = Starlette(routes=[Route("/", page), WebSocketRoute("/stream", stream)])
    return TestClient(TokenGate(app, TOKEN, browser=browser), base_url="http://testserver", follow_redirects=False)


def test_without_the_token_nothing_is_served() -> None:
    client = gated()
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/?token=wrong").status_code == 401
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/stream"):
        pass
    assert closed.value.code == 1008


def test_the_link_sets_a_cookie_and_drops_the_token_from_the_address() -> None:
    client = gated()
    entered = client.get(f"/?token={TOKEN}&tab=search")
    assert entered.status_code == 303 and entered.headers["location"] == "/?tab=search"
    cookie = entered.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/").text == "the page"  # the client now sends the cookie
    with client.websocket_connect("/stream") as socket:
        assert socket.receive_text() == "hello"


def test_a_browser_without_the_token_gets_a_page_saying_how_to_open_the_ui_not_json() -> None:
    answer = gated().get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert answer.status_code == 401 and answer.headers["content-type"].startswith("text/html")
    assert "needs its access token" in answer.text and "?token=" in answer.text
    assert gated().get("/", headers={"Accept": "application/json"}).json() == {"error": "missing or wrong token"}


def test_api_clients_send_a_bearer_token_and_only_browsers_get_cookies() -> None:
    client = gated(browser=False)
    assert client.get("/", headers={"Authorization": f"bearer {TOKEN}"}).text == "the page"
    assert client.get(f"/?token={TOKEN}").status_code == 401
    assert client.get("/", headers={"Cookie": f"{COOKIE}={TOKEN}"}).status_code == 401


@pytest.mark.parametrize(("host", "local"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                             ("[::1]", True), ("0.0.0.0", False), ("192.168.1.5", False)])  # fmt: skip
def test_only_loopback_addresses_count_as_this_machine(host: str, local: bool) -> None:
    assert is_loopback(host) is local


def test_the_ui_token_is_required_beyond_loopback_and_made_up_when_not_given() -> None:
    from imageloop.ui.server import access_token

    assert access_token("127.0.0.1", None) is None
    made = access_token("0.0.0.0", None)
    assert made is not None and len(made) >= 16 and made != access_token("0.0.0.0", None)
    assert access_token("0.0.0.0", TOKEN) == TOKEN
    with pytest.raises(ConfigError, match="too short"):
        access_token("0.0.0.0", "short")


@pytest.fixture
def served_beyond_loopback(openai_env: FakeOpenAIServer, tmp_path: Path) -> Iterator[str]:
    with serving(indexed_photos(tmp_path / "photos"), tmp_path, "--host", "0.0.0.0") as link:
        yield link


def test_bound_beyond_loopback_the_printed_link_carries_the_only_way_in(served_beyond_loopback: str) -> None:
    match = re.fullmatch(r"http://0\.0\.0\.0:(\d+)/\?token=(\S{16,})", served_beyond_loopback)
    assert match, served_beyond_loopback
    base = f"http://127.0.0.1:{match.group(1)}"
    assert httpx.get(f"{base}/").status_code == 401
    assert httpx.get(f"{base}/_stcore/health").status_code == 401
    with httpx.Client(base_url=base, follow_redirects=True) as browser:
        assert browser.get(f"/?token={match.group(2)}").status_code == 200
        assert browser.get("/_stcore/health").text == "ok"


def test_a_taken_port_is_a_one_line_error_naming_the_options(
    openai_env: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = indexed_photos(tmp_path / "photos")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["ui", "--index", str(photos), "--port", str(port), *MODELS])
    message = f"imageloop: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)"
    assert code == 2 and message in capsys.readouterr().err
