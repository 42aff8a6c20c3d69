"""What LangGraph Studio and LangGraph Server clients see: small schemas on Python 3.11, named graphs, user
errors with their own message."""

from __future__ import annotations

from typing import Any

import pytest

from imageloop.errors import ConfigError, ImageloopError, IndexNotFoundError
from tests.fake_providers import FakeBackends
from tests.test_langgraph_server import PLAN_AND_CAPTIONS, configured, load_graph, no_configuration

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
