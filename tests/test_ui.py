"""The browser UI's page, run in-process by Streamlit's own test runner on the scripted backends: what each
tab shows and what each click calls on the application layer. (tests/test_ui_browser.py clicks through a
served UI in a real Chromium.)"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imageloop.app import App
from tests.fake_providers import FakeBackends
from tests.test_search_session import fakes, photos

pytest.importorskip("streamlit", reason="pip install 'imageloop[ui]'")
from streamlit.testing.v1 import AppTest

from imageloop.ui import tabs
from imageloop.ui.context import UIContext, set_context

NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest on a branch"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}
TIMEOUT_S = 60
__all__ = ["fakes", "photos"]  # fixtures shared with the session tests: the scripted backends, an indexed folder


def page(app: App, index: Path) -> AppTest:
    """The page as `imageloop ui` serves it, over `app` and `index`."""
    set_context(UIContext(app=app, index=index))
    test = AppTest.from_file(str(Path(tabs.__file__).with_name("page.py")), default_timeout=TIMEOUT_S)
    test.run()
    assert not test.exception, test.exception
    return test


@pytest.fixture
def app(fakes: FakeBackends, tmp_path: Path) -> Iterator[App]:
    app = App(fakes.settings, runs_dir=tmp_path / "runs")
    yield app
    app.close()
    set_context(None)


def texts(test: AppTest) -> str:
    """Everything the page wrote as text (markdown, captions, status labels, errors)."""
    parts = [m.value for m in test.markdown] + [c.value for c in test.caption] + [e.value for e in test.error]
    parts += [s.proto.label for s in test.status] + [i.value for i in test.info] + [s.value for s in test.success]
    parts += [str(h.value) for h in test.subheader]
    return "\n".join(parts)


def captions(test: AppTest) -> list[str]:
    return [caption for image in test.get("image") for caption in image.captions]  # type: ignore[attr-defined]


def test_the_sidebar_names_the_index_and_its_size(app: App, photos: Path) -> None:
    test = page(app, photos)
    assert f"`{photos.resolve()}`" in texts(test) and "**Index** photos: 3 images" in texts(test)
    assert [tab.label for tab in test.tabs] == ["Generate", "Search", "Pick", "Compose"]


def test_generate_shows_draft_and_final_side_by_side_and_the_references_with_scores(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    fakes.vlm.answers.extend([NOT_ALIGNED, CAPTIONS, ALIGNED])
    test = page(app, photos)
    test.text_area[0].input("a blue jay on a snowy branch")
    test.button(key="FormSubmitter:generate-Generate").click().run()
    assert not test.exception, test.exception
    shown = captions(test)
    assert shown[:2] == ["Draft (the prompt alone)", "Final"]
    [reference] = [caption for caption in shown if caption.startswith("blue jay · ")]
    assert float(reference.split(" · ")[1]) > 0
    assert "aligned with the prompt · stopped: aligned · 1 regeneration(s)" in texts(test)


def test_generate_streams_each_step_into_its_status_box(app: App, photos: Path, fakes: FakeBackends) -> None:
    fakes.vlm.answers.extend([ALIGNED])
    test = page(app, photos)
    test.text_area[0].input("a blue jay")
    test.button(key="FormSubmitter:generate-Generate").click().run()
    [status] = test.status
    streamed = "\n".join(m.value for m in status.markdown)
    assert "**generate_draft** · drew a draft from the prompt alone" in streamed
    assert "**critic** · aligned with the prompt" in streamed and status.proto.label == "Done: aligned"


def test_a_user_error_is_shown_in_one_line_and_the_page_survives(app: App, photos: Path) -> None:
    test = page(app, photos)
    test.button(key="FormSubmitter:generate-Generate").click().run()  # no prompt
    assert not test.exception
    assert "Stopped: prompt" in texts(test)


def start_search(test: AppTest, query: str = "a blue jay") -> AppTest:
    test.text_input(key="search_query").input(query)
    test.selectbox(key="search_feedback").select("visual")
    test.number_input(key="search_k").set_value(3)
    test.button(key="FormSubmitter:search_start-Start search").click().run()
    assert not test.exception, test.exception
    return test


def test_search_shows_the_synthetic_image_and_the_top_results_of_a_round(app: App, photos: Path) -> None:
    test = start_search(page(app, photos))
    shown = captions(test)
    assert shown[0] == "What the system understood"
    assert len([caption for caption in shown if caption.startswith("#")]) == 3
    assert "Round 0: a blue jay" in texts(test)  # rounds counted from 0, as on every face


def test_clicking_the_image_meant_ends_the_search_with_it(app: App, photos: Path) -> None:
    test = start_search(page(app, photos))
    session = test.session_state["search"]
    meant = session["retrieved"][1]
    test.button(key=f"found-{session['session_id']}-0-2").click().run()  # results are listed from 1
    assert not test.exception, test.exception
    assert test.session_state["search"]["found_id"] == meant["id"]
    assert "Found after 1 round(s)" in texts(test) and meant["id"] in captions(test)


def test_saying_what_differs_plays_the_next_round(app: App, photos: Path, fakes: FakeBackends) -> None:
    fakes.vlm.answers.append({"query": "a blue jay on a snowy branch in winter"})  # the refiner's new query
    test = start_search(page(app, photos))
    sid = test.session_state["search"]["session_id"]
    test.text_input(key=f"differs-{sid}-0").input("more snow")
    test.button(key=f"FormSubmitter:feedback-{sid}-0-Refine").click().run()
    assert not test.exception, test.exception
    assert test.session_state["search"]["round"] == 1
    assert "Round 1:" in texts(test)


def test_with_chatir_feedback_the_round_asks_the_systems_question(app: App, photos: Path, fakes: FakeBackends) -> None:
    fakes.vlm.answers.append("Is it snowing?")  # the ChatIR questioner's question
    test = page(app, photos)
    test.text_input(key="search_query").input("a blue jay")
    test.selectbox(key="search_feedback").select("chatir")
    test.button(key="FormSubmitter:search_start-Start search").click().run()
    assert not test.exception, test.exception
    sid = test.session_state["search"]["session_id"]
    assert test.text_input(key=f"differs-{sid}-0").label.startswith("Is it snowing?")


def test_a_session_started_in_another_face_opens_by_id(app: App, photos: Path) -> None:
    started = app.start_search(photos, "a tabby cat", knobs={"feedback": "verbal", "k": 2})
    test = page(app, photos)
    test.text_input(key="search_open_id").input(started.session_id)
    test.button(key="search_open").click().run()
    assert test.session_state["search"]["session_id"] == started.session_id
    assert "Round 0: a tabby cat" in texts(test)


def pick_candidates(test: AppTest, review: str = "none") -> list[dict[str, Any]]:
    test.text_input(key="rage_prompt").input("a blue jay on a branch")
    test.selectbox(key="rage_review").select(review)
    test.number_input(key="rage_k").set_value(3)
    test.button(key="FormSubmitter:rage_start-Find references").click().run()
    assert not test.exception, test.exception
    candidates: list[dict[str, Any]] = test.session_state["rage"]["candidates"]
    return candidates


def tick(test: AppTest, *picks: dict[str, Any]) -> None:
    sid = test.session_state["rage"]["session_id"]
    for hit in picks:
        test.checkbox(key=f"rage|{sid}|{hit['id']}").check().run()
    [generate] = [b for b in test.button if b.label == "Generate with the ticked images"]
    generate.click().run()
    assert not test.exception, test.exception


def test_pick_generates_with_the_ticked_references_in_the_order_ticked(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    test = page(app, photos)
    candidates = pick_candidates(test)
    assert len(candidates) == 3 and len([c for c in captions(test) if " · " in c]) >= 3
    tick(test, candidates[2], candidates[0])
    session = test.session_state["rage"]
    assert session["status"] == "finished" and Path(session["final_image"]).is_file()
    assert [c["id"] for c in session["selected"]] == [candidates[2]["id"], candidates[0]["id"]]
    sent = fakes.generator.requests[-1].references
    assert [r.path for r in sent] == [Path(candidates[2]["path"]), Path(candidates[0]["path"])]


def test_pick_with_a_person_reviewing_asks_before_it_finishes(app: App, photos: Path) -> None:
    test = page(app, photos)
    candidates = pick_candidates(test, review="person")
    tick(test, candidates[0])
    assert test.session_state["rage"]["status"] == "awaiting_review"
    assert "Does this image do?" in captions(test)
    test.button(key=f"review-{test.session_state['rage']['session_id']}-accept").click().run()
    assert test.session_state["rage"]["status"] == "finished"


def test_compose_sends_the_uploaded_image_and_the_change_and_lists_the_matches(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    fakes.vlm.answers.extend(["a green square", "Edited Description: a tabby cat asleep on a sofa"])  # caption, edit
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, format="PNG")
    test = page(app, photos)
    test.file_uploader[0].set_value(("reference.png", buffer.getvalue(), "image/png"))
    test.text_input[-1].input("make it a cat")
    test.button(key="FormSubmitter:compose-Retrieve").click().run()
    assert not test.exception, test.exception
    shown = test.session_state["compose_results"]
    uploaded = Path(shown["reference"])
    assert uploaded.parent == app.runs_dir / tabs.UPLOADS and Image.open(uploaded).size == (32, 32)
    assert "Looking for: a tabby cat asleep on a sofa" in texts(test)
    assert Path(shown["results"][0]["path"]).name == "cat.png"
    assert [c for c in captions(test) if c.startswith("#1 · ")]


def test_an_upload_that_is_not_an_image_is_refused_in_one_line(app: App, photos: Path) -> None:
    test = page(app, photos)
    test.file_uploader[0].set_value(("reference.png", b"not a png", "image/png"))
    test.text_input[-1].input("in winter")
    test.button(key="FormSubmitter:compose-Retrieve").click().run()
    assert not test.exception and "not a readable image" in texts(test)
