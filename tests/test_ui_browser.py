"""`imageloop ui` served for real and clicked through in headless Chromium (Debian's, driven by Playwright), on
OpenAI-API backends answered by a local fake server: past work reopened, a whole ImageRAG run (its final image at
its size, zoomed, downloaded; its report), a reload, a run stopped, and a GenIR session.

Set IMAGELOOP_UI_SCREENSHOT=docs/ui.png to write the README's screenshot from the same run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from PIL import Image, ImageDraw

from imageloop.cli import main
from tests.fake_openai_server import FakeOpenAIServer, Fault, chat_completion
from tests.test_cli import openai_env
from tests.test_report import chromium

pytest.importorskip("streamlit", reason="pip install 'imageloop[ui]'")
from imageloop.ui.tabs import STOPPED_HERE, UPLOADS

MODELS = [
    "--vlm",
    "openai:gpt-4.1-mini",
    "--generator",
    "openai:gpt-image-1",
    "--embedder",
    "openai:text-embedding-3-small",
]
PHOTOS = {
    "jay": ("a blue jay with a blue crest on a branch", (40, 90, 200)),
    "snow": ("a snowy branch in winter", (225, 230, 240)),
    "cat": ("a tabby cat asleep on a sofa", (200, 130, 60)),
    "print": ("an ukiyo-e woodblock print of a bird", (170, 60, 50)),
}
CRITIQUE = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest on a branch"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}
__all__ = ["openai_env"]  # the OpenAI backends (ours and the served UI's) on the fake server, from the CLI tests
START_TIMEOUT_S = 90
STEP_TIMEOUT_MS = 90_000


def picture(color: tuple[int, int, int], size: int = 160) -> Image.Image:
    """A small picture: a coloured disc on a light ground (a stand-in for a photo, honest about it)."""
    image = Image.new("RGB", (size, size), (245, 243, 238))
    ImageDraw.Draw(image).ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=color)
    return image


def picture_b64(color: tuple[int, int, int]) -> str:
    """`picture(color)` as the Images API returns it."""
    buffer = io.BytesIO()
    picture(color, 256).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def indexed_photos(folder: Path) -> Path:
    """A few pictures with captions, indexed with the OpenAI embedder (the fake server answers)."""
    folder.mkdir()
    for name, (caption, color) in PHOTOS.items():
        picture(color).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    assert main(["index", str(folder), *MODELS, "--quiet"]) == 0
    return folder


@contextmanager
def serving(photos: Path, cwd: Path, *options: str) -> Iterator[str]:
    """`imageloop ui --index PHOTOS --port 0 OPTIONS` as a subprocess; yields the link it prints."""
    command = [sys.executable, "-m", "imageloop", "ui", "--index", str(photos), "--port", "0", *MODELS, *options]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and "open http" not in line:
            line = server.stderr.readline()
            assert line or server.poll() is None, "imageloop ui exited before serving"
        match = re.search(r"open (http://\S+)", line)
        assert match, f"no link printed: {line!r}"
        yield match.group(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def served(openai_env: FakeOpenAIServer, tmp_path: Path) -> Iterator[str]:
    """An indexed folder and `imageloop ui` serving it on this machine; yields the URL."""
    with serving(indexed_photos(tmp_path / "photos"), tmp_path) as link:
        yield link


def test_a_person_runs_imagerag_keeps_it_stops_one_and_searches_in_the_browser(
    served: str, openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    earlier = terminal_run(openai_server, tmp_path / "photos", runs)  # another face's run, in the same runs folder
    for answer in (CRITIQUE, CAPTIONS, ALIGNED):
        openai_server.push("/v1/chat/completions", 200, chat_completion(json.dumps(answer)))
    for route, color in (("/v1/images/generations", (150, 150, 150)), ("/v1/images/edits", (40, 90, 200))):
        openai_server.push(route, 200, {"created": 0, "data": [{"b64_json": picture_b64(color)}]})
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1180}, accept_downloads=True)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(served)
            page.set_default_timeout(STEP_TIMEOUT_MS)

            # Past work from the runs folder: the terminal's run is listed, and reopens.
            page.get_by_role("button", name="Generate · a jay from the terminal · aligned").click()
            page.get_by_text("“a jay from the terminal”").wait_for()
            assert f"run={earlier}" in page.url

            # Generate: a whole ImageRAG run, its steps streaming in; the final image at its own size, zoomable,
            # to download; the report beside it.
            page.get_by_role("textbox", name="Prompt").fill("a blue jay on a snowy branch")
            page.get_by_role("button", name="Generate", exact=True).click()
            page.get_by_text("“a blue jay on a snowy branch”").wait_for()
            page.get_by_text("aligned with the prompt · stopped: aligned").wait_for()
            page.get_by_text("Final", exact=True).wait_for()
            run = re.search(r"run=([0-9a-f]{12})", page.url)
            assert run, page.url
            images = _loaded_images(page)
            assert images["Final"] == (256, 256) and images["Draft (the prompt alone)"][0] > 0  # drawn at 256 px
            assert [c for c in images if re.fullmatch(r"blue jay · -?\d\.\d{3}", c)]  # the reference and its score
            shot = os.environ.get("IMAGELOOP_UI_SCREENSHOT")
            if shot:
                page.screenshot(path=shot)
            _zoom(page, "Final")
            with page.expect_download() as downloading:
                page.get_by_role("button", name=f"Download imageloop-{run[1]}.png").click()
            assert Image.open(downloading.value.path()).size == (256, 256)
            report = page.get_by_role("link", name="Open the report").get_attribute("href")
            answer = page.request.get(urljoin(served, report or ""))
            assert answer.ok and "a blue jay on a snowy branch" in answer.text()

            # A reload shows the same run.
            page.reload()
            page.get_by_text("“a blue jay on a snowy branch”").wait_for()

            # Stop: the run ends at its next step, is recorded as cancelled, and nothing spins.
            # A slow critic for as long as the run may ask it: a queued answer the stopped run never
            # asked for would be the next step's answer instead.
            openai_server.always("/v1/chat/completions", Fault(200, json.dumps(chat_completion(
                json.dumps(ALIGNED))).encode(), delay_s=3.0))  # fmt: skip
            page.get_by_role("textbox", name="Prompt").fill("a jay to stop")
            page.get_by_role("button", name="Generate", exact=True).click()
            page.locator("[class*='st-key-stop-'] button").click()  # the page's own Stop, not Streamlit's
            page.get_by_text(f"Stopped: cancelled: {STOPPED_HERE}").wait_for()
            assert page.get_by_text("Running generate").count() == 0
            stopped = re.search(r"run=([0-9a-f]{12})", page.url)
            assert stopped and json.loads((runs / stopped[1] / "run.json").read_text())["stop_reason"] == "cancelled"
            openai_server.always("/v1/chat/completions", None)

            # Search: the first round drawn and retrieved; click the image meant; it is named.
            page.get_by_role("tab", name="Search").click()
            page.get_by_label("What are you looking for?").fill("a blue jay")
            page.get_by_role("button", name="Start search").click()
            page.get_by_text("Round 0: a blue jay").wait_for()
            page.get_by_text("What the system understood").wait_for()
            assert _loaded_images(page)["What the system understood"][0] > 0
            page.reload()  # the session is in the address: a reload shows the same round
            page.get_by_text("Round 0: a blue jay").wait_for()
            page.get_by_role("button", name="This one").nth(0).click()
            page.get_by_text(re.compile(r"Found after 1 round\(s\): \w+\.png")).wait_for()

            # Compose, from two browser sessions at once: each keeps its upload in its own folder.
            reference = tmp_path / "reference.png"
            picture((30, 160, 40)).save(reference)
            for visitor in (page, browser.new_page()):
                for answer in ("a green disc", "Edited Description: a tabby cat asleep on a sofa"):
                    openai_server.push("/v1/chat/completions", 200, chat_completion(answer))
                visitor.set_default_timeout(STEP_TIMEOUT_MS)
                visitor.goto(urljoin(served, "?tab=Compose"))
                visitor.locator("input[type=file]").set_input_files(reference)
                visitor.get_by_label("What should be different?").fill("make it a cat")
                visitor.get_by_role("button", name="Retrieve").click()
                visitor.get_by_text("Looking for: a tabby cat asleep on a sofa").wait_for()
        finally:
            browser.close()
    assert problems == []
    assert len([folder for folder in (runs / UPLOADS).iterdir() if folder.is_dir()]) == 2


def terminal_run(openai_server: FakeOpenAIServer, photos: Path, runs: Path) -> str:
    """`imageloop generate` from a terminal into the UI's runs folder; returns its run's folder name."""
    openai_server.push("/v1/chat/completions", 200, chat_completion(json.dumps(ALIGNED)))
    out = runs / "from-terminal"
    assert main(["generate", "a jay from the terminal", "--index", str(photos), "--out", str(out), *MODELS, "-q"]) == 0
    return out.name


def _zoom(page: Any, caption: str) -> None:
    """Open the image captioned `caption` full screen (Streamlit's toolbar on hover), then close it again."""
    figure = page.locator('[data-testid="stImage"]', has=page.get_by_text(caption, exact=True)).first
    figure.hover()
    page.get_by_role("button", name="Fullscreen").first.click()
    page.get_by_role("button", name="Close fullscreen").first.wait_for()
    page.keyboard.press("Escape")


def _loaded_images(page: Any) -> dict[str, tuple[int, int]]:
    """Every image on the page that finished loading, by its caption (or alt text): its natural and shown widths."""
    # Streamlit draws an element's skeleton first and the image once its code has loaded.
    page.wait_for_function(
        "!document.querySelector('[data-testid=stSkeleton]') && Array.from(document.images).every(i => i.complete)"
    )
    script = """Array.from(document.querySelectorAll('[data-testid="stImage"]'), figure => {
        const img = figure.querySelector('img');
        const caption = figure.querySelector('[data-testid="stImageCaption"]');
        const shown = Math.round(img.getBoundingClientRect().width);
        return [caption ? caption.innerText : img.alt, [img.naturalWidth, shown]];
    })"""
    return {caption: tuple(sizes) for caption, sizes in page.evaluate(script)}
