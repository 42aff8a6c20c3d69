"""`imageloop cir-data`: a CIRR or FashionIQ train split as the real triplets `train` reads, sampled as DAIG samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imageloop.cli import main
from imageloop.protocols import Message
from imageloop.training.triplets import read_triplets
from tests.cir_fixtures import CIRRFixture, write_cirr, write_fashioniq
from tests.fake_providers import fake_backends


@pytest.fixture
def cirr_train(tmp_path: Path) -> CIRRFixture:
    """Four image sets of CIRR's train split: eight query pairs."""
    return write_cirr(tmp_path / "CIRR", groups=4, split="train")


def cir_data(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main(["cir-data", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answer: dict[str, Any] = json.loads(captured.out.strip().splitlines()[-1])
    return answer


def annotations(fixture: CIRRFixture) -> str:
    return str(fixture.root / "captions" / "cap.rc2.train.json")


def sampled_ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in out.read_text().splitlines()]


def test_k_shot_writes_k_train_triplets_that_training_reads(
    cirr_train: CIRRFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "real.jsonl"
    answer = cir_data(capsys, "--annotations", annotations(cirr_train), "--format", "cirr", "--shots", "3",
                      "--out", str(out))  # fmt: skip
    assert answer == {"written": 3, "out": str(out), "images": str(cirr_train.images / "train")}
    triplets = read_triplets(out, [Path(answer["images"])])
    pairs = {f"cirr-{pair['pairid']}": pair for pair in cirr_train.pairs}
    for triplet in triplets:
        pair = pairs[triplet.id]
        assert triplet.change == pair["caption"]
        assert triplet.reference_image == cirr_train.images / "train" / f"{pair['reference']}.png"
        assert triplet.target_image == cirr_train.images / "train" / f"{pair['target_hard']}.png"
        assert (triplet.reference_text, triplet.target_text) == ("", "")


def test_a_seed_draws_the_same_sample_and_a_smaller_sample_nests_in_a_larger_one(
    cirr_train: CIRRFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def draw(shots: int, seed: int) -> list[str]:
        out = tmp_path / f"{shots}-{seed}.jsonl"
        cir_data(capsys, "--annotations", annotations(cirr_train), "--format", "cirr", "--shots", str(shots),
                 "--seed", str(seed), "--out", str(out))  # fmt: skip
        return sampled_ids(out)

    two, four = draw(2, 7), draw(4, 7)
    assert draw(2, 7) == two
    assert set(two) < set(four)
    assert {draw(4, seed)[0] for seed in range(6)} != {four[0]}  # other seeds, other samples


@pytest.mark.parametrize(("fraction", "written"), [("0.25", 2), ("0.01", 1), ("1", 8)])
def test_a_fraction_takes_that_share_of_the_split_at_least_one(
    cirr_train: CIRRFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str], fraction: str, written: int
) -> None:
    out = tmp_path / "real.jsonl"
    answer = cir_data(capsys, "--annotations", annotations(cirr_train), "--format", "cirr", "--fraction", fraction,
                      "--out", str(out))  # fmt: skip
    assert answer["written"] == written


def test_the_whole_split_keeps_its_own_order(
    cirr_train: CIRRFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "real.jsonl"
    cir_data(capsys, "--annotations", annotations(cirr_train), "--format", "cirr", "--fraction", "1", "--out", str(out))
    assert sampled_ids(out) == [f"cirr-{pair['pairid']}" for pair in cirr_train.pairs]


def test_fashioniq_pools_its_categories_and_joins_the_two_captions_as_its_evaluation_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = write_fashioniq(tmp_path / "FIQ", categories=("dress", "shirt"), per_category=3, split="train")
    out = tmp_path / "real.jsonl"
    cir_data(capsys, "--annotations", str(fixture.root), "--format", "fashioniq", "--fraction", "1", "--out", str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["benchmark"] for r in records] == ["fashioniq-dress"] * 2 + ["fashioniq-shirt"] * 2
    assert records[0]["change"] == "Is darker and has long sleeves"
    assert len(read_triplets(out)) == 4


def test_a_configured_captioner_describes_each_image_once(
    cirr_train: CIRRFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def caption(messages: list[Message]) -> str:
        return f"a picture called {messages[-1].images[0].stem}"

    out = tmp_path / "real.jsonl"
    with fake_backends(monkeypatch, [caption] * 32) as fakes:
        cir_data(capsys, "--annotations", annotations(cirr_train), "--format", "cirr", "--fraction", "1",
                 "--captioner", "fake:vlm", "--out", str(out))  # fmt: skip
        asked = len(fakes.vlm.calls)
        cir_data(capsys, "--annotations", annotations(cirr_train), "--format", "cirr", "--fraction", "1",
                 "--captioner", "fake:vlm", "--out", str(out))  # fmt: skip
        assert len(fakes.vlm.calls) == asked  # a re-run reads the journal of captions
    triplets = read_triplets(out)
    images = {path for t in triplets for path in (t.reference_image, t.target_image)}
    assert asked == len(images)
    assert all(t.reference_text == f"a picture called {t.reference_image.stem}" for t in triplets)
    assert all(t.target_text == f"a picture called {t.target_image.stem}" for t in triplets)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shots", "9"], "--shots 9 asks for more triplets than the split's 8"),
        (["--shots", "0"], "--shots must be at least 1"),
        (["--fraction", "1.5"], "--fraction must lie in (0, 1]"),
    ],
)
def test_a_sample_the_split_cannot_give_is_refused_in_one_line(
    cirr_train: CIRRFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["cir-data", "--annotations", annotations(cirr_train), "--format", "cirr", *args, "--out",
                 str(tmp_path / "real.jsonl")])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "real.jsonl").exists()


def test_a_split_other_than_train_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixture = write_cirr(tmp_path / "CIRR", split="val")
    code = main(["cir-data", "--annotations", str(fixture.root / "captions" / "cap.rc2.val.json"), "--format", "cirr",
                 "--shots", "1", "--out", str(tmp_path / "real.jsonl")])  # fmt: skip
    assert code == 2 and "the val split: real triplets come from train" in capsys.readouterr().err
