"""Every ImageRAG run directory gets a report.html that works offline, checked in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imageloop.app import App
from imageloop.cli import main
from imageloop.errors import BackendError
from imageloop.protocols import Message
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FakeBackends, captioned_folder, fake_backends

PROMPT = 'a blue jay <b>on</b> a "snowy" branch & a cat'
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay", "<cat>"]}
CAPTIONS = {
    "captions": [
        {"concept": "blue jay", "caption": "a blue jay with a blue crest"},
        {"concept": "<cat>", "caption": "a tabby cat asleep"},
    ]
}
ALIGNED = {"aligned": True, "missing_concepts": []}
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch, [NOT_ALIGNED, CAPTIONS, ALIGNED]) as backends:
        yield backends


@pytest.fixture
def run_dir(fakes: FakeBackends, tmp_path: Path) -> Path:
    """A real run: draft, a critique naming two concepts, retrieval, a regeneration, an aligned verdict."""
    images = captioned_folder(tmp_path / "photos")
    index_folder(images, fakes.embedder, None, progress=False)
    out = tmp_path / "runs" / "jay"
    App(fakes.settings).generate(PROMPT, images, out_dir=out)
    return out


@dataclass
class Page:
    """What a report links to, read with the standard library's HTML parser."""

    text: str
    images: list[str]
    links: list[str]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page("", [], [])

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.page.images.append(str(values["src"]))
        for name in ("href", "src"):
            if values.get(name) and tag != "img":
                self.page.links.append(str(values[name]))

    def handle_data(self, data: str) -> None:
        self.page.text += data


def parse(report: Path) -> Page:
    collector = _Collector()
    collector.feed(report.read_text(encoding="utf-8"))
    return collector.page


def test_every_run_writes_a_report_of_what_it_saw_decided_and_drew(run_dir: Path) -> None:
    page = parse(run_dir / "report.html")
    assert PROMPT in page.text  # unescaped by the parser: the markup in the prompt was text, not tags
    for shown in ("final image", "draft (prompt alone)", "Iteration 0", "Iteration 1", "Timings", "aligned"):
        assert shown in page.text
    assert "not aligned, missing ['blue jay', '<cat>']" in page.text  # the critic's answer
    assert "a blue jay with a blue crest" in page.text and "a tabby cat asleep" in page.text  # retrieval captions
    assert "generate_with_references" in page.text and "finish" in page.text  # the step timings table
    # draft, final, two iteration images, references shown per iteration and in the references section
    assert len(page.images) >= 6


def test_markup_in_the_prompt_and_concepts_is_escaped(run_dir: Path) -> None:
    raw = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<b>on</b>" not in raw and "&lt;b&gt;on&lt;/b&gt;" in raw
    assert "<cat>" not in raw and "&lt;cat&gt;" in raw


def test_images_are_relative_links_inside_the_run_directory_and_nothing_is_external(run_dir: Path) -> None:
    page = parse(run_dir / "report.html")
    for link in [*page.images, *page.links]:
        if link.startswith("data:"):  # the empty favicon, so no browser asks for /favicon.ico
            assert link == "data:,"
            continue
        assert "://" not in link and not link.startswith("/"), link
        assert (run_dir / link).resolve().is_relative_to(run_dir.resolve()) and (run_dir / link).is_file(), link
    # References live in the indexed folder: the report carries thumbnails of them.
    assert any(link.startswith("report_files/") for link in page.images)


def test_a_moved_run_directory_regenerates_its_report_with_every_image(run_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "archive" / "jay"
    shutil.move(run_dir, moved)
    shutil.rmtree(tmp_path / "photos")  # the references' originals are gone too
    (moved / "report.html").unlink()

    assert main(["report", str(moved)]) == 0

    page = parse(moved / "report.html")
    assert "image not found" not in page.text
    assert all((moved / src).is_file() for src in page.images)


def test_report_of_a_folder_without_a_run_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"imageloop: error: {tmp_path} is not a run directory: it has no run.json"


def test_a_failed_run_still_gets_a_report_saying_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def endpoint_down(messages: list[Message]) -> Any:
        raise BackendError("the VLM endpoint is unreachable")

    with fake_backends(monkeypatch, [endpoint_down]) as fakes:
        images = captioned_folder(tmp_path / "photos")
        index_folder(images, fakes.embedder, None, progress=False)
        out = tmp_path / "runs" / "failed"
        with pytest.raises(BackendError):
            App(fakes.settings).generate("a blue jay", images, out_dir=out)
    page = parse(out / "report.html")
    assert "The run failed: the VLM endpoint is unreachable" in page.text
    assert "draft (prompt alone)" in page.text and all((out / src).is_file() for src in page.images)


def test_an_image_the_critic_could_not_judge_says_so_not_that_it_was_not_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with fake_backends(monkeypatch, ["no verdict here", "still none", ALIGNED]) as fakes:  # malformed, even repaired
        images = captioned_folder(tmp_path / "photos")
        index_folder(images, fakes.embedder, None, progress=False)
        App(fakes.settings).generate("a blue jay", images, out_dir=tmp_path / "run")
    text = parse(tmp_path / "run" / "report.html").text
    assert "critic: could not answer" in text and "critic: not asked" not in text


def chromium() -> str:
    found = next((c for c in CHROMIUM_CANDIDATES if Path(c).is_file()), None) or shutil.which("chromium")
    if found is None:
        pytest.skip("no Chromium binary: apt-get install -y chromium (Debian) to run the browser check")
    return found


def test_the_report_loads_in_headless_chromium_with_every_image_and_no_console_error(
    run_dir: Path, tmp_path: Path
) -> None:
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    problems: list[str] = []
    requested: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile
            executable_path=executable,
            headless=True,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
            ],
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
            page.on("request", lambda r: requested.append(r.url))
            page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images, i => [i.getAttribute('src'), i.naturalWidth])")
            title = page.title()
        finally:
            browser.close()
    assert problems == []
    assert title.startswith("imageloop run: a blue jay")
    assert len(images) >= 6
    assert [src for src, width in images if width <= 0] == []  # every image decoded
    assert all(url.startswith(("file://", "data:")) for url in requested), requested


def test_a_reference_thumbnail_is_made_once_and_again_only_when_its_source_changes(run_dir: Path) -> None:
    def made() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (run_dir / "report_files").glob("*.png")}

    first = made()
    source = run_dir.parent.parent / "photos" / "jay.png"

    assert main(["report", str(run_dir)]) == 0
    assert made() == first  # a page rendered again reuses them

    Image.new("RGB", (24, 24), (1, 2, 3)).save(source)
    later = max(first.values()) + 10**9
    os.utime(source, ns=(later, later))
    assert main(["report", str(run_dir)]) == 0
    [remade] = [name for name, mtime in made().items() if mtime != first[name]]
    assert Image.open(run_dir / "report_files" / remade).getpixel((0, 0)) == (1, 2, 3)
