"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.fake_openai_server import FakeOpenAIServer


@pytest.fixture(autouse=True, scope="session")
def isolated_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """GenIR sessions (shared by every face) go to a temporary database, never the developer's own."""
    previous = os.environ.get("IMAGELOOP_SESSIONS")
    os.environ["IMAGELOOP_SESSIONS"] = str(tmp_path_factory.mktemp("state") / "sessions.sqlite")
    yield
    if previous is None:
        del os.environ["IMAGELOOP_SESSIONS"]
    else:
        os.environ["IMAGELOOP_SESSIONS"] = previous


@pytest.fixture
def openai_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    """A fake OpenAI API on 127.0.0.1; the developer's own OPENAI_* settings cannot leak into the test."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ADMIN_KEY", "OPENAI_CUSTOM_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    with FakeOpenAIServer() as server:
        yield server
