"""The CIR graph on a real index of flat-colour pictures, with scripted language models and a colour generator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langgraph.checkpoint.memory import InMemorySaver

from imageloop.errors import ConfigError, EmbedderMismatchError
from imageloop.graphs.cir import CIRContext, CIRGraph, build_cir_graph, fuse_scores, robust_proxy_query
from imageloop.protocols import Vector
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.images import content_id
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever
from tests.cir_world import FakeColourEmbedder, ScriptedColourGenerator, colour_folder, colour_picture
from tests.fakes import FakeHashEmbedder, ScriptedVLM

MATCHES = {"matches": True, "description": "a red square"}


@dataclass
class FakeCaptioner:
    """Says the same caption of any picture, and counts the pictures it was shown."""

    caption: str = "a blue square"
    shown: list[Path] = field(default_factory=list)

    def __call__(self, path: Path) -> str:
        self.shown.append(path)
        return self.caption


@dataclass
class FakeSumModel:
    """A composed-query model that adds the two vectors (what a combiner starts from), for one embedder."""

    embedder_id: str = "fake:colour"
    asked: list[tuple[Vector, Vector]] = field(default_factory=list)

    def require_embedder(self, model_id: str) -> None:
        if model_id != self.embedder_id:
            raise EmbedderMismatchError(f"trained on {self.embedder_id}, not {model_id}")

    def embed_query(self, reference_image_vector: Vector, text_vector: Vector) -> Vector:
        self.asked.append((reference_image_vector, text_vector))
        query = reference_image_vector + text_vector
        return np.asarray(query / np.linalg.norm(query), dtype=np.float32)


@dataclass
class World:
    """An indexed colour folder and the backends a CIR graph runs on."""

    folder: Path
    paths: dict[str, Path]
    embedder: FakeColourEmbedder
    retriever: Retriever
    vlm: ScriptedVLM
    captioner: FakeCaptioner
    generator: ScriptedColourGenerator
    model: FakeSumModel
    artifacts: ArtifactStore

    def graph(self, checkpointer: Any = None) -> CIRGraph:
        return build_cir_graph(
            self.vlm, self.captioner, self.generator, self.retriever, self.artifacts, checkpointer,
            query_models=lambda folder: self.model,
        )  # fmt: skip

    def run(self, reference: Path, change: str, **knobs: Any) -> dict[str, Any]:
        graph = self.graph()
        state = graph.invoke({"reference": str(reference), "change": change}, version="v2", context=CIRContext(**knobs))
        return dict(state.value)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    paths = colour_folder(tmp_path / "gallery")
    embedder = FakeColourEmbedder()
    index_folder(tmp_path / "gallery", embedder, None, progress=False)
    retriever = Retriever(_open(tmp_path / "gallery"), embedder)
    yield World(
        tmp_path / "gallery", paths, embedder, retriever, ScriptedVLM([]), FakeCaptioner(),
        ScriptedColourGenerator(), FakeSumModel(), ArtifactStore(tmp_path / "artifacts"),
    )  # fmt: skip
    retriever.index.close()


def _open(folder: Path) -> Any:
    from imageloop.tools.indexing.image_index import open_index

    return open_index(folder)


def names(results: list[dict[str, Any]]) -> list[str]:
    return [Path(r["path"]).stem for r in results]


def test_the_sidecar_caption_and_the_change_are_composed_and_the_edited_description_retrieves_the_target(
    world: World,
) -> None:
    world.vlm.answers.append("Sure.\nEdited Description: a red square\n")
    state = world.run(world.paths["blue"], "make it red", k=3)
    assert state["reference_description"] == "a blue square"  # the sidecar: no captioner call
    assert world.captioner.shown == []
    assert (state["edited_description"], state["composed"]) == ("a red square", True)
    assert names(state["results"])[0] == "red"
    [(messages, _)] = world.vlm.calls
    assert "Image Content: a blue square\nInstruction: make it red" in messages[0].text
    assert world.embedder.texts == ["a red square"]
    assert state["stop_reason"] == "retrieved"


def test_a_reference_without_a_sidecar_is_described_by_the_captioner(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "query.png"
    colour_picture("blue").save(outside)
    world.vlm.answers.append("Edited Description: a yellow square")
    state = world.run(outside, "make it yellow")
    assert world.captioner.shown == [outside]
    assert state["reference_description"] == "a blue square"
    assert names(state["results"])[0] == "yellow"


def test_an_answer_without_an_edited_description_line_searches_with_the_change_itself(world: World) -> None:
    world.vlm.answers.append("I would make the square green.")
    state = world.run(world.paths["blue"], "a green one")
    assert (state["edited_description"], state["composed"]) == ("a green one", False)
    assert names(state["results"])[0] == "green"


def test_the_reference_is_never_an_answer_unless_asked(world: World) -> None:
    world.vlm.answers += ["Edited Description: a blue square"] * 2
    assert "blue" not in names(world.run(world.paths["blue"], "keep it", k=6)["results"])
    kept = world.run(world.paths["blue"], "keep it", k=6, exclude_reference=False)["results"]
    assert names(kept)[0] == "blue" and len(kept) == 6


def test_the_proxy_is_drawn_from_the_edited_description_with_the_reference_and_scores_fuse_as_imagine_and_seek(
    world: World,
) -> None:
    world.vlm.answers.append("Edited Description: a red square")
    state = world.run(world.paths["blue"], "make it red", k=5, proxy=True, fusion_lambda=0.3)

    [request] = world.generator.requests
    assert request.prompt == "a red square"
    [reference] = request.references
    assert (reference.path, reference.caption) == (world.paths["blue"], "a blue square")
    proxy = world.embedder.embed_images([world.artifacts.open(state["proxy_image"])])[0]
    edited, described = world.embedder.embed_texts(["a red square", "a blue square"])
    reference_vector = world.retriever.stored_vectors([content_id(world.paths["blue"])])[
        content_id(world.paths["blue"])
    ]
    query = robust_proxy_query(proxy, reference_vector, edited - described)
    for result in state["results"]:
        vector = world.retriever.stored_vectors([result["id"]])[result["id"]]
        s_text, s_proxy = float(vector @ edited), float(vector @ query)
        assert result["score"] == pytest.approx(0.3 * s_text + 0.7 * s_text * s_proxy, abs=1e-5)
    assert names(state["results"])[0] == "red"
    assert [r["score"] for r in state["results"]] == sorted((r["score"] for r in state["results"]), reverse=True)


def test_fusion_is_the_text_score_at_lambda_one_and_the_product_at_zero() -> None:
    text, proxy = np.array([0.9, 0.5, -0.2], np.float32), np.array([0.1, 0.8, 0.5], np.float32)
    assert np.allclose(fuse_scores(text, proxy, 1.0), text)
    assert np.allclose(fuse_scores(text, proxy, 0.0), text * proxy)
    assert np.allclose(fuse_scores(text, proxy, 0.65), 0.65 * text + 0.35 * text * proxy)


def test_the_robust_proxy_query_scales_reference_and_direction_to_the_proxy_and_is_a_unit_vector() -> None:
    proxy = np.array([0.0, 0.6, 0.8], np.float32)
    reference = np.array([0.4, 0.0, 0.0], np.float32)
    direction = np.array([0.0, 0.0, 2.0], np.float32)
    query = robust_proxy_query(proxy, reference, direction)
    expected = proxy + reference * (0.8 / 0.4) + direction * (0.8 / 2.0)
    assert np.allclose(query, expected / np.linalg.norm(expected))


def test_a_wrong_top_hit_is_verified_rewritten_and_searched_again_until_the_cap(world: World) -> None:
    world.vlm.answers += [
        "Edited Description: a green square",
        {"matches": False, "description": "a yellow square"},
        {"matches": False, "description": "a red square"},
    ]
    state = world.run(world.paths["blue"], "make it red", verify=2)
    assert [a["description"] for a in state["attempts"]] == ["a green square", "a yellow square", "a red square"]
    assert [a["matches"] for a in state["attempts"]] == [False, False, None]
    assert (state["verification"], state["stop_reason"]) == (2, "max_verifications")
    assert names(state["results"])[0] == "red"
    [_, (check, schema), _] = world.vlm.calls
    assert check[0].images == (world.paths["blue"], world.paths["green"]) and schema is not None
    assert [s["node"] for s in state["steps"]].count("retrieve") == 3


def test_a_verified_top_hit_ends_the_loop(world: World) -> None:
    world.vlm.answers += ["Edited Description: a red square", MATCHES]
    state = world.run(world.paths["blue"], "make it red", verify=3)
    assert (state["verification"], state["stop_reason"]) == (1, "verified")
    assert len(world.vlm.calls) == 2


def test_a_verified_proxy_run_draws_again_for_each_rewritten_description(world: World) -> None:
    world.vlm.answers += ["Edited Description: a green square", {"matches": False, "description": "a red square"}]
    state = world.run(world.paths["blue"], "make it red", proxy=True, verify=1)
    assert [r.prompt for r in world.generator.requests] == ["a green square", "a red square"]
    assert names(state["results"])[0] == "red"


def test_a_composed_query_model_ranks_by_its_vector_without_describing_or_composing(world: World) -> None:
    state = world.run(world.paths["blue"], "red", cir_model="any-folder", k=6)
    assert world.vlm.calls == [] and world.captioner.shown == []
    [(image, text)] = world.model.asked
    assert np.allclose(
        image, world.retriever.stored_vectors([content_id(world.paths["blue"])])[content_id(world.paths["blue"])]
    )
    assert np.allclose(text, world.embedder.embed_texts(["red"])[0])
    assert state["edited_description"] is None
    assert names(state["results"])[0] == "red"  # blue (the reference) is left out


def test_a_composed_query_model_refuses_the_description_loops_and_another_embedders_index(world: World) -> None:
    with pytest.raises(ConfigError, match="`proxy` and `verify` need one"):
        world.run(world.paths["blue"], "red", cir_model="m", proxy=True)
    world.model.embedder_id = "open_clip:ViT-B-32"
    with pytest.raises(EmbedderMismatchError, match="trained on open_clip"):
        world.run(world.paths["blue"], "red", cir_model="m")


def test_the_proxy_needs_an_index_of_image_embeddings(tmp_path: Path) -> None:
    folder = tmp_path / "captions"
    paths = colour_folder(folder)
    text_embedder = FakeHashEmbedder()
    index_folder(folder, text_embedder, None, progress=False)
    retriever = Retriever(_open(folder), text_embedder)
    graph = build_cir_graph(
        ScriptedVLM([]), FakeCaptioner(), ScriptedColourGenerator(), retriever, ArtifactStore(tmp_path / "a")
    )
    with pytest.raises(ConfigError, match="use an index built with an image embedder"):
        graph.invoke({"reference": str(paths["blue"]), "change": "red"}, context=CIRContext(proxy=True))
    retriever.index.close()


def test_a_missing_reference_or_an_empty_change_is_refused(world: World, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="does not exist"):
        world.run(tmp_path / "nowhere.png", "red")
    with pytest.raises(ConfigError, match="change is empty"):
        world.run(world.paths["blue"], "   ")


def test_a_second_run_on_a_thread_starts_clean(world: World) -> None:
    graph = world.graph(InMemorySaver())
    thread = {"configurable": {"thread_id": "t"}}
    world.vlm.answers += ["Edited Description: a green square", MATCHES, "Edited Description: a red square"]
    first = graph.invoke({"reference": str(world.paths["blue"]), "change": "green"}, thread,
                         context=CIRContext(verify=1))  # fmt: skip
    second = graph.invoke({"reference": str(world.paths["blue"]), "change": "red"}, thread)
    assert first["stop_reason"] == "verified"
    assert (second["stop_reason"], second["verification"], len(second["attempts"])) == ("retrieved", 0, 1)
    assert [s["node"] for s in second["steps"]].count("prepare") == 1


def test_a_deep_ranking_lists_ids_beyond_the_results(world: World) -> None:
    world.vlm.answers.append("Edited Description: a red square")
    state = world.run(world.paths["blue"], "make it red", k=2, rank_depth=6, exclude_reference=False)
    assert len(state["results"]) == 2 and len(state["ranking"]) == 6
    assert state["ranking"][:2] == [r["id"] for r in state["results"]]


def test_its_model_calls_are_runs_of_the_trace_as_every_loops_are(world: World) -> None:
    from tests.test_tracing import RecordingHandler

    handler = RecordingHandler()
    world.vlm.answers += ["Edited Description: a red square", MATCHES]
    graph = world.graph()
    asked = {"reference": str(world.paths["blue"]), "change": "make it red"}
    graph.invoke(asked, {"callbacks": [handler]}, context=CIRContext(verify=1))
    assert len(handler.prompts) == len(handler.answers) == len(world.vlm.calls) == 2  # compose, then verify
