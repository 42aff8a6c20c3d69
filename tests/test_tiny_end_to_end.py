"""The command line end to end on real tiny models (tiny:clip, tiny:sd, tiny:qwen2-vl), with the
simulated user's VLM served by a real local OpenAI-compatible server where answers must be scripted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageloop.cli import main
from tests.fake_openai_server import FakeOpenAIServer, chat_completion
from tests.image_folders import numbered_images


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One tiny-model cache for the module, away from the user's own."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("tiny-cache")
        patch.setenv("IMAGELOOP_TINY_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield cache


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real images (two with sidecar captions), indexed on the image route with tiny:clip, no VLM."""
    folder = tmp_path_factory.mktemp("photos")
    paths = numbered_images(folder, 6)
    paths[0].with_suffix(".txt").write_text("a blue jay on a snowy branch")
    paths[1].with_suffix(".txt").write_text("a snowy branch")
    assert main(["index", str(folder), "--embedder", "tiny:clip"]) == 0
    return folder


def last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_image_route_index_needs_no_vlm_and_reports_itself(photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["index-info", str(photos), "--json"]) == 0
    info = last_json(capsys)
    assert {k: info[k] for k in ("count", "embedder", "store", "route")} == {
        "count": 6, "embedder": "tiny:clip", "store": "embedded", "route": "image",
    }  # fmt: skip
    assert isinstance(info["dim"], int) and info["dim"] > 0


def test_tiny_profile_generates_and_says_its_pictures_are_noise(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("imageloop.tiny._noticed", False)  # the notice is once per process; indexing said it
    out = tmp_path / "run"
    code = main(["generate", "a blue jay on a snowy branch", "--index", str(photos), "--profile", "tiny",
                 "--out", str(out), "--size", "64x64", "--steps", "2"])  # fmt: skip
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    assert (out / "final.png").exists() and (out / "draft.png").exists() and (out / "report.html").exists()
    assert record["models"] == {"vlm": "tiny:qwen2-vl", "generator": "tiny:omnigen", "embedder": "tiny:clip"}
    assert record["stop_reason"] in {"aligned", "max_iterations", "no_reference_above_threshold"}
    assert "noise" in capsys.readouterr().err


def simulated_user(server: FakeOpenAIServer, queries: list[str]) -> None:
    for query in queries:
        server.push("/v1/chat/completions", 200, chat_completion(json.dumps({"differences": "d", "query": query})))


def test_genir_eval_reports_cumulative_hits_and_resumes(
    photos: Path, tmp_path: Path, openai_server: FakeOpenAIServer, capsys: pytest.CaptureFixture[str]
) -> None:
    targets = tmp_path / "targets.txt"
    targets.write_text(f"{photos / 'img02.png'}\n{photos / 'img04.png'}\n")
    # Per target: a first description, then one rewrite after round 0 (unless found at once).
    simulated_user(openai_server, ["a picture", "a greener picture", "a picture", "a redder picture"])
    args = ["eval", "genir", "--index", str(photos), "--targets", str(targets), "--rounds", "1", "--k", "2",
            "--feedback", "visual", "--embedder", "tiny:clip", "--generator", "tiny:sd", "--size", "64x64",
            "--vlm", "openai:scripted-vlm", "--vlm-base-url", openai_server.base_url,
            "--out", str(tmp_path / "eval"), "--json"]  # fmt: skip
    assert main(args) == 0
    summary = last_json(capsys)
    assert summary["k"] == 2 and summary["n_targets"] == 2
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]  # type: ignore[union-attr]  # round 0 + 1 refinement
    hits = [r["hits_at_k"] for r in rounds]  # type: ignore[union-attr]
    assert 0.0 <= hits[0] <= hits[1] <= 1.0  # cumulative
    assert rounds[0]["latency_s"] > 0  # type: ignore[index]
    dialogues = [json.loads(line) for line in (tmp_path / "eval" / "dialogues.jsonl").read_text().splitlines()]
    assert len(dialogues) == 2
    for dialogue in dialogues:
        first = dialogue["rounds"][0]
        assert isinstance(first["target_rank"], int) and Path(first["synthetic_image"]).exists()
        assert len(first["retrieved"]) == 2
    asked = len(openai_server.requests)
    assert main(args) == 0  # every target done: the re-run asks nothing
    assert len(openai_server.requests) == asked and last_json(capsys)["n_targets"] == 2


def test_interactive_search_finds_an_image_and_refuses_an_unknown_session(
    photos: Path, tmp_path: Path, openai_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    openai_server.push("/v1/chat/completions", 200, chat_completion(json.dumps({"query": "a greener picture"})))
    answers = iter(["", "greener please", "found: 1"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    common = ["--index", str(photos), "--embedder", "tiny:clip", "--generator", "tiny:sd", "--size", "64x64",
              "--vlm", "openai:scripted-vlm", "--vlm-base-url", openai_server.base_url,
              "--sessions", str(tmp_path / "sessions.sqlite"), "--out", str(tmp_path / "search")]  # fmt: skip
    assert main(["search", "--query", "a picture", "--k", "3", *common]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("found: ") and out.splitlines()[-1].endswith("after 2 round(s)")
    session = json.loads((tmp_path / "search" / "session.json").read_text())
    assert session["stop_reason"] == "found" and session["rounds_played"] == 2
    assert (tmp_path / "search" / "round_0.png").exists() and (tmp_path / "search" / "round_1.html").exists()
    assert main(["search", "--resume", "nope", *common]) == 2
    assert "no search session 'nope'" in capsys.readouterr().err
