"""`imageloop train cir` and `train cir-lora` through the application layer: progress on stderr, a JSON summary,
resumable runs, and a model the CIR loop loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imageloop.cli import main

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.triplet_folders import all_combos, write_dataset

    return write_dataset(tmp_path_factory.mktemp("toy") / "synthetic", all_combos()[:24])


def train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[dict[str, Any], str]:
    code = main(["train", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary: dict[str, Any] = json.loads(captured.out.strip().splitlines()[-1])
    return summary, captured.err


def test_train_cir_writes_a_model_the_cir_loop_loads_and_summarises_the_run_as_json(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from imageloop.training.combiner import CIRModel

    out = tmp_path / "model"
    summary, err = train(capsys, "cir", "--embedder", "tiny:clip", "--triplets", str(synthetic), "--out", str(out),
                         "--steps", "4", "--batch-size", "8")  # fmt: skip
    assert set(summary) >= {"out", "steps", "final_loss", "seconds", "steps_per_second", "loss_curve_svg", "model"}
    assert (summary["steps"], summary["embedder"], summary["resumed_from_step"]) == (4, "tiny:clip", 0)
    assert Path(summary["loss_curve_json"]).is_file() and Path(summary["loss_curve_svg"]).is_file()
    assert CIRModel.load(out).embedder_id == "tiny:clip"
    assert "final loss" in err


def test_train_cir_fine_tunes_on_real_triplets_and_resumes_a_finished_run(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = synthetic / "triplets.jsonl"
    args = ["cir", "--embedder", "tiny:clip", "--triplets", str(synthetic), "--real", str(real),
            "--out", str(tmp_path / "m"), "--steps", "3", "--finetune-steps", "2", "--batch-size", "4"]  # fmt: skip
    first, _ = train(capsys, *args)
    again, _ = train(capsys, *args)
    assert first["steps"] == 5 and again["resumed_from_step"] == 5
    stages = [p["stage"] for p in json.loads(Path(first["loss_curve_json"]).read_text())["points"]]
    assert stages == ["pretrain"] * 3 + ["finetune"] * 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "nothing to train"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
    ],
)
def test_train_cir_refuses_what_cannot_train(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["train", "cir", "--embedder", "tiny:clip", "--triplets", str(synthetic), "--out", str(tmp_path),
                 *args])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err


def test_train_cir_lora_refuses_a_generator_that_is_not_flux(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "cir-lora", "--generator", "tiny:omnigen", "--triplets", str(synthetic), "--out",
                 str(tmp_path / "lora")])  # fmt: skip
    assert code == 2 and "CIR-LoRA trains on FLUX" in capsys.readouterr().err


def test_train_cir_on_a_binary_triplets_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "triplets.jsonl").write_bytes(bytes(range(256)))

    code = main(["train", "cir", "--embedder", "tiny:clip", "--triplets", str(tmp_path), "--out", str(tmp_path / "m")])

    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith("imageloop: error: ") and "not UTF-8 text" in line


def test_train_cir_takes_the_fra_margin_and_records_the_options_it_ran_with(
    synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = synthetic / "triplets.jsonl"
    summary, _ = train(capsys, "cir", "--embedder", "tiny:clip", "--triplets", str(synthetic), "--real", str(real),
                       "--out", str(tmp_path / "m"), "--steps", "1", "--finetune-steps", "1", "--batch-size", "4",
                       "--fra-margin", "0.3")  # fmt: skip
    options = json.loads((Path(summary["model"]) / "config.json").read_text())["training"]["options"]
    assert (options["fra_margin"], options["drsp_features"], options["model"]) == (0.3, "visual", "combiner")
