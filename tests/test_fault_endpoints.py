"""Fault injection at the model endpoint: a scripted OpenAI-compatible server that answers with an HTML
page, 500, 429 with Retry-After, a hang, a truncated image, extra keys or a refusal, driving the CLI and
the MCP server. Every failure is one line on the face and recorded in the run's `run.json`; a hung
endpoint fails after `--request-timeout` x (1 + `--max-retries`), not minutes later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imageloop import limits
from imageloop.app import App
from imageloop.cli import main
from imageloop.config import load_settings
from imageloop.mcp import build_server
from tests.fake_openai_server import (
    FakeOpenAIServer,
    chat_completion,
    html_page,
    hung,
    rate_limited,
    refusal,
    server_error,
    truncated_image,
    with_extra_keys,
)
from tests.fake_providers import captioned_folder
from tests.test_mcp_server import memory_client, text_of

CHAT, IMAGES, EMBEDDINGS = "/v1/chat/completions", "/v1/images/generations", "/v1/embeddings"
ALIGNED = {"aligned": True, "missing_concepts": []}
PROMPT = "a blue jay on a snowy branch"


@pytest.fixture
def endpoint(openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAIServer:
    """The openai profile pointed at the scripted server, as a user would with OPENAI_BASE_URL."""
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return openai_server


@pytest.fixture
def library(endpoint: FakeOpenAIServer, tmp_path: Path) -> Path:
    """A captioned folder, indexed through the endpoint."""
    folder = captioned_folder(tmp_path / "photos")
    assert main(["index", str(folder), "--profile", "openai"]) == 0
    return folder


def generate(
    library: Path, out: Path, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, str, dict[str, Any]]:
    """`imageloop generate` with the openai profile: exit code, stderr, and the run's record."""
    capsys.readouterr()
    code = main(["generate", PROMPT, "--index", str(library), "--out", str(out), "--profile", "openai", *options])
    err = capsys.readouterr().err
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    return code, err, record


def error_line(err: str) -> str:
    """The one error line the CLI printed (and nothing traceback-like around it)."""
    assert "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("imageloop: error:")]
    return line


def test_an_html_page_answering_the_critic_is_one_line_and_recorded_with_the_draft(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.push_fault(CHAT, html_page())

    code, err, record = generate(library, tmp_path / "run", capsys)

    assert code == 2
    assert "not an OpenAI API response" in error_line(err) and endpoint.base_url in error_line(err)
    assert record["stop_reason"] == "error" and "not an OpenAI API response" in record["error"]
    assert record["draft_image"] and Path(record["draft_image"]).is_file()  # what was paid for is kept


def test_a_500_is_retried_max_retries_times_then_reported(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.always(IMAGES, server_error())

    once = generate(library, tmp_path / "once", capsys, "--max-retries", "0")
    tries_once = len(endpoint.requests_to(IMAGES))
    thrice = generate(library, tmp_path / "thrice", capsys, "--max-retries", "2")

    assert tries_once == 1 and len(endpoint.requests_to(IMAGES)) == 1 + 3
    for code, err, record in (once, thrice):
        assert code == 2 and "HTTP 500: upstream model crashed" in error_line(err)
        assert record["stop_reason"] == "error" and "HTTP 500" in record["error"]


def test_a_429_waits_for_retry_after_and_the_run_goes_on(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.push_fault(CHAT, rate_limited(1))
    endpoint.push(CHAT, 200, chat_completion(json.dumps(ALIGNED)))
    started = time.monotonic()

    code, _, record = generate(library, tmp_path / "run", capsys)

    assert code == 0 and record["stop_reason"] == "aligned"
    assert len(endpoint.requests_to(CHAT)) == 2 and time.monotonic() - started >= 1.0


def test_a_hung_endpoint_fails_after_the_request_timeout_naming_it(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.always(IMAGES, hung())
    started = time.monotonic()

    code, err, record = generate(library, tmp_path / "run", capsys, "--request-timeout", "1", "--max-retries", "1")

    assert code == 2 and time.monotonic() - started < 15  # 2 tries of 1 s and a backoff, not 2 x 2 minutes
    assert "did not answer image generation with openai:gpt-image-1 within 1 s (2 tries)" in error_line(err)
    assert "--request-timeout" in error_line(err) and len(endpoint.requests_to(IMAGES)) == 2
    assert record["stop_reason"] == "error" and "did not answer" in record["error"]


def test_the_timeout_and_retries_come_from_the_environment_too(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("IMAGELOOP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("IMAGELOOP_MAX_RETRIES", "0")
    endpoint.always(CHAT, hung())

    code, err, _ = generate(library, tmp_path / "run", capsys)

    assert code == 2 and "within 1 s (1 tries)" in error_line(err) and len(endpoint.requests_to(CHAT)) == 1


def test_the_defaults_fail_a_hung_chat_or_embeddings_endpoint_well_under_a_minute() -> None:
    settings = load_settings("openai")
    for role in ("vlm", "embedder", "captioner"):
        endpoint = settings.endpoint(role)
        assert endpoint.timeout is not None and endpoint.max_retries is not None
        assert endpoint.timeout * (1 + endpoint.max_retries) <= 45
    # Image generation waits longer per try: gpt-image-1 itself may take two minutes to answer.
    assert settings.endpoint("generator").timeout == limits.GENERATION_TIMEOUT_S


@pytest.mark.parametrize("value", ["0", "601", "-1"])
def test_a_request_timeout_past_its_bound_is_refused_naming_the_bound(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["query", str(tmp_path), "a jay", "--profile", "openai", "--request-timeout", value])
    assert code == 2 and f"request_timeout {value} is out of range: 1..600" in error_line(capsys.readouterr().err)


def test_a_truncated_image_is_one_line_and_recorded(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.push_fault(IMAGES, truncated_image())

    code, err, record = generate(library, tmp_path / "run", capsys)

    assert code == 2 and "returned undecodable image data" in error_line(err)
    assert record["stop_reason"] == "error" and "undecodable image data" in record["error"]


def test_a_truncated_image_is_blamed_on_the_image_not_on_a_web_page_or_a_proxy(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.push_fault(IMAGES, truncated_image())

    _, err, _ = generate(library, tmp_path / "run", capsys)

    assert "web page or a proxy" not in error_line(err) and "not an OpenAI API response" not in error_line(err)


def test_an_answer_with_extra_keys_is_used_without_a_repair(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.push_fault(CHAT, with_extra_keys(ALIGNED))

    code, _, record = generate(library, tmp_path / "run", capsys)

    assert code == 0 and record["stop_reason"] == "aligned" and len(endpoint.requests_to(CHAT)) == 1


def test_a_refusing_critic_is_recorded_and_the_run_retrieves_with_the_raw_prompt(
    library: Path, endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint.push_fault(CHAT, refusal("I can't help with that."))

    code, _, record = generate(library, tmp_path / "run", capsys)

    assert code == 0 and record["error"] is None
    [first_critique, *_] = [step for step in record["steps"] if step["node"] == "critic"]
    assert "refused to answer: I can't help with that." in first_critique["detail"]["error"]
    assert "retrieve with the raw prompt" in first_critique["decision"]


def test_an_embeddings_reply_missing_a_row_fails_indexing_in_one_line(
    endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    one_row = {"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0, "embedding": [1.0] * 1536}]}
    endpoint.push(EMBEDDINGS, 200, one_row)

    code = main(["index", str(folder), "--profile", "openai"])

    assert code == 2 and "returned 1 embeddings for 3 texts" in error_line(capsys.readouterr().err)


def test_an_html_page_answering_embeddings_fails_indexing_in_one_line(
    endpoint: FakeOpenAIServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    endpoint.push_fault(EMBEDDINGS, html_page())

    code = main(["index", str(folder), "--profile", "openai"])

    assert code == 2 and "not an OpenAI API response" in error_line(capsys.readouterr().err)


# The MCP server over the same endpoint: a failed run is a run with status "error", its record whole.


@pytest.fixture
def mcp_client(library: Path) -> Iterator[Any]:
    app = App(load_settings("openai"), roots=[library.parent], runs_dir=library.parent / "runs")
    try:
        with memory_client(lambda: build_server_session(app)) as client:
            yield client
    finally:
        app.close()


def build_server_session(app: App) -> Any:
    from mcp.shared.memory import create_connected_server_and_client_session

    return create_connected_server_and_client_session(build_server(app))


@pytest.mark.parametrize(
    ("route", "fault", "says"),
    [
        (CHAT, html_page(), "not an OpenAI API response"),
        (IMAGES, truncated_image(), "undecodable image data"),
        (IMAGES, html_page(), "not an OpenAI API response"),
    ],
)
def test_an_mcp_run_against_a_faulty_endpoint_ends_in_error_with_its_record(
    mcp_client: Any, endpoint: FakeOpenAIServer, library: Path, route: str, fault: Any, says: str
) -> None:
    endpoint.push_fault(route, fault)

    view = mcp_client.call("generate_with_references", {"prompt": PROMPT, "index": "photos", "wait_seconds": 30})

    assert view.isError and view.structuredContent is not None
    run = view.structuredContent
    assert run["status"] == "error" and says in run["error"] and "\n" not in run["error"]
    assert run["result"]["stop_reason"] == "error" and run["result"]["error"] == run["error"]


def test_an_mcp_search_against_a_hung_endpoint_is_a_one_line_tool_error(
    mcp_client: Any, endpoint: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint.always(EMBEDDINGS, hung())
    monkeypatch.setattr(limits, "REQUEST_TIMEOUT_S", 1.0)  # the default a server without --request-timeout uses

    result = mcp_client.call("retrieve_images", {"index": "photos", "query": "a jay", "k": 1})

    assert result.isError and "did not answer embeddings" in text_of(result) and "\n" not in text_of(result)
