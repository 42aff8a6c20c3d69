"""The application's one batching rule: every backend it hands out is its process-wide micro-batcher.

So the targets of an evaluation run at `--concurrency N`, and the concurrent runs of a server (an MCP
job, a LangGraph Server run), have their model calls merged into batched calls. Batch-capable scripted
fakes count those calls; a rendezvous makes concurrent callers reach the batcher together, whatever the
threads' timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

import imageloop.backends as backends
from imageloop import runtime
from imageloop.agents.vlms.batching import BatchingVisionLanguageModel
from imageloop.app import App
from imageloop.cli import _settings, build_parser
from imageloop.config import Settings
from imageloop.tools.embedders.batching import BatchingEmbedder
from imageloop.tools.generators.batching import BatchingGenerator
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FAKE_SETTINGS, captioned_folder, fake_backends
from tests.fakes import FakeHashEmbedder, Rendezvous, ScriptedBatchGenerator, ScriptedBatchVLM
from tests.image_folders import numbered_images

TARGETS = 5
T = TypeVar("T")


@contextmanager
def batch_capable(
    monkeypatch: pytest.MonkeyPatch, vlm: ScriptedBatchVLM, generator: ScriptedBatchGenerator
) -> Iterator[Settings]:
    """Within the block, `fake:` roles are these batch-capable fakes (and the hashing embedder)."""
    with fake_backends(monkeypatch):
        monkeypatch.setitem(backends.VLM_PROVIDERS, "fake", lambda *_: vlm)
        monkeypatch.setitem(backends.GENERATOR_PROVIDERS, "fake", lambda *_: generator)
        backends.clear_backends()
        yield Settings.model_validate(FAKE_SETTINGS)


def while_the_device_is_busy(jobs: list[Callable[[], T]], arrived: Rendezvous) -> list[T]:
    """Run `jobs` in threads while another model holds the device, until their first model calls have all
    queued (`arrived`): those calls then reach the device as one batch. Returns the jobs' results."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        with runtime.device_lock:
            futures = [pool.submit(job) for job in jobs]
            assert arrived.wait()
            time.sleep(0.05)  # from the rendezvous into the batcher's queue: a few lines of Python
        return [future.result() for future in futures]


def turn(query: str) -> dict[str, str]:
    return {"differences": "it is bluer", "query": query}


def test_every_app_of_a_process_hands_out_one_batcher_around_each_configured_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with fake_backends(monkeypatch) as fakes:
        first, second = App(fakes.settings), App(fakes.settings.with_overrides({"k": 3}))
        generator, vlm, embedder = first.generator(), first.vlm(), first.embedder()
        assert isinstance(generator, BatchingGenerator) and generator.inner is fakes.generator
        assert isinstance(vlm, BatchingVisionLanguageModel) and vlm.inner is fakes.vlm
        assert isinstance(embedder, BatchingEmbedder) and embedder.inner is fakes.embedder
        assert (second.generator(), second.vlm(), second.embedder()) == (generator, vlm, embedder)


def test_concurrent_genir_targets_share_vlm_passes_and_pipeline_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    numbered_images(photos, TARGETS, captions=True)
    index_folder(photos, FakeHashEmbedder(), None, progress=False)
    # Every target's first turn and first drawing meet; later ones share calls as they happen to coincide.
    vlm = ScriptedBatchVLM([turn("a bird on a branch")] * 10 * TARGETS, rendezvous=Rendezvous(TARGETS))
    generator = ScriptedBatchGenerator(rendezvous=Rendezvous(TARGETS))
    with batch_capable(monkeypatch, vlm, generator) as settings:
        knobs: dict[str, Any] = {"feedback": "visual", "rounds": 2, "k": 1}
        app = App(settings)
        (summary,) = while_the_device_is_busy(
            [lambda: app.eval_genir(photos, photos, tmp_path / "out", knobs=knobs, concurrency=TARGETS)],
            vlm.rendezvous,
        )

    assert summary["n_targets"] == TARGETS
    assert sum(generator.calls) == len(generator.requests) >= TARGETS  # every drawing went through the batcher
    assert len(generator.calls) < len(generator.requests) and max(generator.calls) > 1
    assert vlm.passes[0] == TARGETS  # the targets' first turns, in one pass
    assert sum(vlm.passes) == len(vlm.calls) and len(vlm.passes) < len(vlm.calls)


def test_concurrent_runs_of_separate_apps_share_the_pipeline_calls_of_their_drafts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = captioned_folder(tmp_path / "photos")
    index_folder(images, FakeHashEmbedder(), None, progress=False)
    aligned = {"aligned": True, "missing_concepts": []}
    vlm = ScriptedBatchVLM([aligned] * 2)
    generator = ScriptedBatchGenerator(rendezvous=Rendezvous(2))
    with batch_capable(monkeypatch, vlm, generator) as settings:
        # Two server jobs, each its own App (as two faces of one process have); drafts are their first model calls.
        jobs = [
            lambda: App(settings).generate("a blue jay", images, out_dir=tmp_path / "jay"),
            lambda: App(settings).generate("a sleeping cat", images, out_dir=tmp_path / "cat"),
        ]
        while_the_device_is_busy(jobs, generator.rendezvous)

    assert sorted(r.prompt for r in generator.requests) == ["a blue jay", "a sleeping cat"]
    assert generator.calls == [2]


def test_the_command_line_sets_the_requests_in_flight_per_endpoint() -> None:
    args = build_parser().parse_args(["generate", "a jay", "--index", "idx", "--max-concurrent-requests", "32"])
    settings = _settings(args)
    assert settings.max_concurrent_requests == 32
    assert {settings.endpoint(role).max_concurrent_requests for role in ("vlm", "generator", "embedder")} == {32}


def test_max_batch_caps_the_requests_merged_into_one_pipeline_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = captioned_folder(tmp_path / "photos")
    index_folder(images, FakeHashEmbedder(), None, progress=False)
    aligned = {"aligned": True, "missing_concepts": []}
    vlm = ScriptedBatchVLM([aligned] * 4)
    generator = ScriptedBatchGenerator(rendezvous=Rendezvous(4))
    with batch_capable(monkeypatch, vlm, generator) as settings:
        app = App(settings.with_overrides({"max_batch": 2}))
        jobs = [lambda n=n: app.generate(f"prompt {n}", images, out_dir=tmp_path / f"run{n}") for n in range(4)]
        while_the_device_is_busy(jobs, generator.rendezvous)

    assert sorted(generator.calls) == [2, 2]  # four drafts queued together, drawn two by two


def test_the_command_line_sets_the_largest_batch() -> None:
    args = build_parser().parse_args(
        ["eval", "genir", "--index", "i", "--targets", "t", "--out", "o", "--max-batch", "4"]
    )
    assert _settings(args).max_batch == 4
