"""The browser UI's page, run in-process by Streamlit's own test runner on the scripted backends: what each
tab shows, what each click starts on the application layer, and what the page keeps (past work from the runs
folder, the open run or session in the address, uploads per browser session). tests/test_ui_browser.py
clicks through a served UI in a real Chromium."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imageloop.app import App
from imageloop.protocols import GenerationRequest, GenerationResult
from tests.fake_providers import FakeBackends
from tests.fakes import ScriptedGenerator
from tests.test_search_session import fakes, photos

pytest.importorskip("streamlit", reason="pip install 'imageloop[ui]'")
from streamlit.testing.v1 import AppTest

from imageloop.ui import tabs
from imageloop.ui.context import UIContext, set_context

NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest on a branch"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}
TIMEOUT_S = 60
JOBS = ("generate_job", "search_job", "rage_job", "compose_job")
__all__ = ["fakes", "photos"]  # fixtures shared with the session tests: the scripted backends, an indexed folder


def page(app: App, index: Path, **query: str) -> AppTest:
    """The page as `imageloop ui` serves it, over `app` and `index`, opened at an address with `query`."""
    set_context(UIContext(app=app, index=index))
    test = AppTest.from_file(str(Path(tabs.__file__).with_name("page.py")), default_timeout=TIMEOUT_S)
    test.query_params.update(query)
    test.run()
    assert not test.exception, test.exception
    return test


def settle(test: AppTest, app: App) -> AppTest:
    """Let the background run a click started end, then draw the page again (a browser's page polls for it)."""
    for key in JOBS:
        if key in test.session_state:
            job = app.jobs.get(test.session_state[key])
            assert job is not None and job.done.wait(TIMEOUT_S)
    test.run()
    assert not test.exception, test.exception
    return test


def click(test: AppTest, app: App, key: str) -> AppTest:
    test.button(key=key).click().run()
    assert not test.exception, test.exception
    return settle(test, app)


@pytest.fixture
def app(fakes: FakeBackends, tmp_path: Path) -> Iterator[App]:
    app = App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")
    yield app
    app.close()
    set_context(None)


def texts(test: AppTest) -> str:
    """Everything the page wrote as text (markdown, captions, status labels, errors)."""
    parts = [m.value for m in test.markdown] + [c.value for c in test.caption] + [e.value for e in test.error]
    parts += [s.proto.label for s in test.status] + [i.value for i in test.info] + [s.value for s in test.success]
    parts += [str(h.value) for h in test.subheader] + [w.value for w in test.warning]
    return "\n".join(parts)


def captions(test: AppTest) -> list[str]:
    return [caption for image in test.get("image") for caption in image.captions]  # type: ignore[attr-defined]


def generate(test: AppTest, app: App, prompt: str = "a blue jay on a snowy branch") -> AppTest:
    test.text_area(key="generate_prompt").input(prompt)
    return click(test, app, "FormSubmitter:generate-Generate")


def test_the_sidebar_names_the_index_and_its_size(app: App, photos: Path) -> None:
    test = page(app, photos)
    assert f"`{photos.resolve()}`" in texts(test) and "**Index** photos: 3 images" in texts(test)
    assert [tab.label for tab in test.tabs] == ["Generate", "Search", "Pick", "Compose"]


def test_generate_shows_draft_and_final_side_by_side_and_the_references_with_scores(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    fakes.vlm.answers.extend([NOT_ALIGNED, CAPTIONS, ALIGNED])
    test = generate(page(app, photos), app)
    shown = captions(test)
    assert shown[:2] == ["Draft (the prompt alone)", "Final"]
    [reference] = [caption for caption in shown if caption.startswith("blue jay · ")]
    assert float(reference.split(" · ")[1]) > 0
    assert "aligned with the prompt · stopped: aligned · 1 regeneration(s)" in texts(test)


def test_a_finished_run_offers_its_final_image_to_download_and_links_its_report(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    fakes.vlm.answers.append(ALIGNED)
    test = generate(page(app, photos), app)
    run = test.query_params["run"]
    [download] = test.download_button
    assert download.proto.label == f"Download imageloop-{run}.png"
    [report] = test.link_button
    assert report.proto.url == f"imageloop/runs/{run}/report.html"


def test_the_open_run_is_named_in_the_address_and_a_reload_shows_it_again(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    fakes.vlm.answers.append(ALIGNED)
    run = generate(page(app, photos), app).query_params["run"]
    reloaded = page(app, photos, run=str(run))  # a new browser session at the same address
    assert "aligned with the prompt · stopped: aligned" in texts(reloaded) and "Final" in captions(reloaded)


@dataclass
class FakeHeldGenerator(ScriptedGenerator):
    """Draws only once `release` is set, so a run can be watched (and stopped) while it is inside a step."""

    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.started.set()
        assert self.release.wait(TIMEOUT_S)
        return super().generate(request)


def test_stop_ends_the_run_at_its_next_step_records_it_cancelled_and_clears_the_progress(
    app: App, photos: Path, fakes: FakeBackends, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = FakeHeldGenerator()
    monkeypatch.setattr(fakes, "generator", held)
    test = page(app, photos)
    test.text_area(key="generate_prompt").input("a blue jay")
    test.button(key="FormSubmitter:generate-Generate").click().run()
    assert held.started.wait(TIMEOUT_S)
    test.run()
    [status] = test.status
    assert status.proto.label == "Running generate…"
    assert "[prepare] mode draft_first" in "\n".join(m.value for m in status.markdown)  # each step as it ends
    job = test.session_state["generate_job"]
    test.button(key=f"stop-{job}").click().run()
    held.release.set()  # the draft ends; the run stops before the next step
    settle(test, app)
    record = json.loads((app.runs_dir / job / "run.json").read_text())
    assert record["stop_reason"] == "cancelled" and record["error"] == f"cancelled: {tabs.STOPPED_HERE}"
    assert not test.status and not fakes.vlm.calls  # no status box left running; the critic never asked
    assert f"Stopped: cancelled: {tabs.STOPPED_HERE}" in texts(test)


def test_a_user_error_is_shown_in_one_line_and_the_page_survives(app: App, photos: Path) -> None:
    test = page(app, photos)
    test.button(key="FormSubmitter:generate-Generate").click().run()  # no prompt
    assert not test.exception
    assert "Not started: prompt" in texts(test)


def test_past_runs_and_searches_from_every_face_are_listed_and_reopen(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    fakes.vlm.answers.append(ALIGNED)
    record = app.generate("a jay from the terminal", photos)  # as the CLI would, in the same runs folder
    search = app.start_search(photos, "a tabby cat", knobs={"feedback": "verbal", "k": 2})  # as an agent would
    test = page(app, photos)
    labels = [button.label for button in test.button if button.key and button.key.startswith("past-")]
    assert labels == ["Search · a tabby cat · awaiting_feedback", "Generate · a jay from the terminal · aligned"]
    test.button(key=f"past-generate-{record['run_id']}").click().run()
    assert test.query_params["run"] == record["run_id"] and "Final" in captions(test)
    test.button(key=f"past-search-{search.session_id}").click().run()
    assert test.query_params["search"] == search.session_id and test.session_state["tab"] == "Search"
    assert "Round 0: a tabby cat" in texts(test)


def start_search(test: AppTest, app: App, query: str = "a blue jay") -> AppTest:
    test.text_input(key="search_query").input(query)
    test.selectbox(key="search_feedback").select("visual")
    test.number_input(key="search_k").set_value(3)
    return click(test, app, "FormSubmitter:search_start-Start search")


def test_search_shows_the_synthetic_image_and_the_top_results_of_a_round(app: App, photos: Path) -> None:
    test = start_search(page(app, photos), app)
    shown = captions(test)
    assert shown[0] == "What the system understood"
    assert len([caption for caption in shown if caption[0].isdigit()]) == 3
    assert "Round 0: a blue jay" in texts(test)  # rounds counted from 0, as on every face


def test_clicking_the_image_meant_ends_the_search_naming_the_image(app: App, photos: Path) -> None:
    test = start_search(page(app, photos), app)
    sid = test.query_params["search"]
    meant = app.show_search(sid).retrieved[1]
    click(test, app, f"found-{sid}-0-2")  # results are listed from 1
    name = Path(meant.path).name
    assert f"Found after 1 round(s): {name}" in texts(test) and name in captions(test)


def test_saying_what_differs_plays_the_next_round(app: App, photos: Path, fakes: FakeBackends) -> None:
    fakes.vlm.answers.append({"query": "a blue jay on a snowy branch in winter"})  # the refiner's new query
    test = start_search(page(app, photos), app)
    sid = test.query_params["search"]
    test.text_input(key=f"differs-{sid}-0").input("more snow")
    click(test, app, f"FormSubmitter:feedback-{sid}-0-Refine")
    assert "Round 1:" in texts(test)


def test_with_chatir_feedback_the_round_asks_the_systems_question(app: App, photos: Path, fakes: FakeBackends) -> None:
    fakes.vlm.answers.append("Is it snowing?")  # the ChatIR questioner's question
    test = page(app, photos)
    test.text_input(key="search_query").input("a blue jay")
    test.selectbox(key="search_feedback").select("chatir")
    click(test, app, "FormSubmitter:search_start-Start search")
    assert not test.exception, test.exception
    sid = test.query_params["search"]
    assert test.text_input(key=f"differs-{sid}-0").label.startswith("Is it snowing?")


def test_a_session_started_in_another_face_opens_by_id_and_a_reload_keeps_it(app: App, photos: Path) -> None:
    started = app.start_search(photos, "a tabby cat", knobs={"feedback": "verbal", "k": 2})
    test = page(app, photos)
    test.text_input(key="search_open_id").input(started.session_id)
    test.button(key="search_open").click().run()
    assert test.query_params["search"] == started.session_id
    assert "Round 0: a tabby cat" in texts(test)
    assert "Round 0: a tabby cat" in texts(page(app, photos, tab="Search", search=started.session_id))


def pick_candidates(test: AppTest, app: App, review: str = "none") -> list[dict[str, Any]]:
    test.text_input(key="rage_prompt").input("a blue jay on a branch")
    test.selectbox(key="rage_review").select(review)
    test.number_input(key="rage_k").set_value(3)
    click(test, app, "FormSubmitter:rage_start-Find references")
    return [c.model_dump() for c in app.show_rage(test.query_params["pick"]).candidates]


def tick(test: AppTest, app: App, *picks: dict[str, Any]) -> None:
    sid = test.query_params["pick"]
    for hit in picks:
        test.checkbox(key=f"rage|{sid}|{hit['id']}").check().run()
    [generate] = [b for b in test.button if b.label == "Generate with the ticked images"]
    generate.click().run()
    settle(test, app)


def test_pick_generates_with_the_ticked_references_in_the_order_ticked(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    test = page(app, photos)
    candidates = pick_candidates(test, app)
    assert len(candidates) == 3 and len([c for c in captions(test) if " · " in c]) >= 3
    tick(test, app, candidates[2], candidates[0])
    session = app.show_rage(test.query_params["pick"])
    assert session.status == "finished" and session.final_image and Path(session.final_image).is_file()
    assert [c.id for c in session.selected] == [candidates[2]["id"], candidates[0]["id"]]
    sent = fakes.generator.requests[-1].references
    assert [r.path for r in sent] == [Path(candidates[2]["path"]), Path(candidates[0]["path"])]
    assert [b.proto.label for b in test.download_button] == [f"Download imageloop-rage-{session.session_id}.png"]


def test_pick_with_a_person_reviewing_asks_before_it_finishes(app: App, photos: Path) -> None:
    test = page(app, photos)
    candidates = pick_candidates(test, app, review="person")
    tick(test, app, candidates[0])
    sid = test.query_params["pick"]
    assert app.show_rage(sid).status == "awaiting_review" and "Does this image do?" in captions(test)
    click(test, app, f"review-{sid}-accept")
    assert app.show_rage(sid).status == "finished"


def reference_png(color: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


def compose(test: AppTest, app: App, data: bytes, change: str) -> AppTest:
    test.file_uploader(key="compose_upload").set_value(("reference.png", data, "image/png"))
    test.text_input(key="compose_change").input(change)
    return click(test, app, "FormSubmitter:compose-Retrieve")


def test_compose_sends_the_uploaded_image_and_the_change_and_lists_the_matches(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    fakes.vlm.answers.extend(["a green square", "Edited Description: a tabby cat asleep on a sofa"])  # caption, edit
    test = compose(page(app, photos), app, reference_png(), "make it a cat")
    shown = test.session_state["compose_results"]
    uploaded = Path(shown["reference"])
    assert uploaded.parent == app.runs_dir / tabs.UPLOADS / test.session_state["browser_session"]
    assert Image.open(uploaded).size == (32, 32)
    assert "Looking for: a tabby cat asleep on a sofa" in texts(test)
    assert Path(shown["results"][0]["path"]).name == "cat.png"
    assert [c for c in captions(test) if c.startswith("1. cat.png · ")]


def test_each_browser_session_keeps_its_uploads_in_its_own_folder(app: App, photos: Path, fakes: FakeBackends) -> None:
    fakes.vlm.answers.extend(["a green square", "a cat", "a red square", "a dog"])
    first = compose(page(app, photos), app, reference_png((10, 200, 10)), "a cat")
    second = compose(page(app, photos), app, reference_png((200, 10, 10)), "a dog")
    folders = {Path(test.session_state["compose_results"]["reference"]).parent for test in (first, second)}
    assert len(folders) == 2 and all(folder.parent == app.runs_dir / tabs.UPLOADS for folder in folders)


def test_an_upload_that_is_not_an_image_is_refused_in_one_line(app: App, photos: Path) -> None:
    test = page(app, photos)
    test.file_uploader(key="compose_upload").set_value(("reference.png", b"not a png", "image/png"))
    test.text_input(key="compose_change").input("in winter")
    test.button(key="FormSubmitter:compose-Retrieve").click().run()
    assert not test.exception and "not a readable image" in texts(test)
