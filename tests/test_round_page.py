"""The page a person at a terminal reads for each GenIR round (`round_N.html`): the drawing large beside the
numbered results, how to answer, the session id, and every earlier round; checked in headless Chromium too."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from imageloop.app import App
from imageloop.app.results import SearchView
from imageloop.app.round_page import DRAWING_WIDTH
from tests.fake_providers import FakeBackends
from tests.test_report import chromium
from tests.test_search_session import fakes, photos

__all__ = ["fakes", "photos"]  # the scripted backends and an indexed folder, shared with the session tests
BOXES = "Array.from(document.images, i => ({src: i.getAttribute('src'), ...i.getBoundingClientRect().toJSON()}))"


class _Page(HTMLParser):
    """The text of a page and its images' sources."""

    def __init__(self) -> None:
        super().__init__()
        self.text, self.images = "", []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(str(dict(attrs)["src"]))

    def handle_data(self, data: str) -> None:
        self.text += data


def read(page: str | None) -> _Page:
    assert page is not None
    parsed = _Page()
    parsed.feed(Path(page).read_text(encoding="utf-8"))
    return parsed


@pytest.fixture
def app(fakes: FakeBackends, tmp_path: Path) -> App:
    return App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")


def second_round(app: App, photos: Path, fakes: FakeBackends) -> tuple[SearchView, SearchView]:
    first = app.start_search(photos, "a blue jay", knobs={"k": 3, "feedback": "visual"})
    fakes.vlm.answers.append({"query": "a blue jay on a snowy branch"})  # the refiner folds the answer in
    return first, app.continue_search(first.session_id, "more snow")


def test_the_page_shows_the_drawing_then_the_results_numbered_as_listed_and_how_to_answer(
    app: App, photos: Path
) -> None:
    shown = app.start_search(photos, "a blue jay", knobs={"k": 3, "feedback": "visual"})
    page = read(shown.page)
    assert page.images[0] == "round_0.png" and len(page.images) == 1 + 3
    for hit in shown.retrieved:
        assert f"{hit.position}. {Path(hit.path).name} ({hit.score:.3f})" in page.text
    assert "found: N" in page.text and f"imageloop search --resume {shown.session_id}" in page.text


def test_the_page_of_a_later_round_keeps_every_earlier_round_with_the_answer_given(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    first, second = second_round(app, photos, fakes)
    page = read(second.page)
    assert "Round 1: a blue jay on a snowy branch" in page.text
    assert "Earlier rounds" in page.text and "Round 0: a blue jay" in page.text and "Answered: more snow" in page.text
    assert page.images.count("round_0.png") == 1 and page.images[0] == "round_1.png"
    assert {Path(r.path).resolve().as_uri() for r in first.retrieved} <= set(page.images)


def test_in_a_browser_the_drawing_is_shown_large_beside_the_results(
    app: App, photos: Path, fakes: FakeBackends
) -> None:
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    _, second = second_round(app, photos, fakes)
    assert second.page is not None
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(Path(second.page).as_uri())
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            boxes: list[dict[str, Any]] = page.evaluate(BOXES)
        finally:
            browser.close()
    drawing, first_result = boxes[0], boxes[1]
    assert drawing["src"] == "round_1.png" and drawing["width"] >= DRAWING_WIDTH  # a 16 px drawing, scaled up
    assert first_result["left"] > drawing["right"] and abs(first_result["top"] - drawing["top"]) < 20  # beside it
