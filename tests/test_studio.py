"""What LangGraph Studio and LangGraph Server clients see: small schemas on Python 3.11, named graphs, user
errors with their own message."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from PIL import Image
from starlette.testclient import TestClient

from imageloop.app.deployment import deployed_app
from imageloop.app.links import HTTP_BASE, Links
from imageloop.errors import ConfigError, ImageloopError, IndexNotFoundError
from tests.fake_providers import FakeBackends
from tests.test_index_sources import write_shards
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
    final = client.get(state["final_image"])  # the answer names it by its address
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


# A remote client never sees a path on the server: every image a run's questions and answers name is an address
# the server's own route serves.


def addresses(value: Any) -> list[str]:
    """Every string in a JSON-like answer that names a file on the server's route."""
    if isinstance(value, dict):
        return [found for item in value.values() for found in addresses(item)]
    if isinstance(value, list):
        return [found for item in value for found in addresses(item)]
    return [value] if isinstance(value, str) and value.startswith("/imageloop/") else []


def served(addressed: list[str]) -> list[tuple[int, str]]:
    client = TestClient(http_app())
    return [(answer.status_code, answer.headers["content-type"]) for answer in map(client.get, addressed)]


def test_a_server_runs_answer_names_its_images_by_addresses_the_route_serves(
    configured: FakeBackends, tmp_path: Path
) -> None:
    configured.vlm.answers.extend([{"aligned": False, "missing_concepts": ["blue jay"]}, *PLAN_AND_CAPTIONS[1:]])
    configured.vlm.answers.append({"aligned": True, "missing_concepts": []})
    state = load_graph("imagerag").invoke({"prompt": "a blue jay"})
    assert str(tmp_path) not in json.dumps(state, default=str)
    named = addresses(state)
    assert state["final_image"].startswith("/imageloop/runs/server/artifacts/")
    assert [ref["path"] for ref in state["references"]] == ["/imageloop/roots/0/photos/jay.png"]
    assert len(named) >= 4 and set(served(named)) == {(200, "image/png")}


def asked_and_answered(name: str, given: dict[str, Any], answer: Any, tmp_path: Path) -> tuple[Any, Any]:
    """A served graph's first question and its answer once resumed with `answer`; neither names a server path."""
    served_graph = load_graph(name).copy(update={"checkpointer": InMemorySaver()})
    thread = {"configurable": {"thread_id": "t1"}}
    [question] = served_graph.invoke(given, thread, version="v2", context={"k": 2}).interrupts
    done = served_graph.invoke(Command(resume=answer), thread, version="v2").value
    assert str(tmp_path) not in json.dumps(question.value) and str(tmp_path) not in json.dumps(done, default=str)
    return question.value, done


def test_a_genir_question_shows_the_drawing_and_results_by_address(configured: FakeBackends, tmp_path: Path) -> None:
    question, done = asked_and_answered("genir", {"query": "a blue jay"}, "found: 1", tmp_path)
    assert question["synthetic_image"].startswith("/imageloop/runs/server/artifacts/")
    assert set(served(addresses(question))) == {(200, "image/png")}
    assert done["stop_reason"] == "found" and done["rounds"][0]["synthetic_image"] == question["synthetic_image"]


def test_a_rage_question_lists_its_candidates_by_address(configured: FakeBackends, tmp_path: Path) -> None:
    question, done = asked_and_answered("rage", {"prompt": "a blue jay"}, {"selected": [1]}, tmp_path)
    assert [c["path"].split("/")[2] for c in question["candidates"]] == ["roots", "roots"]
    assert served([done["final_image"]]) == [(200, "image/png")]


@pytest.mark.parametrize("name", ["roots/0/photos/jay.txt", "roots/1/x.png", "roots/0/%2e%2e/secret.png"])
def test_the_route_serves_images_under_the_roots_and_nothing_else(
    configured: FakeBackends, tmp_path: Path, name: str
) -> None:
    (tmp_path.parent / "secret.png").write_bytes(b"png")
    answer = TestClient(http_app()).get(f"/imageloop/{name}")
    assert answer.status_code == 404 and "no such image" in answer.json()["error"]


def test_a_nul_byte_in_the_route_is_no_such_run_file_not_a_server_error(configured: FakeBackends) -> None:
    answer = TestClient(http_app()).get("/imageloop/runs/server/x%00.png")
    assert answer.status_code == 404 and "no such run file" in answer.json()["error"]


def test_an_image_inside_an_indexed_shard_is_named_and_served_from_its_tar(
    configured: FakeBackends, tmp_path: Path
) -> None:
    pictures = write_shards(tmp_path / "laion", shards=1, per_shard=2)
    (tmp_path.parent / "outside.tar").write_bytes((tmp_path / "laion" / "00000.tar").read_bytes())
    links = Links(deployed_app(), HTTP_BASE)
    address = links.url(tmp_path / "laion" / "00000.tar#000000001.jpg")
    assert address == "/imageloop/roots/0/laion/00000.tar%23000000001.jpg"
    client = TestClient(http_app())
    answer = client.get(address)
    assert (answer.status_code, answer.headers["content-type"]) == (200, "image/jpeg")
    assert answer.content == pictures["00000.tar#000000001.jpg"]
    outside = client.get("/imageloop/roots/0/%2e%2e/outside.tar%23000000001.jpg")
    assert outside.status_code == 404 and "no such image" in outside.json()["error"]
