"""`imageloop eval cir` on CIRR- and FashionIQ-format folders, every query through the CIR graph.

The plumbing runs on scripted `fake:` backends over the caption route (sidecar captions, a bag-of-words
embedder) with a composer that knows each query's answer, so the recalls are known; a trained
composed-query model is then shown to change the results on a world where it must (tiny:clip features
of pattern-and-colour pictures, where the change's colour and the reference's pattern make the target).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from imageloop.cli import main
from imageloop.errors import BackendError
from imageloop.protocols import Message
from tests.cir_fixtures import CIRRFixture, FashionIQFixture, write_cirr, write_fashioniq
from tests.fake_providers import FakeBackends, fake_backends

FAKE = ["--vlm", "fake:vlm", "--embedder", "fake:hash"]
CIRR_KEYS = {"n", "recall_at", "recall_subset_at", "avg"}


def caption(name: str) -> str:
    """A sidecar caption naming the image by its own words (dev-0-1-img0 → "picture dev 0 1 img0")."""
    return "picture " + " ".join(name.split("-"))


def with_sidecars(files: Iterator[tuple[str, Path]]) -> None:
    for name, path in files:
        path.with_suffix(".txt").write_text(caption(name))


def composer(answers: dict[str, str]) -> Any:
    """A scripted composer: the edited description names the image `answers` gives for the instruction."""

    def answer(messages: Sequence[Message]) -> str:
        instruction = re.findall(r"^Instruction: (.*)$", messages[-1].text, re.MULTILINE)[-1]
        return f"Edited Description: {caption(answers[instruction])}"

    return answer


@pytest.fixture
def cirr(tmp_path: Path) -> CIRRFixture:
    fixture = write_cirr(tmp_path / "CIRR", groups=2)
    with_sidecars((name, fixture.images / "dev" / f"{name}.png") for name in fixture.names)
    return fixture


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as backends:
        yield backends


def index(folder: Path, *options: str) -> None:
    assert main(["index", str(folder), *options]) == 0


def run_eval(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["eval", "cir", *args, "--json"]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return result


def cirr_answers(fixture: CIRRFixture, right: bool = True) -> dict[str, str]:
    """Each modification's answer: its target (right) or another member of its set that is neither."""
    answers = {}
    for pair in fixture.pairs:
        members = pair["img_set"]["members"]  # type: ignore[index]
        wrong = next(m for m in members if m not in (pair["reference"], pair["target_hard"]))
        answers[str(pair["caption"])] = str(pair["target_hard"] if right else wrong)
    return answers


def test_cirr_val_reports_recall_subset_recall_and_avg_as_json(
    cirr: CIRRFixture, fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index(cirr.images, *FAKE)
    fakes.vlm.answers += [composer(cirr_answers(cirr))] * len(cirr.pairs)
    annotations = cirr.root / "captions" / "cap.rc2.val.json"
    out = tmp_path / "eval"
    summary = run_eval(capsys, "--index", str(cirr.images), "--annotations", str(annotations), "--format", "cirr",
                       "--out", str(out), *FAKE)  # fmt: skip
    assert set(summary) == CIRR_KEYS
    assert summary["n"] == 4
    assert summary["recall_at"] == {"1": 100.0, "5": 100.0, "10": 100.0, "50": 100.0}
    assert summary["recall_subset_at"] == {"1": 100.0, "2": 100.0, "3": 100.0} and summary["avg"] == 100.0
    records = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    assert {r["id"] for r in records} == {"0", "1", "100", "101"}
    first = next(r for r in records if r["id"] == "0")
    assert first["reference_description"] == caption("dev-0-0-img0")
    assert first["edited_description"] == caption("dev-0-1-img0")
    assert first["ranking"][0] == "dev-0-1-img0" and first["target_rank"] == 0
    assert sorted(first["subset_ranking"]) == sorted(f"dev-0-{i}-img0" for i in range(1, 6))
    assert json.loads((out / "summary.json").read_text())["recall_at"] == summary["recall_at"]


def test_a_composer_that_names_a_look_alike_misses_at_one_but_not_within_the_set(
    cirr: CIRRFixture, fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index(cirr.images, *FAKE)
    fakes.vlm.answers += [composer(cirr_answers(cirr, right=False))] * len(cirr.pairs)
    summary = run_eval(capsys, "--index", str(cirr.images), "--annotations", str(cirr.root), "--format", "cirr",
                       "--out", str(tmp_path / "eval"), *FAKE)  # fmt: skip
    assert summary["recall_at"]["1"] == 0.0 and summary["recall_subset_at"]["1"] == 0.0
    assert summary["recall_subset_at"]["3"] == 100.0  # five candidates, each answer's target is close behind


def test_an_interrupted_evaluation_resumes_with_the_queries_left(
    cirr: CIRRFixture, fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index(cirr.images, *FAKE)
    right = composer(cirr_answers(cirr))

    def fail(messages: Sequence[Message]) -> str:
        raise BackendError("the endpoint went away")

    fakes.vlm.answers += [right, right, fail]
    args = ["--index", str(cirr.images), "--annotations", str(cirr.root), "--format", "cirr",
            "--out", str(tmp_path / "eval"), *FAKE]  # fmt: skip
    assert main(["eval", "cir", *args]) == 2
    assert "the endpoint went away" in capsys.readouterr().err
    assert len((tmp_path / "eval" / "queries.jsonl").read_text().splitlines()) == 2

    fakes.vlm.answers[:] = [right, right]
    summary = run_eval(capsys, *args)
    assert summary["n"] == 4 and summary["recall_at"]["1"] == 100.0
    assert fakes.vlm.answers == []  # two compositions, for the two queries left
    assert len((tmp_path / "eval" / "queries.jsonl").read_text().splitlines()) == 4


def test_a_folder_holding_another_evaluation_is_refused(
    cirr: CIRRFixture, fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index(cirr.images, *FAKE)
    fakes.vlm.answers += [composer(cirr_answers(cirr))] * len(cirr.pairs)
    args = ["--index", str(cirr.images), "--annotations", str(cirr.root), "--format", "cirr",
            "--out", str(tmp_path / "eval"), *FAKE]  # fmt: skip
    run_eval(capsys, *args)
    assert main(["eval", "cir", *args, "--verify", "1"]) == 2
    assert "holds an evaluation with other settings" in capsys.readouterr().err


def test_cirr_test1_writes_the_servers_two_submission_files(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = write_cirr(tmp_path / "CIRR", groups=1, split="test1")
    with_sidecars((name, fixture.images / "test1" / f"{name}.png") for name in fixture.names)
    index(fixture.images, *FAKE)
    fakes.vlm.answers += [composer({str(p["caption"]): fixture.names[3] for p in fixture.pairs})] * 2
    annotations = fixture.root / "captions" / "cap.rc2.test1.json"
    out = tmp_path / "eval"
    summary = run_eval(capsys, "--index", str(fixture.images), "--annotations", str(annotations),
                       "--format", "cirr", "--out", str(out), *FAKE)  # fmt: skip
    assert summary["n"] == 2
    recall = json.loads((out / "recall_submission.json").read_text())
    subset = json.loads((out / "recall_subset_submission.json").read_text())
    assert (recall["version"], recall["metric"], subset["metric"]) == ("rc2", "recall", "recall_subset")
    assert recall["0"][0] == fixture.names[3] and len(subset["1"]) == 3


def test_fashioniq_reports_recall_at_10_and_50_per_category_and_their_average(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture: FashionIQFixture = write_fashioniq(tmp_path / "fiq", categories=("dress", "shirt"))
    with_sidecars((path.stem, path) for path in (tmp_path / "fiq" / "images").glob("*.png"))
    index(tmp_path / "fiq" / "images", *FAKE)
    # Every query of a category asks the same modification text, so the composer answers by order.
    targets = [str(t["target"]) for category in ("dress", "shirt") for t in fixture.triplets[category]]
    queue = list(targets)

    def answer(messages: Sequence[Message]) -> str:
        return f"Edited Description: {caption(queue.pop(0))}"

    fakes.vlm.answers += [answer] * len(targets)
    summary = run_eval(capsys, "--index", str(tmp_path / "fiq" / "images"), "--annotations", str(fixture.root),
                       "--format", "fashioniq", "--out", str(tmp_path / "eval"), *FAKE)  # fmt: skip
    assert set(summary) == {"n", "categories", "avg_at_10"}
    assert summary["n"] == 6 and set(summary["categories"]) == {"dress", "shirt"}
    assert summary["categories"]["dress"] == {"recall_at_10": 100.0, "recall_at_50": 100.0}
    assert summary["avg_at_10"] == 100.0


def test_one_fashioniq_annotation_file_evaluates_its_category_in_its_own_gallery(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = write_fashioniq(tmp_path / "fiq")
    with_sidecars((path.stem, path) for path in (tmp_path / "fiq" / "images").glob("*.png"))
    index(tmp_path / "fiq" / "images", *FAKE)
    fakes.vlm.answers += ["Edited Description: picture"] * 3
    out = tmp_path / "eval"
    summary = run_eval(capsys, "--index", str(tmp_path / "fiq" / "images"), "--annotations",
                       str(fixture.root / "captions" / "cap.shirt.val.json"), "--format", "fashioniq",
                       "--out", str(out), *FAKE)  # fmt: skip
    assert list(summary["categories"]) == ["shirt"] and summary["n"] == 3
    ranked = {name for line in (out / "queries.jsonl").read_text().splitlines() for name in json.loads(line)["ranking"]}
    assert ranked == set(fixture.galleries["shirt"])


def test_gallery_images_missing_from_the_index_are_named(
    cirr: CIRRFixture, fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    index(cirr.images / "dev", *FAKE)
    changed = cirr.images / "dev" / f"{cirr.names[1]}.png"
    changed.write_bytes(changed.read_bytes() + b"\0")  # other bytes: not the image that was indexed
    assert main(["eval", "cir", "--index", str(cirr.images / "dev"), "--annotations", str(cirr.root),
                 "--format", "cirr", "--out", str(tmp_path / "eval"), *FAKE]) == 2  # fmt: skip
    assert f"1 gallery images are not in the index at {cirr.images / 'dev'} (first: {cirr.names[1]})" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("annotations", "args", "message"),
    [
        ("captions/cap.rc2.val.json", ["--split", "test1"], "--split test1 but cap.rc2.val.json is the val split"),
        ("image_splits/split.rc2.val.json", [], "expected cirr's captions/cap.rc2.<split>.json"),
    ],
)
def test_an_annotation_file_that_does_not_fit_is_refused(
    cirr: CIRRFixture,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    annotations: str,
    args: list[str],
    message: str,
) -> None:
    code = main(["eval", "cir", "--index", str(cirr.images), "--annotations", str(cirr.root / annotations),
                 "--format", "cirr", "--out", str(tmp_path / "eval"), *FAKE, *args])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err


# A trained composed-query model, through `eval cir --cir-model`, on a world where it must help.


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model `imageloop train cir` trained on 120 pattern-colour changes; a CIRR folder of the 30 held out."""
    pytest.importorskip("open_clip")
    from tests.triplet_folders import COLOURS, all_combos, picture, write_dataset

    combos = all_combos()
    random.Random(0).shuffle(combos)
    root = tmp_path_factory.mktemp("toy")
    synthetic = write_dataset(root / "train", combos[:120])
    assert main(["train", "cir", "--embedder", "tiny:clip", "--triplets", str(synthetic), "--out", str(root / "model"),
                 "--steps", "300", "--learning-rate", "3e-3"]) == 0  # fmt: skip
    dev = root / "CIRR" / "img_raw" / "dev"
    dev.mkdir(parents=True)
    patterns = sorted({p for p, _, _ in combos})
    names = {(p, c): f"dev-{p}-{c}" for p in patterns for c in COLOURS}
    for (pattern, colour), name in names.items():
        picture(pattern, colour).save(dev / f"{name}.png")
        (dev / f"{name}.txt").write_text(f"{colour} {pattern} on grey")
    pairs = [
        {"pairid": i, "reference": names[p, a], "target_hard": names[p, b], "target_soft": {names[p, b]: 1.0},
         "caption": f"make it {b}", "img_set": {"id": i, "members": [names[p, c] for c in COLOURS]}}
        for i, (p, a, b) in enumerate(combos[120:])
    ]  # fmt: skip
    (root / "CIRR" / "captions").mkdir()
    (root / "CIRR" / "captions" / "cap.rc2.val.json").write_text(json.dumps(pairs))
    (root / "CIRR" / "image_splits").mkdir()
    split = {name: f"./dev/{name}.png" for name in names.values()}
    (root / "CIRR" / "image_splits" / "split.rc2.val.json").write_text(json.dumps(split))
    return root / "model", root / "CIRR"


def edit_colour(messages: Sequence[Message]) -> str:
    """A perfect composer for the toy world: the reference's caption with the colour changed."""
    text = messages[-1].text
    _, rest = re.findall(r"^Image Content: (\w+) (.*)$", text, re.MULTILINE)[-1]
    colour = re.findall(r"^Instruction: make it (\w+)$", text, re.MULTILINE)[-1]
    return f"Edited Description: {colour} {rest}"


def test_a_trained_composed_query_model_changes_the_results_of_eval_cir(
    toy_world: tuple[Path, Path], fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, cirr_root = toy_world
    images = cirr_root / "img_raw"
    index(images, "--embedder", "tiny:clip")
    common = ["--index", str(images), "--annotations", str(cirr_root), "--format", "cirr", "--embedder", "tiny:clip"]
    fakes.vlm.answers += [edit_colour] * 30
    described = run_eval(capsys, *common, "--vlm", "fake:vlm", "--out", str(tmp_path / "text"))
    composed = run_eval(capsys, *common, "--cir-model", str(model), "--out", str(tmp_path / "model"))
    assert described["n"] == composed["n"] == 30
    assert composed["recall_at"]["1"] >= described["recall_at"]["1"] + 30
    assert composed["recall_subset_at"]["1"] > described["recall_subset_at"]["1"]
    records = [json.loads(line) for line in (tmp_path / "model" / "queries.jsonl").read_text().splitlines()]
    assert all(r["edited_description"] is None for r in records)  # the model writes no description
