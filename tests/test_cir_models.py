"""Off-the-shelf CIR models trained DAIG's way: CLIP4CIR's full recipe and SPRC, on tiny models, end to end.

A model that fine-tunes its own encoders serves an index built with the `cir:FOLDER` embedder (its
fine-tuned encoders), not the frozen embedder's; the CIRR flow runs as a researcher would run it:
`cir-data` → `train cir --model clip4cir` → `index --embedder cir:MODEL` → `eval cir --cir-model MODEL`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imageloop.cli import main
from tests.cir_fixtures import CIRRFixture, write_cirr
from tests.triplet_folders import all_combos, write_dataset

pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answer: dict[str, Any] = json.loads(captured.out.strip().splitlines()[-1])
    return answer


@pytest.fixture(scope="module")
def cirr(tmp_path_factory: pytest.TempPathFactory) -> tuple[CIRRFixture, CIRRFixture]:
    """CIRR's train and val splits under one root, as the release lays them out."""
    root = tmp_path_factory.mktemp("cirr") / "CIRR"
    return write_cirr(root, groups=3, split="train"), write_cirr(root, groups=2, split="val")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synthetic") / "synthetic", all_combos()[:16])


@pytest.fixture(scope="module")
def clip4cir(
    tmp_path_factory: pytest.TempPathFactory, cirr: tuple[CIRRFixture, CIRRFixture], synthetic: Path
) -> tuple[Path, dict[str, Any]]:
    """cir-data's 4-shot sample of CIRR train, then clip4cir trained on the synthetic and real triplets."""
    root = tmp_path_factory.mktemp("clip4cir")
    real = root / "real.jsonl"
    assert main(["cir-data", "--annotations", str(cirr[0].root / "captions" / "cap.rc2.train.json"), "--format",
                 "cirr", "--shots", "4", "--out", str(real)]) == 0  # fmt: skip
    out = root / "model"
    assert main(["train", "cir", "--model", "clip4cir", "--embedder", "tiny:clip", "--triplets", str(synthetic),
                 "--real", str(real), "--images", str(cirr[0].root), "--out", str(out), "--steps", "2",
                 "--finetune-steps", "2", "--batch-size", "4", "--encoder-learning-rate",
                 "1e-3", "-q"]) == 0  # fmt: skip
    return out, json.loads((out / "config.json").read_text())


def test_clip4cir_fine_tunes_both_encoders_then_trains_a_combiner_each_through_daigs_two_stages(
    clip4cir: tuple[Path, dict[str, Any]],
) -> None:
    out, config = clip4cir
    stages = [point["stage"] for point in json.loads((out / "loss_curve.json").read_text())["points"]]
    assert (
        stages
        == ["encoders:pretrain"] * 2 + ["encoders:finetune"] * 2 + ["combiner:pretrain"] * 2 + ["combiner:finetune"] * 2
    )
    assert config["encoder"] == "encoder" and config["training"]["options"]["model"] == "clip4cir"

    from safetensors.torch import load_file

    from imageloop.tiny.clip import tiny_clip_dir

    tuned = load_file(str(out / "encoder" / "open_clip_model.safetensors"))
    base = load_file(str(tiny_clip_dir() / "open_clip_model.safetensors"))
    changed = {name.split(".")[0] for name in base if not torch.equal(base[name], tuned[name])}
    assert {"visual", "transformer"} <= changed  # the image tower and the text tower both learned


def test_the_model_folder_is_the_embedder_its_index_is_built_with(clip4cir: tuple[Path, dict[str, Any]]) -> None:
    from imageloop.backends import make_embedder
    from imageloop.config import Settings
    from imageloop.tiny.clip import tiny_clip_dir
    from imageloop.tools.embedders.local import OpenClipEmbedder
    from imageloop.training.combiner import CIRModel

    out, _ = clip4cir
    embedder = make_embedder(Settings.model_validate({"embedder": f"cir:{out}"}))
    assert embedder.model_id == f"cir:{out.resolve()}" == CIRModel.load(out).embedder_id
    frozen = OpenClipEmbedder(f"local-dir:{tiny_clip_dir()}", None, model_id="tiny:clip")
    picture = [Image.new("RGB", (32, 32), (200, 40, 40))]
    assert not np.allclose(embedder.embed_images(picture), frozen.embed_images(picture), atol=1e-4)


def eval_cir(val: CIRRFixture, tmp_path: Path, embedder: str, model: Path) -> list[str]:
    """`eval cir` arguments on CIRR val over a copy of its images indexed with `embedder` (one index a folder)."""
    gallery = tmp_path / "gallery"
    shutil.copytree(val.images / "dev", gallery / "dev")
    assert main(["index", str(gallery), "--embedder", embedder, "-q"]) == 0
    annotations = val.root / "captions" / "cap.rc2.val.json"
    return ["eval", "cir", "--index", str(gallery), "--annotations", str(annotations), "--format", "cirr",
            "--embedder", embedder, "--cir-model", str(model), "--out", str(tmp_path / "eval")]  # fmt: skip


def test_cir_data_then_clip4cir_then_eval_cir_runs_end_to_end_on_cirr(
    clip4cir: tuple[Path, dict[str, Any]],
    cirr: tuple[CIRRFixture, CIRRFixture],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = clip4cir
    val = cirr[1]
    capsys.readouterr()
    summary = run(capsys, *eval_cir(val, tmp_path, f"cir:{out}", out), "-q")
    assert summary["n"] == len(val.pairs)
    assert set(summary["recall_at"]) == {"1", "5", "10", "50"} and summary["recall_at"]["50"] == 100.0


def test_a_clip4cir_model_refuses_an_index_built_with_the_frozen_embedder(
    clip4cir: tuple[Path, dict[str, Any]],
    cirr: tuple[CIRRFixture, CIRRFixture],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = clip4cir
    code = main(eval_cir(cirr[1], tmp_path, "tiny:clip", out))
    assert code == 2 and f"cir:{out.resolve()}" in capsys.readouterr().err


def test_a_combiner_folder_is_no_embedder_and_says_which_one_to_index_with(tmp_path: Path) -> None:
    from imageloop.errors import ConfigError
    from imageloop.training.combiner import Combiner, CombinerConfig, save_cir_model
    from imageloop.training.models import cir_embedder

    save_cir_model(tmp_path, Combiner(CombinerConfig.for_features(8)), "tiny:clip", {})
    with pytest.raises(ConfigError, match="index with `embedder` tiny:clip"):
        cir_embedder(tmp_path)


def test_an_interrupted_clip4cir_run_resumes_in_its_combiner_phase_to_the_uninterrupted_curve(
    synthetic: Path, tmp_path: Path
) -> None:
    from imageloop.training.cir import train_cir
    from imageloop.training.options import CIRTrainingOptions
    from imageloop.training.progress import TrainProgress

    options = CIRTrainingOptions(
        model="clip4cir", base_model="tiny:clip", steps=3, batch_size=4, checkpoint_every=1, dropout=0.0
    )
    whole = train_cir(synthetic, tmp_path / "whole", embedder=None, options=options)

    class Interrupted(Exception):
        pass

    def stop_at_5(progress: TrainProgress) -> None:
        if progress.step == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_cir(synthetic, tmp_path / "resumed", embedder=None, options=options, progress=stop_at_5)
    resumed = train_cir(synthetic, tmp_path / "resumed", embedder=None, options=options)
    assert resumed.resumed_from_step == 4  # the encoders' three steps and one of the combiner's
    assert resumed.loss_curve == whole.loss_curve


# SPRC on a tiny BLIP-2.


@pytest.fixture(scope="module")
def sprc(tmp_path_factory: pytest.TempPathFactory, synthetic: Path) -> tuple[Path, Path]:
    """A tiny BLIP-2 checkpoint and SPRC trained from it through DAIG's two stages: (model folder, base)."""
    from tests.tiny_blip2 import build_tiny_blip2

    root = tmp_path_factory.mktemp("sprc")
    base = build_tiny_blip2(root / "blip2-base")
    out = root / "model"
    assert main(["train", "cir", "--model", "sprc", "--base-model", str(base), "--triplets", str(synthetic),
                 "--real", str(synthetic / "triplets.jsonl"), "--out", str(out), "--steps", "3", "--finetune-steps",
                 "2", "--batch-size", "4", "--encoder-learning-rate", "1e-3", "-q"]) == 0  # fmt: skip
    return out, base


def test_sprc_trains_its_q_former_side_through_both_stages_and_leaves_the_vit_frozen(sprc: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    out, base = sprc
    stages = [point["stage"] for point in json.loads((out / "loss_curve.json").read_text())["points"]]
    assert stages == ["pretrain"] * 3 + ["finetune"] * 2
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "blip2" / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and not any(name.startswith("vision_model.") for name in changed)
    assert any(name.startswith("qformer.") for name in changed) and "query_tokens" in changed


def test_sprc_scores_a_target_by_its_best_matching_query_feature() -> None:
    from imageloop.training.sprc import _max_similarity

    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[0.6, 0.8], [0.0, 1.0]]])  # two targets, two features each
    assert torch.equal(_max_similarity(queries, targets), torch.tensor([[1.0, 0.6], [0.0, 1.0]]))


def test_an_sprc_folder_serves_composed_queries_on_an_index_of_its_own_embedder(
    sprc: tuple[Path, Path], synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = sprc
    gallery = tmp_path / "gallery"
    shutil.copytree(synthetic / "images", gallery)
    run(capsys, "index", str(gallery), "--embedder", f"cir:{out}", "-q")
    found = run(capsys, "cir", "--index", str(gallery), "--reference", str(gallery / "dot-red.png"), "--change",
                "make it blue", "--embedder", f"cir:{out}", "--cir-model", str(out), "--k", "3", "-q")  # fmt: skip
    assert len(found["results"]) == 3 and found["edited_description"] is None
    assert all(abs(r["score"]) <= 1.0 + 1e-5 for r in found["results"])


def test_sprc_refuses_to_perturb_text_features_it_does_not_have(synthetic: Path, tmp_path: Path) -> None:
    from imageloop.errors import ConfigError
    from imageloop.training.cir import train_cir
    from imageloop.training.options import CIRTrainingOptions

    options = CIRTrainingOptions(model="sprc", base_model=str(tmp_path), drsp_features="visual+text", steps=1)
    with pytest.raises(ConfigError, match="sprc perturbs visual features only"):
        train_cir(synthetic, tmp_path / "out", embedder=None, options=options)
