"""Every bound comes from one table (`imageloop.limits`) and holds on every face: a value past it is a
one-line error naming the bound and its range, before any model is asked or any file written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from imageloop import langchain_tools, limits
from imageloop.cli import main
from tests.fake_providers import FAKE_SETTINGS, FakeBackends, captioned_folder, fake_backends
from tests.test_mcp_server import maximum, memory_client, text_of

FAKE = [option for role, model in FAKE_SETTINGS.items() for option in (f"--{role}", model)]
FAKE_EMBEDDER = ["--embedder", FAKE_SETTINGS["embedder"]]  # what `query` takes: it runs the embedder alone


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as made:
        yield made


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return captioned_folder(tmp_path / "photos")


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("imageloop: error:")]
    return line


def bound_words(name: str, value: str) -> str:
    bound = limits.BOUNDS[name]
    low, high = (str(int(x)) if float(x).is_integer() else str(x) for x in (bound.low, bound.high))
    return f"{name} {value} is out of range: {low}..{high}"


@pytest.mark.parametrize(
    ("option", "value", "bound"),
    [
        ("--max-iterations", "11", "max_iterations"),
        ("--max-iterations", "0", "max_iterations"),
        ("--top-k", "9", "top_k"),
        ("--max-concepts", "11", "max_concepts"),
        ("--similarity-threshold", "2", "similarity_threshold"),
        ("--steps", "201", "steps"),
        ("--seed", "-1", "seed"),
        ("--guidance-scale", "51", "guidance_scale"),
        ("--request-timeout", "0", "request_timeout"),
        ("--max-retries", "11", "max_retries"),
    ],
)
def test_generate_refuses_a_knob_past_its_bound_before_running(
    fakes: FakeBackends, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    option: str, value: str, bound: str,
) -> None:  # fmt: skip
    out = tmp_path / "run"
    code = main(["generate", "a jay", "--index", str(folder), "--out", str(out), option, value, *FAKE])
    assert code == 2 and bound_words(bound, value) in one_error_line(capsys)
    assert not out.exists() and not fakes.generator.requests


@pytest.mark.parametrize(("value", "bound"), [("-1", "rounds"), ("21", "rounds")])
def test_search_refuses_rounds_past_their_bound(
    fakes: FakeBackends, folder: Path, capsys: pytest.CaptureFixture[str], value: str, bound: str
) -> None:
    assert main(["index", str(folder), *FAKE]) == 0
    capsys.readouterr()
    code = main(["search", "--index", str(folder), "--query", "a jay", "--rounds", value, *FAKE])
    assert code == 2 and bound_words(bound, value) in one_error_line(capsys)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["query", "{folder}", "a jay", "--k", "51"], bound_words("k", "51")),
        (["query", "{folder}", "a jay", "--k", "0"], bound_words("k", "0")),
        (["index", "{folder}", "--batch-size", "257"], bound_words("batch_size", "257")),
        (["index", "{folder}", "--threads", "0"], bound_words("threads", "0")),
        (["search", "--index", "{folder}", "--query", "a jay", "--k", "51"], bound_words("k", "51")),
    ],
)
def test_retrieval_and_indexing_refuse_sizes_past_their_bounds(
    fakes: FakeBackends, folder: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    assert main(["index", str(folder), *FAKE]) == 0
    capsys.readouterr()
    code = main([arg.format(folder=folder) for arg in args] + (FAKE_EMBEDDER if args[0] == "query" else FAKE))
    assert code == 2 and words in one_error_line(capsys)


def test_an_image_size_past_the_side_bound_is_refused_before_any_model_call(
    fakes: FakeBackends, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["generate", "a jay", "--index", str(folder), "--out", str(tmp_path / "r"), "--size", "100000x100000"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "size 100000x100000 is out of range: each side 16..2048 pixels" in err
    assert not fakes.generator.requests


def test_a_prompt_past_the_length_bound_is_refused_naming_it(
    fakes: FakeBackends, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "x" * 100_000, "--index", str(folder), "--out", str(tmp_path / "r"), *FAKE])
    assert code == 2 and f"prompt has 100,000 characters; at most {limits.PROMPT_CHARS:,}" in one_error_line(capsys)
    assert not fakes.generator.requests and not (tmp_path / "r").exists()


def test_an_environment_value_past_a_bound_is_refused_in_the_same_words(
    fakes: FakeBackends, folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGELOOP_MAX_RETRIES", "99")
    code = main(["query", str(folder), "a jay", *FAKE_EMBEDDER])
    assert code == 2 and bound_words("max_retries", "99") in one_error_line(capsys)


# The agent faces declare the same bounds in their argument schemas, and refuse past them by name.


def schema_bounds(model: type[BaseModel]) -> dict[str, tuple[Any, Any]]:
    properties = model.model_json_schema()["properties"]
    return {name: (minimum(spec), maximum(spec)) for name, spec in properties.items() if maximum(spec) is not None}


def minimum(schema: dict[str, Any]) -> Any:
    return schema.get("minimum", next((s["minimum"] for s in schema.get("anyOf", []) if "minimum" in s), None))


def table(name: str) -> tuple[Any, Any]:
    return limits.BOUNDS[name].low, limits.BOUNDS[name].high


def test_mcp_and_langchain_argument_schemas_carry_the_tables_bounds(tmp_path: Path) -> None:
    from tests.test_mcp_server import in_process

    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as client:
        listed = client.portal.call(client.session.list_tools).tools
    tools = {tool.name: tool.inputSchema["properties"] for tool in listed}
    mcp_names = {
        ("retrieve_images", "k"): "k", ("index_images", "batch_size"): "batch_size",
        ("generate_with_references", "max_iterations"): "max_iterations",
        ("generate_with_references", "top_k"): "top_k", ("generate_with_references", "steps"): "steps",
        ("generate_with_references", "seed"): "seed", ("genir_round", "rounds"): "rounds",
        ("genir_round", "k"): "k", ("get_run", "wait_seconds"): "wait_seconds",
    }  # fmt: skip
    for (tool, argument), bound in mcp_names.items():
        assert (minimum(tools[tool][argument]), maximum(tools[tool][argument])) == table(bound), (tool, argument)

    langchain: dict[str, dict[str, str]] = {
        "index_images": {"batch_size": "batch_size"},
        "retrieve_images": {"k": "k", "similarity_threshold": "similarity_threshold"},
        "generate_with_references": {"max_iterations": "max_iterations", "top_k": "top_k"},
        "genir_round": {"rounds": "rounds", "k": "k"},
    }
    schemas = {tool.name: tool.args_schema for tool in langchain_tools.imageloop_tools(roots=[tmp_path])}
    for name, names in langchain.items():
        declared = schema_bounds(schemas[name])
        assert {name: declared[name] for name in names} == {name: table(bound) for name, bound in names.items()}


def test_an_mcp_call_past_a_bound_is_a_one_line_error_naming_the_argument(fakes: FakeBackends, tmp_path: Path) -> None:
    from tests.test_mcp_server import in_process

    captioned_folder(tmp_path / "photos")
    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as client:
        result = client.call("genir_round", {"index": "photos", "query": "a jay", "rounds": 21})
    assert result.isError and "rounds" in text_of(result) and "less than or equal to 20" in text_of(result)
    assert "\n" not in text_of(result)


# The README states the bounds too: what it says must be what `imageloop/limits.py` enforces.

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
NAMED = {"max-iterations": "max_iterations", "top-k": "top_k", "steps": "steps", "k": "k", "rounds": "rounds"}
OPTION_RANGE = re.compile(r"`--([a-z-]+)` (-?[\d.]+)\.\.(-?[\d.]+)")
REFUSAL_RANGE = re.compile(r"`([a-z_]+) -?[\d.]+ is out of range: (-?[\d.]+)\.\.(-?[\d.]+)`")


def stated_ranges() -> list[tuple[str, float, float]]:
    """(bound, low, high) for every `--NAME LOW..HIGH` and every quoted `NAME X is out of range: LOW..HIGH`."""
    stated = [(NAMED.get(name, name), float(low), float(high)) for name, low, high in OPTION_RANGE.findall(README)]
    return stated + [(name, float(low), float(high)) for name, low, high in REFUSAL_RANGE.findall(README)]


def stated_maxima() -> list[tuple[str, float]]:
    """(bound, high) for every `NAME ≤ N` or `NAME≤N` the README states."""
    return [
        (name, float(high)) for name, high in re.findall(r"\b([a-z_]+) ?≤ ?(\d+)\b", README) if name in limits.BOUNDS
    ]


def test_every_range_the_readme_states_is_the_one_the_limits_table_enforces() -> None:
    stated = stated_ranges()
    assert {name for name, _, _ in stated} >= {"max_iterations", "top_k", "steps", "k", "rounds"}
    assert [(name, low, high) for name, low, high in stated if name in limits.BOUNDS] == [
        (name, limits.BOUNDS[name].low, limits.BOUNDS[name].high) for name, _, _ in stated if name in limits.BOUNDS
    ]


def test_every_maximum_the_readme_states_is_the_one_the_limits_table_enforces() -> None:
    stated = stated_maxima()
    assert {name for name, _ in stated} >= {"k", "max_iterations", "steps", "max_images"}
    assert stated == [(name, limits.BOUNDS[name].high) for name, _ in stated]


def test_the_readme_states_the_sides_and_prompt_length_the_limits_table_enforces() -> None:
    assert f"sides {limits.MIN_SIDE}..{limits.MAX_SIDE}" in README and f"sides ≤ {limits.MAX_SIDE}" in README
    assert f"prompts up to {limits.PROMPT_CHARS:,} characters" in README
