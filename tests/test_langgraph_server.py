"""langgraph.json exports the loops for LangGraph Server and Studio: graphs that import, compile without a
checkpointer, draw before anything is configured, and run on the configured backends."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command

from imageloop.app.deployment import close_deployed_app
from imageloop.errors import ConfigError
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FAKE_SETTINGS, FakeBackends, captioned_folder, fake_backends

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_NODES = {
    "imagerag": {"prepare", "generate_draft", "critic", "rewrite", "retrieve", "compose", "generate_with_references"},
    "genir": {"prepare", "choose_feedback", "generate_synthetic", "retrieve", "present", "feedback", "rewrite"},
    "rage": {"prepare", "retrieve", "select", "generate", "review"},
}

# Generation mode: the critic plans the concepts, the rewriter writes captions, then retrieval needs the index.
PLAN_AND_CAPTIONS = [
    {"missing_concepts": ["blue jay"]},
    {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]},
]


def server_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads((ROOT / "langgraph.json").read_text(encoding="utf-8"))
    return config


def load_graph(name: str, config: dict[str, Any] | None = None) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Load a graph the way the server does: import the file by path, call the factory with the run's config."""
    path, _, attribute = server_config()["graphs"][name].partition(":")
    spec = importlib.util.spec_from_file_location(f"langgraph_server_{name}", ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exported = getattr(module, attribute)
    graph = exported(config) if callable(exported) and not isinstance(exported, CompiledStateGraph) else exported
    assert isinstance(graph, CompiledStateGraph)
    return graph


@pytest.fixture
def no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """No model, endpoint or index configured; a profile that would fail if settings were read at build time."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "IMAGELOOP_INDEX", "IMAGELOOP_VLM", "IMAGELOOP_GENERATOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMAGELOOP_PROFILE", "no-such-profile")


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeBackends]:
    """The server's environment selects the scripted backends, as IMAGELOOP_* variables would real ones."""
    monkeypatch.delenv("IMAGELOOP_PROFILE", raising=False)
    for role, spec in FAKE_SETTINGS.items():
        monkeypatch.setenv(f"IMAGELOOP_{role.upper()}", spec)
    with fake_backends(monkeypatch) as fakes:
        photos = captioned_folder(tmp_path / "photos")
        index_folder(photos, fakes.embedder, None, progress=False)
        monkeypatch.setenv("IMAGELOOP_INDEX", str(photos))
        monkeypatch.setenv("IMAGELOOP_ROOTS", str(tmp_path))
        monkeypatch.setenv("IMAGELOOP_RUNS", str(tmp_path / "runs"))
        close_deployed_app()
        yield fakes
        close_deployed_app()


def test_langgraph_json_names_a_python_factory_per_loop() -> None:
    config = server_config()
    assert config["dependencies"] == ["."]
    assert set(config["graphs"]) == {"imagerag", "genir", "cir", "rage"}
    for spec in config["graphs"].values():
        path, _, attribute = spec.partition(":")
        assert path.startswith("./") and (ROOT / path).is_file() and attribute.isidentifier()


@pytest.mark.parametrize("name", ["imagerag", "genir", "rage"])
@pytest.mark.usefixtures("no_configuration")
def test_each_graph_compiles_without_a_checkpointer_and_draws_before_anything_is_configured(name: str) -> None:
    for config in (None, {"configurable": {"thread_id": "t"}}):
        graph = load_graph(name, config)
        assert graph.checkpointer is None  # the server brings its own
        mermaid = graph.get_graph().draw_mermaid()
        assert all(f"\t{node}({node})" in mermaid for node in EXPECTED_NODES[name]), mermaid


def test_the_imagerag_graph_runs_on_the_configured_backends(configured: FakeBackends, tmp_path: Path) -> None:
    configured.vlm.answers.extend(
        [
            {"aligned": False, "missing_concepts": ["blue jay"]},
            {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]},
            {"aligned": True, "missing_concepts": []},
        ]
    )
    artifacts = tmp_path / "server-artifacts"
    graph = load_graph("imagerag")
    state = graph.invoke({"prompt": "a blue jay on a snowy branch"}, context={"artifacts_dir": str(artifacts)})
    assert state["stop_reason"] == "aligned"
    final = state["final_image"]  # named by its address: the artifacts folder lies under the first root
    assert final.startswith("/imageloop/roots/0/server-artifacts/") and (artifacts / Path(final).name).is_file()
    [reference] = state["references"]
    assert Path(reference["path"]).name == "jay.png"


def test_a_finished_server_run_writes_its_record_under_the_runs_folder(
    configured: FakeBackends, tmp_path: Path
) -> None:
    configured.vlm.answers.append({"aligned": True, "missing_concepts": []})
    load_graph("imagerag").invoke({"prompt": "a blue jay"})
    [record] = (tmp_path / "runs" / "server").glob("*/run.json")
    written = json.loads(record.read_text())
    assert (written["prompt"], written["stop_reason"]) == ("a blue jay", "aligned")
    assert Path(written["final_image"]).is_file() and (record.parent / "report.html").is_file()


def test_the_servers_settings_are_the_runs_knobs_unless_the_run_says_otherwise(
    configured: FakeBackends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGELOOP_MAX_ITERATIONS", "2")
    monkeypatch.setenv("IMAGELOOP_TOP_K", "3")
    not_aligned = {"aligned": False, "missing_concepts": ["blue jay"]}
    captions = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]}
    configured.vlm.answers.extend([not_aligned, captions, not_aligned, captions, not_aligned])
    state = load_graph("imagerag").invoke({"prompt": "a blue jay"})
    assert (state["iteration"], state["stop_reason"], len(state["references"])) == (2, "max_iterations", 3)

    configured.vlm.answers.extend([not_aligned, captions, not_aligned])
    state = load_graph("imagerag").invoke({"prompt": "a blue jay"}, context={"max_iterations": 1, "top_k": 1})
    assert (state["iteration"], len(state["references"])) == (1, 1)


def test_a_server_runs_record_is_the_knobs_its_context_set_not_the_deployments(
    configured: FakeBackends, tmp_path: Path
) -> None:
    not_aligned = {"aligned": False, "missing_concepts": ["blue jay"]}
    captions = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest"}]}
    configured.vlm.answers.extend([not_aligned, captions] * 3 + [not_aligned])
    state = load_graph("imagerag").invoke({"prompt": "a blue jay"}, context={"max_iterations": 3, "top_k": 2})
    [record] = (tmp_path / "runs" / "server").glob("*/run.json")
    ran = json.loads(record.read_text())["settings"]
    assert (state["iteration"], len(state["references"])) == (3, 2)  # the run used the context's knobs...
    assert (ran["max_iterations"], ran["top_k"]) == (3, 2)  # ...and its record says so (it said the server's 1 and 1)


@pytest.mark.parametrize("name", ["imagerag", "genir", "cir", "rage"])
def test_a_misspelled_context_key_is_refused_in_one_line_naming_the_valid_ones(
    configured: FakeBackends, name: str
) -> None:
    inputs = {"imagerag": {"prompt": "a jay"}, "genir": {"query": "a jay"}, "rage": {"prompt": "a jay"}}
    with pytest.raises(ConfigError, match=rf"^unknown {name} knob 'max_iteration': expected one of .*\bindex\b"):
        load_graph(name).invoke(inputs.get(name, {"reference": "x.png", "change": "red"}), context={"max_iteration": 3})


def test_a_person_answers_genir_through_the_servers_checkpointer(configured: FakeBackends, tmp_path: Path) -> None:
    graph = load_graph("genir")
    served = graph.copy(update={"checkpointer": InMemorySaver()})  # what the server does with its own saver
    thread = {"configurable": {"thread_id": "t1"}}
    context = {"artifacts_dir": str(tmp_path / "a"), "feedback": "verbal", "k": 2}
    asked = served.invoke({"query": "a blue jay"}, thread, version="v2", context=context)
    [question] = asked.interrupts
    top = question.value["retrieved"][0]
    assert "blue jay" in top["caption"]
    done = served.invoke(Command(resume=f"found: {top['id']}"), thread, version="v2").value
    assert (done["stop_reason"], done["found_id"]) == ("found", top["id"])


def test_the_run_context_chooses_the_index(configured: FakeBackends, tmp_path: Path) -> None:
    configured.vlm.answers.extend(PLAN_AND_CAPTIONS)
    (tmp_path / "nowhere").mkdir()
    graph = load_graph("imagerag")
    with pytest.raises(Exception, match="no imageloop index at"):
        graph.invoke({"prompt": "a blue jay"}, context={"mode": "generation", "index": str(tmp_path / "nowhere")})


def test_a_run_without_an_index_says_how_to_configure_one(
    configured: FakeBackends, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMAGELOOP_INDEX")
    configured.vlm.answers.extend(PLAN_AND_CAPTIONS)
    graph = load_graph("imagerag")
    with pytest.raises(ConfigError, match="no index: set IMAGELOOP_INDEX=FOLDER"):
        graph.invoke({"prompt": "a blue jay"}, context={"mode": "generation"})


@pytest.mark.parametrize(("name", "inputs"), [("genir", {"query": "a blue jay"}), ("rage", {"prompt": "a blue jay"})])
def test_a_resume_that_answers_nothing_is_one_line_and_the_question_stays_asked(
    configured: FakeBackends, name: str, inputs: dict[str, Any]
) -> None:
    graph = load_graph(name).copy(update={"checkpointer": InMemorySaver()})
    thread = {"configurable": {"thread_id": name}}
    context = {"feedback": "verbal"} if name == "genir" else {}
    asked = graph.invoke(inputs, thread, version="v2", context=context)

    with pytest.raises(ConfigError, match=r"^Command\(resume=None\) answers nothing"):
        graph.invoke(Command(resume=None), thread, version="v2", context=context)

    assert [i.value for i in graph.get_state(thread).interrupts] == [i.value for i in asked.interrupts]
