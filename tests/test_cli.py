"""The command line end to end: `imageloop index` and `imageloop generate --profile openai` against a
real local HTTP server speaking the OpenAI API."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imageloop.cli import main
from imageloop.tools.indexing.image_index import open_index
from tests.fake_openai_server import FakeOpenAIServer, chat_completion

PROMPT = "a Cyanocitta cristata perched on a snowy branch"


@pytest.fixture
def openai_env(openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAIServer:
    """Point the openai profile at the local fake server, as a user would with OPENAI_BASE_URL."""
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return openai_server


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "my_images"
    (folder / "birds").mkdir(parents=True)
    Image.new("RGB", (32, 32), (30, 60, 200)).save(folder / "birds" / "jay.png")
    (folder / "birds" / "jay.txt").write_text("a blue jay (Cyanocitta cristata) with a blue crest on a branch")
    Image.new("RGB", (32, 32), (240, 240, 250)).save(folder / "snow.jpg")
    (folder / "snow.txt").write_text("a snowy branch in winter")
    Image.new("RGB", (32, 32), (200, 120, 40)).save(folder / "cat.png")  # no sidecar: the captioner writes it
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def index(folder: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    assert main(["index", str(folder), "--profile", "openai", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_index_captions_embeds_and_reports_corrupt_files(
    openai_env: FakeOpenAIServer, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    openai_env.push("/v1/chat/completions", 200, chat_completion("a tabby cat asleep on a sofa"))
    summary = index(image_folder, capsys)
    assert {k: summary[k] for k in ("indexed", "skipped", "failed", "total")} == {
        "indexed": 3, "skipped": 0, "failed": 1, "total": 4,
    }  # fmt: skip
    captioned = openai_env.requests_to("/v1/chat/completions")
    assert len(captioned) == 1  # the two images with sidecars were not sent to the VLM
    embedded = [t for r in openai_env.requests_to("/v1/embeddings") for t in r.json["input"]]
    assert "a tabby cat asleep on a sofa" in embedded and "a snowy branch in winter" in embedded


def test_reindexing_adds_nothing(
    openai_env: FakeOpenAIServer, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    openai_env.push("/v1/chat/completions", 200, chat_completion("a tabby cat asleep on a sofa"))
    index(image_folder, capsys)
    sent = len(openai_env.requests)
    again = index(image_folder, capsys)
    assert (again["indexed"], again["skipped"], again["failed"]) == (0, 3, 1)
    assert len(openai_env.requests) == sent  # nothing captioned or embedded twice


def test_generate_writes_images_references_and_record(
    openai_env: FakeOpenAIServer, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    openai_env.push("/v1/chat/completions", 200, chat_completion("a tabby cat asleep on a sofa"))
    index(image_folder, capsys)
    critic = {"aligned": False, "missing_concepts": ["Cyanocitta cristata"]}
    captions = {"captions": [{"concept": "Cyanocitta cristata", "caption": "a blue jay with a blue crest"}]}
    for answer in (critic, captions, {"aligned": True, "missing_concepts": []}):
        openai_env.push("/v1/chat/completions", 200, chat_completion(json.dumps(answer)))
    out = tmp_path / "runs" / "jay"

    code = main(["generate", PROMPT, "--index", str(image_folder), "--profile", "openai", "--out", str(out)])

    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert (record["aligned"], record["iterations"], record["stop_reason"]) == (True, 1, "aligned")
    assert record["prompt"] == PROMPT and record["mode"] == "draft_first"
    assert Path(record["final_image"]) == (out / "final.png").resolve() and (out / "final.png").exists()
    assert Path(record["draft_image"]) == (out / "draft.png").resolve() and (out / "draft.png").exists()
    [reference] = record["references"]
    assert set(reference) >= {"path", "caption", "score"} and Path(reference["path"]).exists()
    assert [s["node"] for s in record["steps"]][:3] == ["prepare", "generate_draft", "critic"]
    assert all(isinstance(s["seconds"], float) for s in record["steps"])
    [edit] = openai_env.requests_to("/v1/images/edits")
    [sent] = edit.fields("image[]")
    sent_pixels = np.asarray(Image.open(io.BytesIO(sent.content)).convert("RGB"))
    assert np.array_equal(sent_pixels, np.asarray(Image.open(reference["path"]).convert("RGB")))
    sent_prompt = edit.fields("prompt")[0].content.decode()
    assert sent_prompt.startswith("According to these images of ") and sent_prompt.endswith(
        f": image 1, generate {PROMPT}"
    )
    assert "[critic]" in capsys.readouterr().err  # progress was shown


def test_generate_refuses_an_index_built_with_another_embedder(
    openai_env: FakeOpenAIServer, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    openai_env.push("/v1/chat/completions", 200, chat_completion("a tabby cat asleep on a sofa"))
    index(image_folder, capsys)
    args = ["generate", PROMPT, "--index", str(image_folder), "--profile", "openai", "--out", str(tmp_path / "r")]
    code = main([*args, "--embedder", "openai:text-embedding-3-large"])
    err = capsys.readouterr().err
    assert code == 2
    assert "openai:text-embedding-3-small" in err and "openai:text-embedding-3-large" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vlm", "nonsense"], "expected PROVIDER:MODEL"),
        (["--generator", "dalle:3"], "unknown generator provider 'dalle'"),
        (["--profile", "gpu"], "unknown profile 'gpu'"),
        (["--max-iterations", "0"], "max_iterations"),
    ],
)
def test_bad_options_get_one_line_errors(
    args: list[str], message: str, openai_env: FakeOpenAIServer, image_folder: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    openai_env.push("/v1/chat/completions", 200, chat_completion("a tabby cat asleep on a sofa"))
    index(image_folder, capsys)
    base = ["generate", PROMPT, "--index", str(image_folder), "--out", str(tmp_path / "r")]
    code = main([*base, "--profile", "openai", *args] if "--profile" not in args else [*base, *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_missing_index_is_a_clear_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "photos"
    empty.mkdir()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    code = main(["generate", "x", "--index", str(empty), "--out", str(tmp_path / "o"), "--profile", "openai"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"imageloop: error: no imageloop index at {empty}: index {empty} first"
    assert not (empty / ".imageloop").exists()


def test_unreachable_endpoint_is_a_clear_error(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (image_folder / "cat.png").unlink()  # every image has a sidecar caption: only the embedder is called
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("IMAGELOOP_EMBEDDER_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens on port 9
    code = main(["index", str(image_folder), "--profile", "openai"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot reach http://127.0.0.1:9/v1" in err and "Traceback" not in err
    assert open_index(image_folder).count() == 0  # nothing half-written


def test_importing_the_cli_imports_no_model_library() -> None:
    heavy = "{'torch', 'diffusers', 'transformers', 'open_clip', 'langgraph', 'chromadb'}"
    probe = f"import sys, imageloop.cli; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
