"""`imageloop ui` served for real and clicked through in headless Chromium (Debian's, driven by Playwright):
a whole ImageRAG run and a GenIR session, on OpenAI-API backends answered by a local fake server.

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

import pytest
from PIL import Image, ImageDraw

from imageloop.cli import main
from tests.fake_openai_server import FakeOpenAIServer, chat_completion
from tests.test_cli import openai_env
from tests.test_report import chromium

pytest.importorskip("streamlit", reason="pip install 'imageloop[ui]'")

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


def test_a_person_runs_imagerag_and_a_genir_search_in_the_browser(
    served: str, openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
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
            page = browser.new_page(viewport={"width": 1280, "height": 1180})
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(served)
            page.set_default_timeout(STEP_TIMEOUT_MS)

            # Generate: a whole ImageRAG run, the steps streaming into the status box.
            page.get_by_label("Prompt").first.fill("a blue jay on a snowy branch")
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("aligned with the prompt · stopped: aligned").wait_for()
            images = _loaded_images(page)
            assert images["Draft (the prompt alone)"] > 0 and images["Final"] > 0
            assert [c for c in images if re.fullmatch(r"blue jay · -?\d\.\d{3}", c)]  # the reference and its score
            shot = os.environ.get("IMAGELOOP_UI_SCREENSHOT")
            if shot:
                page.screenshot(path=shot)

            # Search: the first round drawn and retrieved; click the image meant.
            page.get_by_role("tab", name="Search").click()
            page.get_by_label("What are you looking for?").fill("a blue jay")
            page.get_by_role("button", name="Start search").click()
            page.get_by_text("Round 0: a blue jay").wait_for()
            page.get_by_text("What the system understood").wait_for()
            assert "What the system understood" in _loaded_images(page)
            page.get_by_role("button", name="This one").nth(0).click()
            page.get_by_text("Found after 1 round(s)").wait_for()
        finally:
            browser.close()
    assert problems == []
    [record] = (tmp_path / "runs").glob("*/run.json")
    assert json.loads(record.read_text())["stop_reason"] == "aligned"


def _loaded_images(page: Any) -> dict[str, int]:
    """Every image on the page that finished loading, by its caption (or alt text): its natural width."""
    # Streamlit draws an element's skeleton first and the image once its code has loaded.
    page.wait_for_function(
        "!document.querySelector('[data-testid=stSkeleton]') && Array.from(document.images).every(i => i.complete)"
    )
    script = """Array.from(document.querySelectorAll('[data-testid="stImage"]'), figure => {
        const img = figure.querySelector('img');
        const caption = figure.querySelector('[data-testid="stImageCaption"]');
        return [caption ? caption.innerText : img.alt, img.naturalWidth];
    })"""
    return dict(page.evaluate(script))
