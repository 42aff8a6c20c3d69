"""The tiny-model cache is shared by every process that uses it (test workers, servers): each model is built
once, and a built model is never pulled from under a process that loads it."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from imageloop.tiny import tiny_model_dir


def _slow_build(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"w" * 1024)
    time.sleep(0.3)  # long enough for the other process to arrive while this one builds


def _fetch(cache: str, built: str) -> str:
    import os

    os.environ["IMAGELOOP_TINY_CACHE"] = cache

    def build(folder: Path) -> None:
        with open(built, "a") as log:  # every build leaves a line
            log.write("built\n")
        _slow_build(folder)

    return str(tiny_model_dir("shared", build))


def test_two_processes_asking_for_one_model_build_it_once(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        folders = pool.starmap(_fetch, [(str(tmp_path / "cache"), str(log))] * 2)
    assert folders[0] == folders[1] and (Path(folders[0]) / "weights.bin").is_file()
    assert log.read_text().splitlines() == ["built"]


def test_a_finished_model_is_returned_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGELOOP_TINY_CACHE", str(tmp_path))
    first = tiny_model_dir("once", _slow_build)
    assert tiny_model_dir("once", lambda folder: pytest.fail("built twice")) == first
