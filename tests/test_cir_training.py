"""Training the composed-query model on tiny:clip features: learning, retrieval, resume, caching, records."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from imageloop.errors import ConfigError, EmbedderMismatchError  # noqa: E402
from imageloop.protocols import Embedder, Vector  # noqa: E402
from imageloop.tiny.clip import build_tiny_clip  # noqa: E402
from imageloop.tools.embedders.local import OpenClipEmbedder  # noqa: E402
from imageloop.training import cir  # noqa: E402
from imageloop.training.cir import train_cir  # noqa: E402
from imageloop.training.combiner import CIRModel  # noqa: E402
from imageloop.training.options import CIRTrainingOptions  # noqa: E402
from imageloop.training.progress import TrainProgress, TrainResult, read_loss_curve  # noqa: E402
from imageloop.training.triplets import read_triplets  # noqa: E402
from tests.triplet_folders import all_combos, write_dataset  # noqa: E402

# Sharp enough to learn the toy world in a few hundred steps on a CPU.
FAST = CIRTrainingOptions(batch_size=32, learning_rate=3e-3, dropout=0.0, temperature=0.05, checkpoint_every=1000)


@dataclass
class CountingEmbedder:
    """A real embedder that records how many images and texts it was asked to embed."""

    inner: Embedder
    images: int = 0
    texts: int = 0
    calls: list[str] = field(default_factory=list)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def embeds_images(self) -> bool:
        return self.inner.embeds_images

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        self.images += len(images)
        return self.inner.embed_images(images)

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        self.texts += len(texts)
        return self.inner.embed_texts(texts)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> OpenClipEmbedder:
    directory = tmp_path_factory.mktemp("tiny-clip")
    build_tiny_clip(directory)
    return OpenClipEmbedder(f"local-dir:{directory}", None, model_id="tiny:clip")


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Synthetic triplets to train on and held-out ones (unseen pattern-colour-colour combinations)."""
    combos = all_combos()
    random.Random(0).shuffle(combos)
    root = tmp_path_factory.mktemp("toy-world")
    return write_dataset(root / "train", combos[:120]), write_dataset(root / "held-out", combos[120:])


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, split: tuple[Path, Path], embedder: OpenClipEmbedder
) -> TrainResult:
    options = FAST.overridden({"steps": 300})
    return train_cir(split[0], tmp_path_factory.mktemp("trained"), embedder=embedder, options=options)


def small_run(
    data: Path,
    out: Path,
    embedder: Embedder,
    *,
    real: Path | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    **changes: Any,
) -> TrainResult:
    options = FAST.overridden({"checkpoint_every": 5, "steps": 20, **changes})
    return train_cir(data, out, embedder=embedder, real=real, options=options, progress=progress)


def recall_at_1(queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray) -> float:
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return float((np.argmax(queries @ gallery.T, axis=1) == targets).mean())


def test_training_on_a_learnable_fixture_makes_the_loss_go_down(trained: TrainResult) -> None:
    losses = [point.loss for point in trained.loss_curve]
    assert len(losses) == 300
    assert np.mean(losses[-20:]) < 0.6 * np.mean(losses[:20])


def test_a_trained_model_retrieves_held_out_targets_better_than_the_zero_shot_sum(
    trained: TrainResult, split: tuple[Path, Path], embedder: OpenClipEmbedder
) -> None:
    triplets = read_triplets(split[1])
    gallery_paths = sorted({p for t in triplets for p in (t.reference_image, t.target_image)})
    gallery = embedder.embed_images([Image.open(p) for p in gallery_paths])
    targets = np.array([gallery_paths.index(t.target_image) for t in triplets])
    references = embedder.embed_images([Image.open(t.reference_image) for t in triplets])
    texts = embedder.embed_texts([t.change for t in triplets])

    zero_shot = recall_at_1(references + texts, gallery, targets)
    learned = recall_at_1(CIRModel.load(trained.out_dir).embed_query(references, texts), gallery, targets)
    assert learned >= zero_shot + 0.3


def test_the_model_folder_loads_and_embeds_one_query_into_the_embedders_space(
    trained: TrainResult, embedder: OpenClipEmbedder
) -> None:
    model = CIRModel.load(trained.out_dir)
    assert (model.embedder_id, model.dim) == ("tiny:clip", embedder.dim)
    query = model.embed_query(np.ones(embedder.dim, np.float32), np.zeros(embedder.dim, np.float32))
    assert query.shape == (embedder.dim,) and query.dtype == np.float32
    assert np.linalg.norm(query) == pytest.approx(1.0, abs=1e-5)


def test_a_query_of_the_wrong_width_is_refused_naming_the_embedder(trained: TrainResult) -> None:
    with pytest.raises(ConfigError, match=r"width 32 .*tiny:clip"):
        CIRModel.load(trained.out_dir).embed_query(np.ones(512, np.float32), np.ones(512, np.float32))


def test_a_model_refuses_to_serve_an_index_of_another_embedder(trained: TrainResult) -> None:
    model = CIRModel.load(trained.out_dir)
    model.require_embedder("tiny:clip")
    with pytest.raises(EmbedderMismatchError, match="trained on features of tiny:clip"):
        model.require_embedder("open_clip:ViT-B-32/laion2b_s34b_b79k")


def test_a_folder_without_a_trained_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no trained CIR model"):
        CIRModel.load(tmp_path)


def test_an_interrupted_run_resumes_to_the_loss_curve_of_an_uninterrupted_one(
    tmp_path: Path, split: tuple[Path, Path], embedder: OpenClipEmbedder
) -> None:
    real = split[1] / "triplets.jsonl"
    whole = small_run(split[0], tmp_path / "whole", embedder, real=real, finetune_steps=10)

    class Interrupted(Exception):
        pass

    def stop_at_13(progress: TrainProgress) -> None:
        if progress.step == 13:
            raise Interrupted

    with pytest.raises(Interrupted):
        small_run(split[0], tmp_path / "resumed", embedder, real=real, finetune_steps=10, progress=stop_at_13)
    resumed = small_run(split[0], tmp_path / "resumed", embedder, real=real, finetune_steps=10)

    assert resumed.resumed_from_step == 10
    assert [p.stage for p in resumed.loss_curve] == ["pretrain"] * 20 + ["finetune"] * 10
    assert resumed.loss_curve == whole.loss_curve
    for name, weight in CIRModel.load(whole.out_dir).combiner.state_dict().items():
        assert torch.equal(weight, CIRModel.load(resumed.out_dir).combiner.state_dict()[name])


def test_a_finished_run_called_again_trains_no_further_and_embeds_nothing_again(
    tmp_path: Path, split: tuple[Path, Path], embedder: OpenClipEmbedder
) -> None:
    counting = CountingEmbedder(embedder)
    first = small_run(split[0], tmp_path, counting)
    triplets = read_triplets(split[0])
    assert counting.images == len({p for t in triplets for p in (t.reference_image, t.target_image)})
    assert counting.texts == len({t.change for t in triplets})

    again = small_run(split[0], tmp_path, counting)
    assert (again.resumed_from_step, again.loss_curve) == (20, first.loss_curve)
    assert counting.images == len({p for t in triplets for p in (t.reference_image, t.target_image)})


def test_a_folder_holding_a_run_with_other_settings_is_refused(
    tmp_path: Path, split: tuple[Path, Path], embedder: OpenClipEmbedder
) -> None:
    small_run(split[0], tmp_path, embedder)
    with pytest.raises(ConfigError, match="other data or settings"):
        small_run(split[0], tmp_path, embedder, fra_margin=0.3)


def test_pretraining_perturbs_with_drsp_and_fine_tuning_adds_the_fra_margin(
    tmp_path: Path, split: tuple[Path, Path], embedder: OpenClipEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, float]] = []
    real_drsp, real_loss = cir.DRSP, cir.FRALoss
    monkeypatch.setattr(cir, "DRSP", lambda p: seen.append(("drsp", p)) or real_drsp(p))
    monkeypatch.setattr(cir, "FRALoss", lambda m, t: seen.append(("margin", m)) or real_loss(m, t))
    small_run(split[0], tmp_path, embedder, steps=2, real=split[1], finetune_steps=2, fra_margin=0.2)
    # Two steps of each stage, each drawing its DRSP and its loss.
    assert seen == [("drsp", 0.5), ("margin", 0.0)] * 2 + [("drsp", 0.0), ("margin", 0.2)] * 2


def test_progress_hears_every_step_with_its_stage_and_loss(
    tmp_path: Path, split: tuple[Path, Path], embedder: OpenClipEmbedder
) -> None:
    heard: list[TrainProgress] = []
    result = small_run(split[0], tmp_path, embedder, steps=3, real=split[1], finetune_steps=2, progress=heard.append)
    assert [(p.stage, p.step, p.total_steps) for p in heard] == [
        ("pretrain", 1, 5), ("pretrain", 2, 5), ("pretrain", 3, 5), ("finetune", 4, 5), ("finetune", 5, 5)
    ]  # fmt: skip
    assert [p.loss for p in heard] == [p.loss for p in result.loss_curve]


def test_the_loss_curve_is_saved_as_json_and_drawn_as_an_svg_line_per_stage(
    tmp_path: Path, split: tuple[Path, Path], embedder: OpenClipEmbedder
) -> None:
    result = small_run(split[0], tmp_path, embedder, steps=6, real=split[1], finetune_steps=4)
    assert read_loss_curve(result.loss_curve_json) == result.loss_curve
    svg = ET.parse(result.loss_curve_svg).getroot()
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert [len(line.get("points", "").split()) for line in lines] == [6, 4]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["embedder"] == "tiny:clip" and config["training"]["options"]["fra_margin"] == FAST.fra_margin


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "nothing to train"),
        ({"batch_size": 1}, "batch_size"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_any_work(
    tmp_path: Path, split: tuple[Path, Path], embedder: OpenClipEmbedder, changes: dict[str, Any], message: str
) -> None:
    counting = CountingEmbedder(embedder)
    with pytest.raises(ConfigError, match=message):
        small_run(split[0], tmp_path, counting, **changes)
    assert counting.images == 0


@pytest.mark.parametrize(("features", "calls_per_step"), [("visual", 1), ("visual+text", 2)])
def test_drsp_perturbs_the_visual_features_as_daig_does_and_the_text_features_only_in_ours(
    tmp_path: Path,
    split: tuple[Path, Path],
    embedder: OpenClipEmbedder,
    monkeypatch: pytest.MonkeyPatch,
    features: str,
    calls_per_step: int,
) -> None:
    perturbed: list[int] = []

    class RecordingDRSP(cir.DRSP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            perturbed.append(x.shape[0])
            return super().forward(x)

    monkeypatch.setattr(cir, "DRSP", RecordingDRSP)
    small_run(split[0], tmp_path, embedder, steps=3, drsp_features=features)
    assert CIRTrainingOptions().drsp_features == "visual"
    assert len(perturbed) == 3 * calls_per_step
