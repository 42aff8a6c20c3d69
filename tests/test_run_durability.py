"""Runs are durable and honest: any failure is recorded, an interrupted run resumes without redoing finished
nodes, Ctrl-C says only what is true, a crash's half line in `dialogues.jsonl` does not swallow the next
record, pictures wait for the embedder at the size it needs, and an index never hands out a file that now
lies outside its folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imageloop.app import App
from imageloop.cli import main
from imageloop.config import load_settings
from imageloop.files import jsonl_journal, read_jsonl
from imageloop.protocols import GenerationRequest, GenerationResult, Vector
from imageloop.tools.indexing.indexer import FALLBACK_SIDE, SIDE_MARGIN, index_folder
from tests.fake_openai_server import FakeOpenAIServer, chat_completion, hung
from tests.fake_providers import FAKE_SETTINGS, FakeBackends, captioned_folder, fake_backends
from tests.fakes import FakeHashEmbedder, ScriptedGenerator

REPO = Path(__file__).resolve().parents[1]
FAKE = [option for role, model in FAKE_SETTINGS.items() for option in (f"--{role}", model)]
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest on a branch"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as made:
        yield made


@pytest.fixture
def library(fakes: FakeBackends, tmp_path: Path) -> Path:
    folder = captioned_folder(tmp_path / "photos")
    assert main(["index", str(folder), *FAKE]) == 0
    return folder


def interrupt(_: object) -> str:
    raise KeyboardInterrupt


class ScriptedFailure(ScriptedGenerator):
    """Draws the draft, then fails the way a library does (not an imageloop error)."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.requests:
            raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return super().generate(request)


def test_a_failure_that_is_no_user_error_is_still_recorded_as_the_runs_error(
    fakes: FakeBackends, library: Path, tmp_path: Path
) -> None:
    fakes.generator = ScriptedFailure()
    fakes.vlm.answers.extend([NOT_ALIGNED, CAPTIONS])
    out = tmp_path / "run"

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        main(["generate", "a blue jay", "--index", str(library), "--out", str(out), *FAKE])

    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "error"
    assert record["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 40.00 GiB"
    assert record["draft_image"] and (out / "report.html").is_file()


def test_an_interrupted_run_resumes_from_its_checkpoint_reusing_finished_nodes(
    fakes: FakeBackends, library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    fakes.vlm.answers.append(interrupt)  # Ctrl-C while the critic judges the draft

    code = main(["generate", "a blue jay", "--index", str(library), "--out", str(out), *FAKE])

    assert code == 130
    assert f"continue it with: imageloop generate --resume {out}" in capsys.readouterr().err
    drafts = len(fakes.generator.requests)
    fakes.vlm.answers.append(ALIGNED)

    assert main(["generate", "--resume", str(out), *FAKE]) == 0

    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "aligned" and record["error"] is None
    assert record["resumed"]["reused_steps"] >= 2  # prepare and the draft were not done again
    assert len(fakes.generator.requests) == drafts == 1


def test_resuming_with_another_knob_is_refused_in_one_line_never_recorded_and_ignored(
    fakes: FakeBackends, library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    fakes.vlm.answers.append(interrupt)
    assert main(["generate", "a blue jay", "--index", str(library), "--out", str(out), *FAKE]) == 130
    capsys.readouterr()

    code = main(["generate", "--resume", str(out), "--max-iterations", "4", *FAKE])

    [line] = capsys.readouterr().err.splitlines()
    assert code == 2 and line == (
        f"imageloop: error: the run in {out.resolve()} was started with max_iterations 1, not 4: "
        "resume it without those, or start anew"
    )
    fakes.vlm.answers.append(ALIGNED)
    assert main(["generate", "--resume", str(out), "--max-iterations", "1", *FAKE]) == 0  # the same value: fine
    assert json.loads((out / "run.json").read_text())["settings"]["max_iterations"] == 1


def test_ctrl_c_before_a_run_began_says_nothing_was_saved(
    fakes: FakeBackends, library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from imageloop.app.core import App

    monkeypatch.setattr(App, "retriever", interrupt_method)
    out = tmp_path / "run"

    code = main(["generate", "a blue jay", "--index", str(library), "--out", str(out), *FAKE])

    err = capsys.readouterr().err
    assert code == 130 and "stopped before the run began; nothing was saved" in err and "--resume" not in err


def test_ctrl_c_before_indexing_began_says_nothing_changed(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imageloop.app.core import App

    monkeypatch.setattr(App, "embedder", interrupt_method)
    folder = captioned_folder(tmp_path / "photos")

    code = main(["index", str(folder), *FAKE])

    err = capsys.readouterr().err
    assert code == 130 and "stopped before indexing began; nothing was changed" in err


def test_ctrl_c_in_a_searchs_first_round_does_not_point_at_a_session_nobody_saw(
    fakes: FakeBackends, library: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imageloop.app.core import App

    monkeypatch.setattr(App, "start_search", interrupt_method)

    code = main(["search", "--index", str(library), "--query", "a blue jay", "--feedback", "verbal", *FAKE])

    err = capsys.readouterr().err
    assert code == 130 and "stopped before the search showed its first round" in err and "--resume" not in err


def interrupt_method(*args: object, **kwargs: object) -> Any:
    raise KeyboardInterrupt


def test_a_half_line_left_by_a_crash_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    journal = tmp_path / "dialogues.jsonl"  # every evaluation's journal is written this way
    finished = json.dumps({"target_id": "a", "rounds": []})
    cut = json.dumps({"target_id": "b", "rounds": [{"round": 0}]})[:20]
    journal.write_text(finished + "\n" + cut)  # killed half-way through writing b

    with jsonl_journal(journal) as append:
        append({"target_id": "b", "rounds": []})  # b made again, on a line of its own

    assert [record["target_id"] for record in read_jsonl(journal)] == ["a", "b"]


class SideRecordingEmbedder(FakeHashEmbedder):
    """An image embedder that declares its tower's input side and records the pictures it is handed."""

    def __init__(self, image_side: int | None) -> None:
        super().__init__(embeds_images=True)
        if image_side is not None:
            self.image_side = image_side
        self.sizes: list[tuple[int, int]] = []

    def embed_images(self, images: Any) -> Vector:
        self.sizes += [image.size for image in images]
        return super().embed_images(images)


@pytest.mark.parametrize(("image_side", "held"), [(32, SIDE_MARGIN * 32), (None, FALLBACK_SIDE)])
def test_large_pictures_are_reduced_as_they_are_decoded_to_what_the_embedder_needs(
    tmp_path: Path, image_side: int | None, held: int
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (2400, 1800), (10, 120, 30)).save(folder / "large.jpg", quality=80)
    Image.new("RGB", (40, 30), (200, 20, 30)).save(folder / "small.png")
    embedder = SideRecordingEmbedder(image_side)

    index_folder(folder, embedder, None, progress=False)

    assert sorted(embedder.sizes) == sorted([(40, 30), (-(-held * 4 // 3), held)])  # the short side at `held`


def test_an_indexed_file_replaced_by_a_link_out_of_the_folder_is_never_retrieved_nor_sent(
    fakes: FakeBackends, library: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (24, 24), (1, 2, 3)).save(secret)
    (library / "jay.png").unlink()
    (library / "jay.png").symlink_to(secret)  # after indexing: the index still names jay.png
    fakes.vlm.answers.extend([NOT_ALIGNED, CAPTIONS, ALIGNED])
    out = tmp_path / "run"

    assert main(["generate", "a blue jay", "--index", str(library), "--out", str(out), *FAKE]) == 0

    sent = [reference.path.resolve() for request in fakes.generator.requests for reference in request.references]
    record = json.loads((out / "run.json").read_text())
    assert secret not in sent and all(Path(r["path"]).resolve() != secret for r in record["references"])


# Killed at any point: `imageloop generate` as a subprocess on a fake OpenAI endpoint that hangs at one call,
# killed there (kill -9, or SIGTERM), then resumed: the record was there all along, nothing checkpointed is
# drawn again, and the run finishes.

OPENAI_ROLES = {
    "IMAGELOOP_VLM": "openai:gpt-test",
    "IMAGELOOP_GENERATOR": "openai:gpt-image-1",
    "IMAGELOOP_EMBEDDER": "openai:embed-test",
}
CHAT, DRAW, EDIT, EMBED = "/v1/chat/completions", "/v1/images/generations", "/v1/images/edits", "/v1/embeddings"
# Each point: the call that hangs there, the chat answers before it, and those the resumed run needs.
KILL_POINTS: dict[str, tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = {
    "draft": (DRAW, [], [ALIGNED]),
    "critique": (CHAT, [], [ALIGNED]),
    "rewrite": (CHAT, [NOT_ALIGNED], [CAPTIONS, ALIGNED]),
    "retrieve": (EMBED, [NOT_ALIGNED, CAPTIONS], [ALIGNED]),
    "regenerate": (EDIT, [NOT_ALIGNED, CAPTIONS], [ALIGNED]),
}


def push_chat(server: FakeOpenAIServer, answers: list[dict[str, Any]]) -> None:
    for answer in answers:
        server.push(CHAT, 200, chat_completion(json.dumps(answer)))


def generate_process(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "imageloop.cli", "generate", *args, "-q"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_at_any_point_resumes_without_drawing_again_what_a_checkpoint_holds(
    point: str, how: signal.Signals, openai_server: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, **OPENAI_ROLES, "OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test"}
    env |= {"PYTHONPATH": str(REPO), "IMAGELOOP_SESSIONS": str(tmp_path / "sessions.sqlite")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    library = captioned_folder(tmp_path / "photos")
    App(load_settings()).index_folder(library)
    route, before, after = KILL_POINTS[point]
    push_chat(openai_server, before)
    openai_server.push_fault(route, hung())
    reached = len(openai_server.requests_to(route)) + (len(before) + 1 if route == CHAT else 1)
    out = tmp_path / "run"

    killed = generate_process(env, "a blue jay", "--index", str(library), "--out", str(out))
    wait_for(lambda: len(openai_server.requests_to(route)) >= reached)
    killed.send_signal(how)
    _, err = killed.communicate(timeout=60)

    assert json.loads((out / "run.json").read_text())["status"] == ("running" if how == signal.SIGKILL else "cancelled")
    if how == signal.SIGTERM:
        assert killed.returncode == 143 and f"continue it with: imageloop generate --resume {out}" in err
    drawn = len(openai_server.requests_to(DRAW))
    push_chat(openai_server, after)

    resumed = generate_process(env, "--resume", str(out))
    assert resumed.wait(timeout=120) == 0, resumed.communicate()[1]

    record = json.loads((out / "run.json").read_text())
    assert (record["status"], record["stop_reason"]) == ("finished", "aligned")
    assert len(openai_server.requests_to(DRAW)) - drawn == (1 if point == "draft" else 0)


def test_resuming_a_finished_run_again_calls_no_model_and_leaves_its_record_as_it_was(
    fakes: FakeBackends, library: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    fakes.vlm.answers.append(ALIGNED)
    assert main(["generate", "a blue jay", "--index", str(library), "--out", str(out), *FAKE]) == 0
    written = (out / "run.json").read_bytes()
    calls = (len(fakes.vlm.calls), len(fakes.generator.requests))

    assert main(["generate", "--resume", str(out), *FAKE]) == 0

    assert (out / "run.json").read_bytes() == written
    assert (len(fakes.vlm.calls), len(fakes.generator.requests)) == calls
