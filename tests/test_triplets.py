"""DAIG's triplet synthesis: `imageloop triplets` writes exactly the dataset `read_triplets` reads, resumes after
`kill -9` to exactly N triplets, scripts with structured output and few-shot examples, and draws with a CIR-LoRA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imageloop.cli import main
from imageloop.errors import BackendError
from imageloop.graphs.triplets import slot_pair, triplet_id
from imageloop.prompts.diptych import diptych_description
from imageloop.protocols import Message
from imageloop.tools.triplet_dataset import TripletDataset
from imageloop.training.triplets import read_triplets
from tests.fake_openai_server import FakeOpenAIServer, RecordedRequest, chat_completion
from tests.fake_providers import FakeBackends, fake_backends

REPO = Path(__file__).resolve().parents[1]
FAKE = ["--vlm", "fake:vlm", "--generator", "fake:generator"]
OBJECTS = ["cat", "red bicycle", "teapot", "oak tree", "umbrella", "violin", "lighthouse"]
ASKED = re.compile(r'about an? "(?P<object>[^"]+)", of the edit type "(?P<edit>\w+)"')


def script_for(messages: Sequence[Message]) -> str:
    """A scripter that writes a triplet about the object and edit it was asked for."""
    asked = ASKED.search(messages[-1].text)
    assert asked is not None, messages[-1].text
    subject, edit = asked["object"], asked["edit"]
    return json.dumps(
        {"reference": f"a photo of a {subject}", "change": f"{edit} something", "target": f"a {subject}, {edit}ed"}
    )


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as backends:
        yield backends


@pytest.fixture
def objects(tmp_path: Path) -> Path:
    path = tmp_path / "objects.txt"
    path.write_text("# things to script\n" + "\n".join(OBJECTS) + "\n\n")
    return path


def synthesize(capsys: pytest.CaptureFixture[str], objects: Path, out: Path, n: int, *extra: str) -> dict[str, Any]:
    code = main(["triplets", "--objects", str(objects), "--edits", "add,replace,count", "--n", str(n),
                 "--out", str(out), "--json", *FAKE, *extra])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result: dict[str, Any] = json.loads(captured.out.strip().splitlines()[-1])
    return result


def test_triplets_writes_n_records_that_the_training_reader_reads(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers += [script_for] * 5
    out = tmp_path / "synthetic"
    assert synthesize(capsys, objects, out, 5, "--size", "64x32") == {"written": 5, "total": 5, "out": str(out)}
    triplets = read_triplets(out)
    assert sorted(t.id for t in triplets) == [triplet_id(i) for i in range(5)]
    records = [json.loads(line) for line in (out / "triplets.jsonl").read_text().splitlines()]
    assert all(
        set(r) == {"id", "object", "edit", "reference_text", "change", "target_text", "reference_image", "target_image"}
        for r in records
    )
    for record, triplet in zip(
        sorted(records, key=lambda r: r["id"]), sorted(triplets, key=lambda t: t.id), strict=True
    ):
        assert record["reference_image"] == f"images/{record['id']}_reference.png"  # relative to the folder
        assert record["object"] in OBJECTS and record["edit"] in ("add", "replace", "count")
        assert record["reference_text"] == f"a photo of a {record['object']}"
        assert Image.open(triplet.reference_image).size == Image.open(triplet.target_image).size == (8, 16)
    described = {r.prompt for r in fakes.generator.requests}
    first = records[0]
    assert diptych_description(first["change"], first["reference_text"], first["target_text"], first["object"]) in (
        described
    )
    assert {r.size for r in fakes.generator.requests} == {(64, 32)}


def test_the_script_is_asked_for_as_structured_output(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers.append(script_for)
    synthesize(capsys, objects, tmp_path / "out", 1)
    [(messages, schema)] = fakes.vlm.calls
    assert schema is not None and set(schema["schema"]["properties"]) == {"reference", "change", "target"}
    assert messages[0].role == "system"


def test_each_slot_draws_its_pair_from_the_seed_alone(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers += [script_for] * 12
    synthesize(capsys, objects, tmp_path / "a", 6, "--seed", "7")
    synthesize(capsys, objects, tmp_path / "b", 6, "--seed", "7", "--concurrency", "3")
    pairs = [{t.id: (t.object, t.edit) for t in read_triplets(tmp_path / name)} for name in ("a", "b")]
    assert pairs[0] == pairs[1]
    assert pairs[0] == {triplet_id(i): slot_pair(7, i, OBJECTS, ["add", "replace", "count"]) for i in range(6)}
    assert {slot_pair(8, i, OBJECTS, ["add", "replace", "count"]) for i in range(6)} != set(pairs[0].values())


def test_a_larger_n_makes_only_the_triplets_the_folder_lacks(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers += [script_for] * 5
    synthesize(capsys, objects, tmp_path / "out", 3)
    assert synthesize(capsys, objects, tmp_path / "out", 5)["written"] == 2
    assert len(fakes.vlm.calls) == 5 and len(read_triplets(tmp_path / "out")) == 5


def test_a_folder_made_with_other_settings_is_refused(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers.append(script_for)
    synthesize(capsys, objects, tmp_path / "out", 1)
    code = main(["triplets", "--objects", str(objects), "--edits", "delete", "--n", "2", "--out", str(tmp_path / "out"),
                 *FAKE])  # fmt: skip
    assert code == 2 and "made with other objects, edits or models" in capsys.readouterr().err


def test_real_triplets_are_few_shot_examples_of_the_same_edit_first(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = tmp_path / "real.jsonl"
    lines = [
        {"id": "r1", "edit": "count", "reference_text": "two mugs", "change": "only one mug", "target_text": "a mug"},
        {"id": "r2", "edit": "add", "change": "add a hat to the dog"},  # a real triplet without captions
    ]
    examples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fakes.vlm.answers.append(script_for)
    code = main(["triplets", "--objects", str(objects), "--edits", "count", "--n", "1", "--out", str(tmp_path / "o"),
                 "--examples", str(examples), *FAKE])  # fmt: skip
    assert code == 0
    prompt = fakes.vlm.calls[0][0][-1].text
    assert prompt.index('"change": "only one mug"') < prompt.index('"change": "add a hat to the dog"')
    assert '{"change": "add a hat to the dog"}' in prompt  # no empty captions shown


def test_a_triplet_without_a_usable_script_is_counted_and_made_on_the_next_run(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers += [script_for, "no idea", "still no idea"]
    made = main(["triplets", "--objects", str(objects), "--edits", "add", "--n", "2", "--out", str(tmp_path / "o"),
                 "--concurrency", "1", *FAKE])  # fmt: skip
    assert made == 0 and "wrote 1 (failed 1, rejected 0)" in capsys.readouterr().err
    fakes.vlm.answers.append(script_for)
    assert main(["triplets", "--objects", str(objects), "--edits", "add", "--n", "2", "--out", str(tmp_path / "o"),
                 *FAKE]) == 0  # fmt: skip
    assert len(read_triplets(tmp_path / "o")) == 2


def test_the_optional_check_redraws_a_rejected_diptych_with_the_next_seed(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers += [script_for, {"valid": False, "reason": "same picture twice"}, {"valid": True, "reason": ""}]
    result = synthesize(capsys, objects, tmp_path / "o", 1, "--check")
    assert result["written"] == 1
    seeds = [r.seed for r in fakes.generator.requests]
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    check = fakes.vlm.calls[1][0][-1]
    assert len(check.images) == 2  # the two halves


def test_no_more_than_the_concurrency_are_in_flight(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    active, peak, lock = [0], [0], threading.Lock()

    def slow_script(messages: Sequence[Message]) -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return script_for(messages)

    fakes.vlm.answers += [slow_script] * 6
    synthesize(capsys, objects, tmp_path / "o", 6, "--concurrency", "2")
    assert peak[0] == 2


def test_a_folder_another_process_writes_is_refused(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with TripletDataset(tmp_path / "o"):
        code = main(["triplets", "--objects", str(objects), "--edits", "add", "--n", "1", "--out", str(tmp_path / "o"),
                     *FAKE])  # fmt: skip
    assert code == 2 and "is being written by another process" in capsys.readouterr().err


def test_a_line_cut_short_by_a_crash_is_dropped_and_made_again(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers += [script_for] * 3
    synthesize(capsys, objects, tmp_path / "o", 2)
    lines = (tmp_path / "o" / "triplets.jsonl").read_bytes().split(b"\n")
    (tmp_path / "o" / "triplets.jsonl").write_bytes(lines[0] + b"\n" + lines[1][:25])
    assert synthesize(capsys, objects, tmp_path / "o", 2)["written"] == 1
    assert len(read_triplets(tmp_path / "o")) == 2


@pytest.mark.parametrize(("edits", "message"), [("add,fly", "--edits fly"), ("", "--edits (none)")])
def test_unknown_edit_types_are_refused(
    objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edits: str, message: str
) -> None:
    code = main(["triplets", "--objects", str(objects), "--edits", edits, "--n", "1", "--out", str(tmp_path / "o"),
                 *FAKE])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err


# kill -9 and run again: exactly N, none twice.


class SlowOpenAIServer(FakeOpenAIServer):
    """The fake OpenAI API, a little slow to answer chat requests, so a run can be killed half-way."""

    def _answer(self, request: RecordedRequest) -> tuple[int, Any]:
        if request.path == "/v1/chat/completions":
            time.sleep(0.2)
        return super()._answer(request)


def test_killed_with_sigkill_and_run_again_the_folder_ends_with_exactly_n_triplets(
    tmp_path: Path, objects: Path
) -> None:
    n = 8
    out = tmp_path / "killed"
    with SlowOpenAIServer() as server:
        for i in range(3 * n):
            script = {"reference": f"a photo number {i}", "change": f"change {i}", "target": f"the photo {i} changed"}
            server.push("/v1/chat/completions", 200, chat_completion(json.dumps(script)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-t"}
        command = [sys.executable, "-m", "imageloop.cli", "triplets", "--profile", "openai", "--objects",
                   str(objects), "--edits", "add,delete", "--n", str(n), "--out", str(out), "--concurrency", "1",
                   "--json"]  # fmt: skip
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        jsonl = out / "triplets.jsonl"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (not jsonl.is_file() or jsonl.read_text().count("\n") < 2):
            time.sleep(0.02)
        first.kill()  # SIGKILL: no cleanup, no finally
        first.wait(timeout=30)
        assert first.returncode == -9
        held = jsonl.read_text().count("\n")
        assert 2 <= held < n
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {"written": n - held, "total": n, "out": str(out)}
    ids = [json.loads(line)["id"] for line in jsonl.read_text().splitlines()]
    assert sorted(ids) == [triplet_id(i) for i in range(n)]  # exactly n, none twice
    assert len(read_triplets(out)) == n


# Drawing with a CIR-LoRA on FLUX.


def test_triplets_with_a_trained_cir_lora_route_its_experts_for_every_description(
    objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("peft")
    from imageloop.training import cir_lora
    from tests.triplet_folders import colour_triplets, write_jsonl

    real = write_jsonl(tmp_path / "real" / "real.jsonl", colour_triplets(tmp_path / "real", [
        ("dot", "red", "blue"), ("bars", "green", "red"), ("checks", "blue", "yellow")], size=16))  # fmt: skip
    assert main(["train", "cir-lora", "--generator", "tiny:flux", "--triplets", str(real), "--out",
                 str(tmp_path / "lora"), "--steps", "2", "--experts", "2", "--rank", "2", "--resolution", "16",
                 "--batch-size", "2", "--json"]) == 0  # fmt: skip
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (trained["steps"], trained["experts"]) == (2, 2)
    assert (tmp_path / "lora" / "cir_lora.json").is_file()

    routed: list[tuple[str, list[float]]] = []
    real_apply = cir_lora.apply_cir_lora

    def recording(pipe: Any, folder: Path, description: str) -> list[float]:
        gates = real_apply(pipe, folder, description)
        routed.append((description, gates))
        return gates

    monkeypatch.setattr(cir_lora, "apply_cir_lora", recording)
    with fake_backends(monkeypatch) as fakes:
        fakes.vlm.answers += [script_for] * 2
        code = main(["triplets", "--objects", str(objects), "--edits", "replace", "--n", "2", "--out",
                     str(tmp_path / "o"), "--lora", str(tmp_path / "lora"), "--vlm", "fake:vlm",
                     "--generator", "tiny:flux", "--size", "32x16", "--json"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
    triplets = read_triplets(tmp_path / "o")
    assert len(triplets) == 2 and len(routed) == 2
    descriptions = {diptych_description(t.change, t.reference_text, t.target_text, t.object) for t in triplets}
    assert {d for d, _ in routed} == descriptions
    assert all(len(gates) == 2 and abs(sum(gates) - 1) < 1e-5 for _, gates in routed)
    assert Image.open(triplets[0].reference_image).size == (16, 16)


def test_a_lora_needs_a_flux_generator(objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "cir_lora.json").write_text(json.dumps({"format": "imageloop-cir-lora/1", "base_model": "x"}))
    code = main(["triplets", "--objects", str(objects), "--edits", "add", "--n", "1", "--out", str(tmp_path / "o"),
                 "--lora", str(tmp_path / "lora"), "--vlm", "fake:vlm", "--generator", "tiny:omnigen"])  # fmt: skip
    assert code == 2 and "--lora draws with FLUX" in capsys.readouterr().err


def test_an_unreachable_endpoint_ends_the_run_with_its_one_line_error(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def down(messages: Sequence[Message]) -> str:
        raise BackendError("endpoint unreachable")

    fakes.vlm.answers.append(down)
    code = main(["triplets", "--objects", str(objects), "--edits", "add", "--n", "1", "--out", str(tmp_path / "o"),
                 *FAKE])  # fmt: skip
    assert code == 2 and "endpoint unreachable" in capsys.readouterr().err


def test_temporary_files_a_killed_image_write_left_are_deleted_when_the_folder_is_next_opened(tmp_path: Path) -> None:
    images = tmp_path / "o" / "images"
    images.mkdir(parents=True)
    leftover = images / ".t003_reference.png.k2j4x9.tmp"  # what kill -9 during an atomic write leaves
    leftover.write_bytes(b"half a png")

    with TripletDataset(tmp_path / "o"):
        pass

    assert not leftover.exists()


def test_a_damaged_record_of_the_folders_settings_is_one_line(
    fakes: FakeBackends, objects: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fakes.vlm.answers += [script_for] * 2
    synthesize(capsys, objects, tmp_path / "o", 1)
    settings = tmp_path / "o" / "synthesis.json"
    settings.write_text(settings.read_text()[:20])  # cut short by a full disk or a careless copy

    code = main(["triplets", "--objects", str(objects), "--edits", "add", "--n", "2", "--out", str(tmp_path / "o"),
                 *FAKE])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{settings}: not valid JSON" in err.strip().splitlines()[-1]
