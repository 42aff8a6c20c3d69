"""The tiny-model cache is shared by every process that uses it (test workers, servers): each model is built
once, and a built model is never pulled from under a process that loads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imageloop.tiny import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
FETCH = """
import sys, time
from pathlib import Path
from imageloop.tiny import tiny_model_dir

def build(folder: Path) -> None:
    with open(sys.argv[1], "a") as log:  # every build leaves a line
        log.write("built\\n")
    (folder / "weights.bin").write_bytes(b"w" * 1024)
    time.sleep(0.5)  # long enough for the other process to arrive while this one builds

print(tiny_model_dir("shared", build))
"""


def test_two_processes_asking_for_one_model_build_it_once(tmp_path: Path) -> None:
    log = tmp_path / "builds.log"
    env = {**os.environ, "IMAGELOOP_TINY_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    fetching = [
        subprocess.Popen([sys.executable, "-c", FETCH, str(log)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    folders = [child.communicate(timeout=120)[0].strip() for child in fetching]
    assert folders[0] == folders[1] and (Path(folders[0]) / "weights.bin").is_file()
    assert log.read_text().splitlines() == ["built"]


def test_a_finished_model_is_returned_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGELOOP_TINY_CACHE", str(tmp_path))
    first = tiny_model_dir("once", lambda folder: (folder / "weights.bin").write_bytes(b"w"))
    assert tiny_model_dir("once", lambda folder: pytest.fail("built twice")) == first
