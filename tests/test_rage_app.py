"""RAGE sessions in the application layer: checkpointed, resumable from any App, writing their run folder."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageloop.app import App
from imageloop.config import Settings
from imageloop.errors import ImageloopError
from imageloop.graphs.rage import SelectionError
from imageloop.protocols import GenerationRequest, GenerationResult
from imageloop.tools.images import open_image
from tests.fake_openai_server import FakeOpenAIServer
from tests.fake_providers import FakeBackends, fake_backends
from tests.image_folders import product_catalogue
from tests.test_report import parse

PROMPT = "the red canvas sneaker and the canvas backpack on a beach at sunset"


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as fakes:
        yield fakes


@pytest.fixture
def catalogue(tmp_path: Path, fakes: FakeBackends) -> Path:
    folder = product_catalogue(tmp_path / "catalogue")
    app = App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")
    app.index_folder(folder)
    app.close()
    return folder


@pytest.fixture
def app(tmp_path: Path, fakes: FakeBackends, catalogue: Path) -> Iterator[App]:
    app = App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")
    yield app
    app.close()


def names(items: list[dict[str, object]]) -> list[str]:
    return [Path(str(item["path"])).name for item in items]


def test_a_session_starts_at_the_candidates_with_its_record_and_page_written(
    app: App, catalogue: Path, fakes: FakeBackends
) -> None:
    shown = app.start_rage(PROMPT, catalogue)

    assert shown.status == "awaiting_selection" and fakes.generator.requests == []
    out = Path(shown.out_dir)
    assert out == app.runs_dir / f"rage-{shown.session_id}"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "awaiting_selection" and record["final_image"] is None
    assert [c["position"] for c in record["candidates"]] == list(range(1, len(record["candidates"]) + 1))
    page = (out / "report.html").read_text()
    assert all(f"{c['position']}.</b> {Path(c['path']).name}" in page for c in record["candidates"])
    assert page.count("<img ") >= len(record["candidates"])  # a thumbnail per candidate
    assert shown.question["candidates"] == record["candidates"] and "positions" in shown.ask


def test_the_picks_finish_the_run_folder_with_final_png_run_json_and_report(
    app: App, catalogue: Path, fakes: FakeBackends
) -> None:
    started = app.start_rage(PROMPT, catalogue)

    done = app.continue_rage(started.session_id, {"selected": "backpack.png, 1"})

    out = Path(done.out_dir)
    record = json.loads((out / "run.json").read_text())
    assert {"prompt", "candidates", "selected", "images", "final_image", "stop_reason"} <= set(record)
    assert (record["prompt"], record["status"], record["stop_reason"]) == (PROMPT, "finished", "generated")
    assert all({"id", "path", "caption", "score"} <= set(c) for c in record["candidates"])
    assert names(record["selected"]) == ["backpack.png", Path(record["candidates"][0]["path"]).name]
    assert record["final_image"] == str((out / "final.png").resolve()) and (out / "final.png").is_file()
    [image] = record["images"]
    assert Path(image["path"]).is_file() and names([{"path": p} for p in image["references"]]) == names(
        record["selected"]
    )
    page = (out / "report.html").read_text()
    assert "Picked, in order" in page and "Generations" in page and "pick 1" in page
    [request] = fakes.generator.requests
    assert (request.prompt, request.template) == (PROMPT, "verbatim")


def test_the_report_links_every_image_inside_the_run_folder_and_escapes_the_prompt(app: App, catalogue: Path) -> None:
    started = app.start_rage("a <b>bold</b> sneaker", catalogue, knobs={"review": "person"})
    app.continue_rage(started.session_id, ["2", "1"])
    out = Path(started.out_dir)

    page = parse(out / "report.html")

    assert "a <b>bold</b> sneaker" in page.text and "<b>bold</b>" not in (out / "report.html").read_text()
    assert "awaiting review" in page.text and "pick 2" in page.text
    assert len(page.images) == len(started.candidates) + 2 + 1  # candidates, picks, the generation
    assert all(not src.startswith(("/", "file:", "http")) and (out / src).is_file() for src in page.images)


def test_a_pick_that_names_nothing_is_refused_before_any_generation(
    app: App, catalogue: Path, fakes: FakeBackends
) -> None:
    started = app.start_rage(PROMPT, catalogue)

    with pytest.raises(SelectionError, match=r"'boots\.png' is not a candidate shown: .*1 "):
        app.continue_rage(started.session_id, {"selected": ["1", "boots.png"]})

    assert fakes.generator.requests == []
    assert app.show_rage(started.session_id).status == "awaiting_selection"


def test_a_session_continues_from_another_app_by_its_id_alone(
    tmp_path: Path, catalogue: Path, fakes: FakeBackends
) -> None:
    first = App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")
    started = first.start_rage(PROMPT, catalogue, knobs={"k": 3, "review": "person"}, where={"brand": "acme"})
    first.close()

    second = App(Settings.model_validate({**fakes.settings.model_dump(), "k": 10}), runs_dir=tmp_path / "elsewhere",
                 sessions_db=tmp_path / "sessions.sqlite")  # fmt: skip
    try:
        review = second.continue_rage(started.session_id, ["2"])
        assert review.status == "awaiting_review" and len(review.candidates) == 3  # the session's own k
        assert review.question["image"] == review.images[0]["path"]
        done = second.continue_rage(started.session_id, "accept")
    finally:
        second.close()

    assert (done.stop_reason, done.out_dir) == ("accepted", started.out_dir)
    assert len(fakes.generator.requests) == 1
    assert done.where == {"brand": "acme"}


def test_a_failed_generation_is_recorded_and_played_on_without_asking_again(
    app: App, catalogue: Path, fakes: FakeBackends
) -> None:
    started = app.start_rage(PROMPT, catalogue)
    drawn = fakes.generator.generate
    calls: list[GenerationRequest] = []

    def fails_once(request: GenerationRequest) -> GenerationResult:
        calls.append(request)
        if len(calls) == 1:
            raise ImageloopError("the endpoint is down")
        return drawn(request)

    fakes.generator.generate = fails_once  # type: ignore[method-assign]
    with pytest.raises(ImageloopError, match="the endpoint is down"):
        app.continue_rage(started.session_id, ["1"])

    failed = json.loads((Path(started.out_dir) / "run.json").read_text())
    assert (failed["status"], failed["stop_reason"], failed["error"]) == ("incomplete", "error", "the endpoint is down")
    done = app.continue_rage(started.session_id, None)
    assert (done.status, done.stop_reason, len(calls)) == ("finished", "generated", 2)


def test_a_finished_session_refuses_another_answer(app: App, catalogue: Path) -> None:
    started = app.start_rage(PROMPT, catalogue, knobs={"auto_select": 1})
    assert started.status == "finished"

    with pytest.raises(ImageloopError, match="has finished \\(generated\\): start another"):
        app.continue_rage(started.session_id, ["1"])
    with pytest.raises(ImageloopError, match="is finished"):
        app.check_rage_answer(started.session_id, ["1"])


def test_unknown_sessions_knobs_and_occupied_folders_are_one_line_errors(app: App, catalogue: Path) -> None:
    with pytest.raises(ImageloopError, match="no RAGE session 'aaaaaaaaaaaa'"):
        app.show_rage("aaaaaaaaaaaa")
    with pytest.raises(ImageloopError, match="unknown rage knob 'mode'"):
        app.start_rage(PROMPT, catalogue, knobs={"mode": "generation"})
    with pytest.raises(ImageloopError, match=r"max_generations 11 is out of range: 1\.\.10"):
        app.start_rage(PROMPT, catalogue, knobs={"max_generations": 11})
    done = app.start_rage(PROMPT, catalogue, knobs={"auto_select": 1})
    with pytest.raises(ImageloopError, match="already holds a run"):
        app.start_rage(PROMPT, catalogue, out_dir=done.out_dir)


# The verbatim prompt and the picks, in pick order, reach images.edit on an OpenAI-compatible server.


def test_the_prompt_verbatim_and_the_picks_in_pick_order_reach_images_edit(
    tmp_path: Path, catalogue: Path, fakes: FakeBackends, openai_server: FakeOpenAIServer
) -> None:
    settings = Settings.model_validate(
        {**fakes.settings.model_dump(), "generator": "openai:gpt-image-1",
         "generator_base_url": openai_server.base_url, "generator_api_key": "sk-test"}
    )  # fmt: skip
    app = App(settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")
    try:
        started = app.start_rage(PROMPT, catalogue)
        done = app.continue_rage(started.session_id, ["mug.png", "red-sneaker", "tote.png"])
    finally:
        app.close()

    [edit] = openai_server.requests_to("/v1/images/edits")
    [prompt] = edit.fields("prompt")
    assert prompt.content.decode() == PROMPT
    sent = [np.asarray(Image.open(io.BytesIO(part.content)).convert("RGB")) for part in edit.fields("image[]")]
    picked = [np.asarray(open_image(catalogue / name)) for name in ("mug.png", "red-sneaker.png", "tote.png")]
    assert len(sent) == 3 and all(np.array_equal(a, b) for a, b in zip(sent, picked, strict=True))
    assert openai_server.requests_to("/v1/images/generations") == []
    assert done.images[0]["prompt_used"] == PROMPT and Path(done.final_image).is_file()
