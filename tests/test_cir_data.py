"""CIRR and FashionIQ loaders: the released layouts load, anything else is a one-line ImageloopError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageloop.errors import ImageloopError
from imageloop.eval.cir_data import (
    CIRQuery,
    fashioniq_modification,
    load_cirr,
    load_fashioniq,
)
from tests.cir_fixtures import CIRRFixture, FashionIQFixture, write_cirr, write_fashioniq
from tests.image_folders import write_image
from tests.strategies import json_values, loads_or_refuses, mangled

CIRR_KEYS = ("pairid", "reference", "target_hard", "caption", "img_set", "members", "id")
FASHIONIQ_KEYS = ("candidate", "target", "captions")


def test_cirr_val_gives_each_pair_its_reference_text_target_and_subset(tmp_path: Path) -> None:
    fixture = write_cirr(tmp_path)
    cirr = load_cirr(tmp_path)
    assert (cirr.name, cirr.split, len(cirr.queries)) == ("cirr", "val", 4)
    assert cirr.queries[0] == CIRQuery(
        "0", "dev-0-0-img0", "make it brighter", "dev-0-1-img0", tuple(fixture.names[:6])
    )


def test_the_cirr_gallery_is_every_image_of_the_split_resolved_under_the_images_folder(tmp_path: Path) -> None:
    fixture = write_cirr(tmp_path)
    gallery = load_cirr(tmp_path).gallery
    assert list(gallery) == fixture.names
    assert gallery["dev-1-5-img0"] == fixture.images / "dev" / "dev-1-5-img0.png"


def test_cirr_images_can_live_in_a_folder_of_their_own(tmp_path: Path) -> None:
    write_cirr(tmp_path / "cirr")
    (tmp_path / "cirr" / "img_raw").rename(tmp_path / "nlvr2")
    assert len(load_cirr(tmp_path / "cirr", images=tmp_path / "nlvr2").gallery) == 12


def test_cirr_test1_queries_carry_no_target(tmp_path: Path) -> None:
    write_cirr(tmp_path, split="test1")
    queries = load_cirr(tmp_path, split="test1").queries
    assert [q.target for q in queries] == [None] * 4 and queries[0].subset


def test_an_unknown_cirr_split_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ImageloopError, match="'dev': expected one of train, val, test1"):
        load_cirr(tmp_path, split="dev")


def test_missing_cirr_annotations_say_which_file_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ImageloopError, match=r"split\.rc2\.val\.json not found: expected CIRR's image split"):
        load_cirr(tmp_path)


def test_a_missing_cirr_image_is_named_with_where_it_was_looked_for(tmp_path: Path) -> None:
    fixture = write_cirr(tmp_path)
    for name in ("dev-0-3-img0", "dev-1-2-img0"):
        (fixture.images / "dev" / f"{name}.png").unlink()
    with pytest.raises(ImageloopError) as raised:
        load_cirr(tmp_path)
    message = str(raised.value)
    assert "'dev-0-3-img0' not found at " + str(fixture.images / "dev" / "dev-0-3-img0.png") in message
    assert "1 more images are missing too" in message and "\n" not in message


def test_a_split_path_that_leaves_the_images_folder_is_refused(tmp_path: Path) -> None:
    fixture = write_cirr(tmp_path)
    split = {name: f"./dev/{name}.png" for name in fixture.names} | {"dev-0-0-img0": "../../secret.png"}
    (tmp_path / "image_splits" / "split.rc2.val.json").write_text(json.dumps(split))
    with pytest.raises(ImageloopError, match=r"'\.\./\.\./secret\.png' is not a path inside"):
        load_cirr(tmp_path)


def test_a_query_naming_an_image_outside_the_split_is_refused(tmp_path: Path) -> None:
    fixture = write_cirr(tmp_path)
    pairs = [dict(fixture.pairs[0], reference="dev-9-9-img9"), *fixture.pairs[1:]]
    (tmp_path / "captions" / "cap.rc2.val.json").write_text(json.dumps(pairs))
    with pytest.raises(ImageloopError, match=r"query 0 names image 'dev-9-9-img9', which .* does not list"):
        load_cirr(tmp_path)


def test_a_target_outside_its_subset_is_refused(tmp_path: Path) -> None:
    fixture = write_cirr(tmp_path)
    pairs = [dict(fixture.pairs[0], target_hard="dev-1-0-img0"), *fixture.pairs[1:]]
    (tmp_path / "captions" / "cap.rc2.val.json").write_text(json.dumps(pairs))
    with pytest.raises(ImageloopError, match=r"entry 0: target 'dev-1-0-img0' is not among its img_set members"):
        load_cirr(tmp_path)


def test_a_cirr_entry_without_a_caption_names_the_file_and_entry(tmp_path: Path) -> None:
    fixture = write_cirr(tmp_path)
    pairs = [*fixture.pairs[:2], {k: v for k, v in fixture.pairs[2].items() if k != "caption"}]
    (tmp_path / "captions" / "cap.rc2.val.json").write_text(json.dumps(pairs))
    with pytest.raises(ImageloopError, match=r"cap\.rc2\.val\.json, entry 2: 'caption' should be a string"):
        load_cirr(tmp_path)


def test_fashioniq_searches_each_category_in_its_own_gallery(tmp_path: Path) -> None:
    fixture = write_fashioniq(tmp_path)
    categories = load_fashioniq(tmp_path)
    assert list(categories) == ["dress", "shirt", "toptee"]
    dress = categories["dress"]
    assert (dress.name, list(dress.gallery)) == ("fashioniq-dress", fixture.galleries["dress"])
    assert dress.queries[0] == CIRQuery("dress-0", "B0DRES0000", "Is darker and has long sleeves", "B0DRES0001")


def test_fashioniq_captions_are_joined_as_clip4cir_evaluates_them() -> None:
    assert fashioniq_modification(["is darker.", "has long sleeves?"]) == "Is darker and has long sleeves"
    # str.capitalize lowercases the rest of the first caption, as the reference code's numbers saw it.
    assert fashioniq_modification(["Is RED, ", "Shorter"]) == "Is red and Shorter"


def test_fashioniq_reads_jpg_copies_and_prefers_png_when_both_exist(tmp_path: Path) -> None:
    write_fashioniq(tmp_path, categories=["shirt"], suffix=".jpg")
    write_image(tmp_path / "images" / "B0SHIR0002.png", 200)
    gallery = load_fashioniq(tmp_path, categories=["shirt"])["shirt"].gallery
    assert gallery["B0SHIR0001"].name == "B0SHIR0001.jpg" and gallery["B0SHIR0002"].name == "B0SHIR0002.png"


def test_a_missing_fashioniq_image_lists_the_file_names_tried(tmp_path: Path) -> None:
    write_fashioniq(tmp_path, categories=["toptee"])
    (tmp_path / "images" / "B0TOPT0001.png").unlink()
    with pytest.raises(ImageloopError, match=r"toptee val: image 'B0TOPT0001' not found in .*B0TOPT0001\.jpeg"):
        load_fashioniq(tmp_path, categories=["toptee"])


@pytest.mark.parametrize("categories", [["dress", "coat"], []])
def test_unknown_or_no_fashioniq_categories_are_refused(tmp_path: Path, categories: list[str]) -> None:
    with pytest.raises(ImageloopError, match="expected some of dress, shirt, toptee"):
        load_fashioniq(tmp_path, categories=categories)


def test_a_fashioniq_entry_with_three_captions_is_refused(tmp_path: Path) -> None:
    fixture = write_fashioniq(tmp_path, categories=["dress"])
    triplets = [dict(fixture.triplets["dress"][0], captions=["a", "b", "c"])]
    (tmp_path / "captions" / "cap.dress.val.json").write_text(json.dumps(triplets))
    with pytest.raises(ImageloopError, match="should hold two relative captions, found 3"):
        load_fashioniq(tmp_path, categories=["dress"])


@pytest.fixture(scope="module")
def cirr_folder(tmp_path_factory: pytest.TempPathFactory) -> CIRRFixture:
    return write_cirr(tmp_path_factory.mktemp("cirr"))


@pytest.fixture(scope="module")
def fashioniq_folder(tmp_path_factory: pytest.TempPathFactory) -> FashionIQFixture:
    return write_fashioniq(tmp_path_factory.mktemp("fashioniq"), categories=["dress"])


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_mangled_cirr_files_load_or_raise_imageloop_error(cirr_folder: CIRRFixture, data: st.DataObject) -> None:
    split = {name: f"./dev/{name}.png" for name in cirr_folder.names}
    _write(cirr_folder.root / "image_splits" / "split.rc2.val.json", data.draw(mangled(split)))
    _write(cirr_folder.root / "captions" / "cap.rc2.val.json", data.draw(mangled(cirr_folder.pairs)))
    loads_or_refuses(lambda: load_cirr(cirr_folder.root))


@settings(max_examples=100, deadline=None)
@given(captions=json_values(CIRR_KEYS), split=json_values())
def test_cirr_files_of_any_json_shape_load_or_raise_imageloop_error(
    cirr_folder: CIRRFixture, captions: object, split: object
) -> None:
    _write(cirr_folder.root / "image_splits" / "split.rc2.val.json", split)
    _write(cirr_folder.root / "captions" / "cap.rc2.val.json", captions)
    loads_or_refuses(lambda: load_cirr(cirr_folder.root))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_mangled_fashioniq_files_load_or_raise_imageloop_error(
    fashioniq_folder: FashionIQFixture, data: st.DataObject
) -> None:
    root = fashioniq_folder.root
    _write(root / "image_splits" / "split.dress.val.json", data.draw(mangled(fashioniq_folder.galleries["dress"])))
    _write(root / "captions" / "cap.dress.val.json", data.draw(mangled(fashioniq_folder.triplets["dress"])))
    loads_or_refuses(lambda: load_fashioniq(root, categories=["dress"]))


@settings(max_examples=100, deadline=None)
@given(captions=json_values(FASHIONIQ_KEYS), split=json_values())
def test_fashioniq_files_of_any_json_shape_load_or_raise_imageloop_error(
    fashioniq_folder: FashionIQFixture, captions: object, split: object
) -> None:
    root = fashioniq_folder.root
    _write(root / "image_splits" / "split.dress.val.json", split)
    _write(root / "captions" / "cap.dress.val.json", captions)
    loads_or_refuses(lambda: load_fashioniq(root, categories=["dress"]))


@settings(max_examples=50, deadline=None)
@given(raw=st.binary(max_size=64))
def test_a_captions_file_that_is_not_json_is_one_line_error(cirr_folder: CIRRFixture, raw: bytes) -> None:
    (cirr_folder.root / "captions" / "cap.rc2.val.json").write_bytes(raw)
    _write(cirr_folder.root / "image_splits" / "split.rc2.val.json", {})
    loads_or_refuses(lambda: load_cirr(cirr_folder.root))


def _write(path: Path, value: object) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def test_a_pair_id_twice_is_refused_naming_it(tmp_path: Path) -> None:
    write_cirr(tmp_path)
    captions = tmp_path / "captions" / "cap.rc2.val.json"
    pairs = json.loads(captions.read_text())
    _write(captions, [*pairs, pairs[0]])
    with pytest.raises(ImageloopError, match=rf"query '{pairs[0]['pairid']}' appears twice"):
        load_cirr(tmp_path)


def test_a_captions_file_with_no_query_is_refused_not_scored_zero(tmp_path: Path) -> None:
    write_cirr(tmp_path)
    _write(tmp_path / "captions" / "cap.rc2.val.json", [])
    with pytest.raises(ImageloopError, match="holds no queries"):
        load_cirr(tmp_path)
