"""The command line's conventions: `python -m imageloop`, typed for users' mypy, shell completion, `--quiet`,
in-node progress, and a Ctrl-C message that says what is true."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest

from imageloop import __version__, runtime
from imageloop.cli import build_parser, main
from imageloop.completion import completion_script
from imageloop.knobs import FeedbackKind
from imageloop.progress import report_progress
from imageloop.protocols import GenerationRequest, GenerationResult
from tests.fake_providers import FakeBackends, captioned_folder
from tests.fakes import ScriptedGenerator
from tests.test_search_session import fakes

REPO = Path(__file__).resolve().parents[1]
NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest on a branch"}]}
ALIGNED = {"aligned": True, "missing_concepts": []}
__all__ = ["fakes"]  # the scripted backends, a fixture shared with the session tests
FAKE_MODELS = ["--vlm", "fake:vlm", "--generator", "fake:generator", "--embedder", "fake:hash"]


@dataclass
class FakeDenoisingGenerator(ScriptedGenerator):
    """Reports two denoising steps per picture, as the diffusers backends do."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        report_progress("denoising", 1, 2)
        report_progress("denoising", 2, 2)
        return super().generate(request)


@dataclass
class InterruptedGenerator(ScriptedGenerator):
    """A person presses Ctrl-C while the `interrupt_at`-th picture is being drawn."""

    interrupt_at: int = 2

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if len(self.requests) + 1 == self.interrupt_at:
            self.interrupt_at = 0
            raise KeyboardInterrupt
        return super().generate(request)


@pytest.fixture
def photos(fakes: FakeBackends, tmp_path: Path) -> Path:
    folder = captioned_folder(tmp_path / "photos")
    assert main(["index", str(folder), *FAKE_MODELS, "--quiet"]) == 0
    return folder


def generate(photos: Path, out: Path, *options: str) -> int:
    return main(["generate", "a blue jay", "--index", str(photos), "--out", str(out), *FAKE_MODELS, *options])


def test_python_dash_m_runs_the_same_command_line() -> None:
    result = subprocess.run([sys.executable, "-m", "imageloop", "--version"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == f"imageloop {__version__}"


def test_the_wheel_ships_py_typed_so_users_mypy_reads_our_types(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO / "imageloop", source / "imageloop", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), source],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("imageloop-*.whl")
    assert "imageloop/py.typed" in zipfile.ZipFile(wheel).namelist()


def complete(script: str, *words: str) -> list[str]:
    """What bash offers after `words` (the last one being completed) with `script` loaded."""
    quoted = " ".join(f"'{word}'" for word in words)
    probe = (
        f'{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _imageloop_complete; echo "${{COMPREPLY[*]}}"'
    )
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_bash_completes_commands_options_and_choices_from_the_parser() -> None:
    script = completion_script(build_parser(), "bash")
    assert {"generate", "search", "query", "ui", "mcp", "completion"} <= set(complete(script, "imageloop", ""))
    assert complete(script, "imageloop", "gen") == ["generate"]
    assert complete(script, "imageloop", "generate", "--max-i") == ["--max-iterations"]
    assert complete(script, "imageloop", "--quiet", "search", "--feedback", "") == list(get_args(FeedbackKind))
    assert complete(script, "imageloop", "eval", "") == ["cir", "genir", "imagerag"]
    assert complete(script, "imageloop", "completion", "") == ["bash", "zsh"]


def test_zsh_runs_the_same_script_through_its_bash_compatibility(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("autoload -U +X bashcompinit && bashcompinit\n")
    assert "complete -o filenames -F _imageloop_complete imageloop" in printed


def test_steps_are_shown_as_they_happen_and_quiet_hides_them(
    fakes: FakeBackends, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers.extend([ALIGNED, ALIGNED])
    capsys.readouterr()
    assert generate(photos, tmp_path / "loud") == 0
    assert "[critic] aligned with the prompt" in capsys.readouterr().err
    assert generate(photos, tmp_path / "quiet", "--quiet", "--json") == 0
    shown = capsys.readouterr()
    assert "[critic]" not in shown.err and json.loads(shown.out)["stop_reason"] == "aligned"


@pytest.fixture
def loading_bars_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`--quiet` turns the model libraries' loading bars off for the process: on again afterwards."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    yield
    from diffusers.utils import logging as diffusers_logging

    monkeypatch.setattr(runtime, "_loading_bars", True)
    diffusers_logging.enable_progress_bar()


def test_quiet_hides_the_bars_model_libraries_draw_while_loading(
    loading_bars_restored: None, capfd: pytest.CaptureFixture[str]
) -> None:
    from diffusers.utils import logging as diffusers_logging

    def load_a_pipeline() -> list[int]:  # what diffusers' from_pretrained draws while it loads components
        return list(diffusers_logging.tqdm(range(3), desc="Loading pipeline components..."))

    main(["--quiet", "index-info", "no-such-folder"])
    runtime.load_cached(("a pipeline", uuid.uuid4().hex), load_a_pipeline)
    assert "Loading pipeline components" not in capfd.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    command = [sys.executable, "-m", "imageloop", "completion", "bash"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # `| head` that has read enough
    error = process.stderr.read()
    assert process.wait(timeout=60) == 141 and error == b""  # 128 + SIGPIPE, no traceback


def test_query_offers_only_the_options_of_the_model_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    shown = capsys.readouterr().out
    assert "--embedder" in shown and "--generator" not in shown and "--ip-adapter" not in shown
    assert "--vlm" not in shown and len(shown.splitlines()) < 60


def test_search_with_json_prints_the_ended_session_alone_on_stdout(
    fakes: FakeBackends, photos: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builtins.input", lambda prompt="": "found: 2")
    capsys.readouterr()
    code = main(["search", "--index", str(photos), "--query", "a jay", "--feedback", "verbal", "--k", "2", "--json",
                 "--sessions", str(photos.parent / "sessions.sqlite"), *FAKE_MODELS])  # fmt: skip
    shown = capsys.readouterr()
    ended = json.loads(shown.out)
    assert (
        code == 0 and ended["status"] == "finished" and ended["found_id"] == ended["last_round"]["retrieved"][1]["id"]
    )
    assert "round 0: a jay" in shown.err


def test_quiet_goes_before_or_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["-q", "report", "x"]).quiet and parser.parse_args(["report", "x", "--quiet"]).quiet
    assert not parser.parse_args(["report", "x"]).quiet


def test_denoising_progress_from_inside_a_node_reaches_the_terminal(
    fakes: FakeBackends,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    denoising = FakeDenoisingGenerator()
    monkeypatch.setattr(fakes, "generator", denoising)
    fakes.vlm.answers.append(ALIGNED)
    capsys.readouterr()
    assert generate(photos, tmp_path / "run") == 0
    assert "[generate_draft] denoising 2/2" in capsys.readouterr().err  # a log gets one line per finished task


def test_ctrl_c_mid_run_says_how_to_resume_and_resuming_reuses_every_finished_step(
    fakes: FakeBackends,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = InterruptedGenerator(interrupt_at=2)  # the draft is drawn, then Ctrl-C during the regeneration
    monkeypatch.setattr(fakes, "generator", generator)
    fakes.vlm.answers.extend([NOT_ALIGNED, CAPTIONS, ALIGNED])
    out = tmp_path / "run"
    assert generate(photos, out) == 130
    said = capsys.readouterr().err
    assert f"continue it with: imageloop generate --resume {out}" in said

    assert main(["generate", "--resume", str(out), *FAKE_MODELS]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "aligned" and record["resumed"]["reused_steps"] >= 5
    assert len(generator.requests) == 2  # the draft once, then the regeneration: nothing drawn twice


def test_ctrl_c_before_anything_ran_says_to_run_the_command_again(
    fakes: FakeBackends,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # e.g. while the models load

    monkeypatch.setattr("imageloop.app.core.App.retriever", interrupted)
    assert generate(photos, tmp_path / "never") == 130
    said = capsys.readouterr().err
    assert "stopped before the run began; nothing was saved" in said and "--resume" not in said
