"""Reading triplet datasets: a synthesised folder or a JSONL file of real triplets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imageloop.errors import ImageloopError
from imageloop.training.triplets import read_triplets
from tests.triplet_folders import colour_triplets, write_dataset, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_a_dataset_folder_reads_its_triplets_with_images_resolved_beside_the_file(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "synthetic", [("dot", "red", "blue")])
    [triplet] = read_triplets(folder)
    assert triplet.id == "dot-red-blue"
    assert triplet.change == "make it blue"
    assert triplet.reference_image == folder / "images" / "dot-red.png"
    assert triplet.target_image == folder / "images" / "dot-blue.png"
    assert (triplet.object, triplet.edit, triplet.reference_text) == ("dot", "colour", "red dot on grey")


def test_a_real_triplets_file_may_name_absolute_images_and_leave_captions_out(tmp_path: Path) -> None:
    records = colour_triplets(tmp_path / "pictures", [("bars", "green", "cyan")], relative=False)
    for record in records:
        del record["reference_text"], record["target_text"], record["object"], record["edit"]
    [triplet] = read_triplets(write_jsonl(tmp_path / "real.jsonl", records))
    assert triplet.reference_image.is_absolute() and triplet.reference_image.is_file()
    assert (triplet.reference_text, triplet.target_text) == ("", "")


def test_a_triplet_without_its_change_is_refused_with_its_line(tmp_path: Path) -> None:
    records = colour_triplets(tmp_path, [("dot", "red", "blue"), ("dot", "blue", "red")])
    records[1]["change"] = " "
    with pytest.raises(ImageloopError, match=r"real\.jsonl:2: missing or empty change"):
        read_triplets(write_jsonl(tmp_path / "real.jsonl", records))


def test_a_triplet_whose_image_is_missing_is_refused_naming_the_image(tmp_path: Path) -> None:
    records = colour_triplets(tmp_path, [("dot", "red", "blue")])
    (tmp_path / records[0]["target_image"]).unlink()
    with pytest.raises(ImageloopError, match=r"dot-blue\.png does not exist"):
        read_triplets(write_jsonl(tmp_path / "real.jsonl", records))


def test_a_line_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / "triplets.jsonl").write_text(json.dumps(["a", "list"]) + "\n")
    with pytest.raises(ImageloopError, match=r"triplets\.jsonl:1: not a JSON object"):
        read_triplets(tmp_path)


def test_an_empty_dataset_or_a_folder_without_triplets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageloopError, match="no such triplets file"):
        read_triplets(tmp_path)
    (tmp_path / "triplets.jsonl").write_text("\n")
    with pytest.raises(ImageloopError, match="holds no triplets"):
        read_triplets(tmp_path)


def test_importing_the_training_package_and_its_readers_imports_no_torch() -> None:
    script = (
        "import sys, imageloop.training, imageloop.training.triplets, imageloop.training.progress; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_a_triplet_image_outside_the_folder_of_its_file_is_refused(tmp_path: Path, how: str) -> None:
    records = colour_triplets(tmp_path / "elsewhere", [("dot", "red", "blue")], relative=False)
    name = str(records[0]["reference_image"])
    records[0]["reference_image"] = (
        name if how == "absolute" else "../elsewhere/" + Path(name).relative_to(tmp_path / "elsewhere").as_posix()
    )
    with pytest.raises(ImageloopError, match=r"real\.jsonl:1: image .* lies outside"):
        read_triplets(write_jsonl(tmp_path / "dataset" / "real.jsonl", records))


def test_a_triplet_image_in_a_folder_the_caller_names_is_read(tmp_path: Path) -> None:
    records = colour_triplets(tmp_path / "benchmark", [("dot", "red", "blue")], relative=False)
    triplets = read_triplets(write_jsonl(tmp_path / "dataset" / "real.jsonl", records), [tmp_path / "benchmark"])
    assert triplets[0].reference_image == Path(records[0]["reference_image"])
