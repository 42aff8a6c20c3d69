"""What LangGraph Studio and LangGraph Server clients see: small schemas on Python 3.11, named graphs, user
errors with their own message."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from imageloop.errors import ConfigError, ImageloopError, IndexNotFoundError
from tests.fake_providers import FakeBackends
from tests.test_langgraph_server import (
    PLAN_AND_CAPTIONS,
    ROOT,
    configured,
    load_graph,
    no_configuration,
    server_config,
)

__all__ = ["configured", "no_configuration"]  # fixtures shared with the server's own tests

INPUTS = {"imagerag": {"prompt"}, "genir": {"query"}}
# Internal bookkeeping a run's answer must not show (Studio renders the output schema as the result panel).
INTERNAL = {"hits", "critic_captions", "critic_failed", "current_image", "next_query", "shown_kind", "retrieved"}


def properties(schema: dict[str, Any]) -> set[str]:
    return set(schema.get("properties", {}))


@pytest.mark.parametrize("name", ["imagerag", "genir"])
@pytest.mark.usefixtures("no_configuration")
def test_studio_reads_the_input_schema_as_just_the_request(name: str) -> None:
    schema = load_graph(name).get_input_jsonschema()
    assert properties(schema) == INPUTS[name]


@pytest.mark.parametrize("name", ["imagerag", "genir"])
@pytest.mark.usefixtures("no_configuration")
def test_studio_reads_the_output_schema_without_internal_fields(name: str) -> None:
    schema = load_graph(name).get_output_jsonschema()
    assert {"steps", "stop_reason"} <= properties(schema)
    assert not properties(schema) & INTERNAL


@pytest.mark.parametrize("name", ["imagerag", "genir"])
@pytest.mark.usefixtures("no_configuration")
def test_studio_shows_the_index_and_images_folder_in_the_config_panel(name: str) -> None:
    schema = load_graph(name).get_context_jsonschema()
    fields = schema["properties"]
    assert {"index", "artifacts_dir", "seed"} <= set(fields)
    assert "IMAGELOOP_INDEX" in fields["index"]["description"]
    assert "prompt" not in fields and "steps" not in schema.get("required", [])


@pytest.mark.parametrize("name", ["imagerag", "genir"])
@pytest.mark.usefixtures("no_configuration")
def test_each_graph_is_named_for_its_loop_in_traces(name: str) -> None:
    assert load_graph(name).get_name() == name


def test_user_errors_are_value_errors_so_langgraph_server_shows_their_message() -> None:
    # langgraph-api serialises a run's error as its message only for ValueError-like types.
    for error in (ImageloopError("x"), ConfigError("x"), IndexNotFoundError("x")):
        assert isinstance(error, ValueError)


def test_a_server_run_without_an_index_fails_with_a_value_error_naming_the_fix(
    configured: FakeBackends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMAGELOOP_INDEX")
    configured.vlm.answers.extend(PLAN_AND_CAPTIONS)
    with pytest.raises(ValueError) as raised:
        load_graph("imagerag").invoke({"prompt": "a blue jay"}, context={"mode": "generation"})
    message = str(raised.value)
    assert message.startswith("no index: set IMAGELOOP_INDEX=FOLDER") and "\n" not in message


def http_app() -> Any:
    """The custom routes the way the server loads them: `langgraph.json` → `http.app`, imported by path."""
    path, _, attribute = server_config()["http"]["app"].partition(":")
    spec = importlib.util.spec_from_file_location("langgraph_http", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attribute)


def test_a_remote_client_fetches_a_server_runs_images_and_report_over_http(
    configured: FakeBackends, tmp_path: Path
) -> None:
    configured.vlm.answers.append({"aligned": True, "missing_concepts": []})
    state = load_graph("imagerag").invoke({"prompt": "a blue jay"})
    [record] = (tmp_path / "runs" / "server").glob("*/run.json")
    client = TestClient(http_app())
    final = client.get(f"/imageloop/runs/server/artifacts/{state['final_image']}.png")
    assert final.status_code == 200 and final.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(final.content)).size == (16, 16)
    report = client.get(f"/imageloop/runs/server/{record.parent.name}/report.html")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    "path", ["%2e%2e/photos/jay.png", "server/%2e%2e/%2e%2e/photos/jay.png", "server/checkpoints.sqlite", "none.png"]
)
def test_the_route_serves_only_run_outputs_under_the_runs_folder(
    configured: FakeBackends, tmp_path: Path, path: str
) -> None:
    (tmp_path / "runs" / "server").mkdir(parents=True)
    (tmp_path / "runs" / "server" / "checkpoints.sqlite").write_bytes(b"SQLite format 3")
    answer = TestClient(http_app()).get(f"/imageloop/runs/{path}")
    assert answer.status_code == 404 and "no such run file" in answer.json()["error"]


def test_a_symlink_out_of_the_runs_folder_is_not_followed(configured: FakeBackends, tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "leak.png").symlink_to(tmp_path / "photos" / "jay.png")
    assert TestClient(http_app()).get("/imageloop/runs/leak.png").status_code == 404


def test_a_nul_byte_in_the_route_is_no_such_run_file_not_a_server_error(configured: FakeBackends) -> None:
    answer = TestClient(http_app()).get("/imageloop/runs/server/x%00.png")
    assert answer.status_code == 404 and "no such run file" in answer.json()["error"]
