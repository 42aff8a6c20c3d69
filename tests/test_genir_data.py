"""GenIR benchmark loaders: the releases' own files become targets; anything else is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageloop.errors import ImageloopError
from imageloop.eval.genir_data import (
    BenchmarkTarget,
    load_chatir_queries,
    load_flickr30k,
    load_genir_benchmark,
    load_image_folder,
    load_search_space,
    load_visdial,
    sample,
)
from tests.image_folders import write_image
from tests.strategies import json_values, loads_or_refuses, mangled

VISDIAL = {
    "version": "1.0",
    "split": "val2018",
    "data": {
        "questions": ["is it sunny", "how many dogs", "is the photo in color?"],
        "answers": ["yes", "2", "no, black and white"],
        "dialogs": [
            {
                "image_id": 42,
                "caption": "two dogs on a beach",
                "dialog": [
                    {"question": 0, "answer": 0, "answer_options": [0, 1], "gt_index": 0},
                    {"question": 1, "answer": 1, "answer_options": [0, 1], "gt_index": 1},
                ],
            },
            {"image_id": 7, "caption": "an old street", "dialog": [{"question": 2, "answer": 2}]},
        ],
    },
}
KARPATHY = {
    "dataset": "flickr30k",
    "images": [
        {"filename": "100.jpg", "split": "test", "sentences": [{"raw": "A dog runs ."}, {"raw": "A brown dog ."}]},
        {"filename": "200.jpg", "split": "train", "sentences": [{"raw": "Two men talk ."}]},
    ],
}


def coco_images(root: Path, ids: list[int]) -> Path:
    """A COCO root with unlabeled2017/<12-digit id>.jpg, as the ChatIR protocol expects."""
    for shade, image_id in enumerate(ids):
        write_image(root / "unlabeled2017" / f"{image_id:012d}.jpg", 30 * (shade + 1))
    return root


def write_json(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def test_visdial_dialogues_become_targets_with_caption_and_question_answer_rounds(tmp_path: Path) -> None:
    images = coco_images(tmp_path / "coco", [42, 7])
    targets = load_visdial(write_json(tmp_path / "visdial_1.0_val.json", VISDIAL), images)
    assert targets[0] == BenchmarkTarget(
        "unlabeled2017/000000000042.jpg",
        images / "unlabeled2017" / "000000000042.jpg",
        ("two dogs on a beach",),
        ("is it sunny? yes", "how many dogs? 2"),
    )
    # A question that already ends in "?" keeps just one, as in ChatIR's own file.
    assert targets[1].dialog == ("is the photo in color? no, black and white",)


def test_visdial_reads_its_own_val2018_image_names_too(tmp_path: Path) -> None:
    for image_id in (42, 7):
        write_image(tmp_path / "imgs" / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg", 50)
    targets = load_visdial(write_json(tmp_path / "v.json", VISDIAL), tmp_path / "imgs")
    assert [t.id for t in targets] == [
        "VisualDialog_val2018/VisualDialog_val2018_000000000042.jpg",
        "VisualDialog_val2018/VisualDialog_val2018_000000000007.jpg",
    ]


def test_missing_visdial_images_are_named_with_every_place_looked(tmp_path: Path) -> None:
    with pytest.raises(ImageloopError) as raised:
        load_visdial(write_json(tmp_path / "v.json", VISDIAL), tmp_path / "coco")
    message = str(raised.value)
    assert "image '42' not found at " in message and "unlabeled2017/000000000042.jpg or " in message
    assert "VisualDialog_val2018_000000000042.jpg" in message and "(1 more images are missing too)" in message


def test_a_visdial_answer_index_past_the_table_is_refused(tmp_path: Path) -> None:
    broken = json.loads(json.dumps(VISDIAL))
    broken["data"]["dialogs"][1]["dialog"][0]["answer"] = 3
    with pytest.raises(ImageloopError, match="dialog 1, round 0: answer index 3 is outside the file's 3 answers"):
        load_visdial(write_json(tmp_path / "v.json", broken), coco_images(tmp_path, [42, 7]))


def test_chatir_query_lists_open_with_the_caption_and_genir_lists_carry_none(tmp_path: Path) -> None:
    images = coco_images(tmp_path, [1, 2])
    queries = [
        {"img": "unlabeled2017/000000000001.jpg", "dialog": ["a cat", "is it black? yes"]},
        {"img": "unlabeled2017/000000000002.jpg", "dialog": []},
    ]
    first, second = load_chatir_queries(write_json(tmp_path / "q.json", queries), images)
    assert (first.captions, first.dialog) == (("a cat",), ("is it black? yes",))
    assert (second.captions, second.dialog, second.path) == ((), (), images / "unlabeled2017" / "000000000002.jpg")


def test_an_image_has_the_same_id_whichever_file_lists_it(tmp_path: Path) -> None:
    write_image(tmp_path / "00000" / "00001.png", 10)
    queries = write_json(tmp_path / "q.json", [{"img": "./00000//00001.png", "dialog": []}])
    assert load_chatir_queries(queries, tmp_path)[0].id == load_image_folder(tmp_path)[0].id == "00000/00001.png"


def test_a_query_image_outside_the_images_folder_is_refused(tmp_path: Path) -> None:
    queries = [{"img": "/etc/passwd", "dialog": []}]
    with pytest.raises(ImageloopError, match="entry 0: '/etc/passwd' is not a path inside"):
        load_chatir_queries(write_json(tmp_path / "q.json", queries), tmp_path)


def test_the_search_space_lists_corpus_images_and_names_a_missing_one(tmp_path: Path) -> None:
    images = coco_images(tmp_path, [1, 2])
    corpus = ["unlabeled2017/000000000001.jpg", "unlabeled2017/000000000002.jpg"]
    assert load_search_space(write_json(tmp_path / "s.json", corpus), images) == [images / c for c in corpus]
    with pytest.raises(ImageloopError, match=r"image 'unlabeled2017/000000000003\.jpg' not found at"):
        load_search_space(write_json(tmp_path / "s.json", [*corpus, "unlabeled2017/000000000003.jpg"]), images)


def test_flickr30k_karpathy_json_gives_every_caption_and_filters_by_split(tmp_path: Path) -> None:
    for name in ("100.jpg", "200.jpg"):
        write_image(tmp_path / "flickr30k-images" / name, 80)
    annotations = write_json(tmp_path / "dataset_flickr30k.json", KARPATHY)
    everything = load_flickr30k(annotations, tmp_path / "flickr30k-images")
    assert [(t.id, t.captions) for t in everything] == [
        ("100.jpg", ("A dog runs .", "A brown dog .")),
        ("200.jpg", ("Two men talk .",)),
    ]
    assert [t.id for t in load_flickr30k(annotations, tmp_path / "flickr30k-images", split="test")] == ["100.jpg"]


def test_flickr30k_token_file_groups_captions_by_image(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "100.jpg", 80)
    token = tmp_path / "results_20130124.token"
    token.write_text("100.jpg#0\tA dog runs .\n100.jpg#1\tA brown dog .\n\n", encoding="utf-8")
    assert load_flickr30k(token, tmp_path / "images")[0].captions == ("A dog runs .", "A brown dog .")
    with pytest.raises(ImageloopError, match=r"the \.token file has no splits"):
        load_flickr30k(token, tmp_path / "images", split="test")


def test_a_malformed_token_line_is_named_by_its_number(tmp_path: Path) -> None:
    token = tmp_path / "results_20130124.token"
    token.write_text("100.jpg#0\tA dog runs .\nno tab here\n", encoding="utf-8")
    with pytest.raises(ImageloopError, match=r"line 2: expected '<image>\.jpg#<n><TAB><caption>'"):
        load_flickr30k(token, tmp_path)


def test_an_image_folder_gives_every_image_in_path_order_with_relative_ids(tmp_path: Path) -> None:
    for name in ("01000/01001.png", "00000/00002.png", ".cache/x.png"):
        write_image(tmp_path / name, 60)
    (tmp_path / "00000" / "notes.txt").write_text("not an image")
    assert [t.id for t in load_image_folder(tmp_path)] == ["00000/00002.png", "01000/01001.png"]


def test_an_empty_or_absent_image_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageloopError, match="no images found"):
        load_image_folder(tmp_path)
    with pytest.raises(ImageloopError, match="no such images folder"):
        load_image_folder(tmp_path / "absent")


def test_benchmarks_read_a_query_list_when_given_one_and_the_folder_otherwise(tmp_path: Path) -> None:
    write_image(tmp_path / "faces" / "00000" / "00001.png", 10)
    write_image(tmp_path / "faces" / "00000" / "00002.png", 20)
    queries = write_json(tmp_path / "ffhq_queries_2000.json", [{"img": "00000/00002.png", "dialog": []}])
    assert [t.id for t in load_genir_benchmark("ffhq", tmp_path / "faces", queries)] == ["00000/00002.png"]
    assert len(load_genir_benchmark("clothing-adc", tmp_path / "faces")) == 2


@pytest.mark.parametrize(
    ("benchmark", "annotations", "message"),
    [
        ("cifar", None, "expected one of mscoco, flickr30k, ffhq, clothing-adc"),
        ("mscoco", None, "mscoco needs the VisDial dialogues"),
        ("flickr30k", None, "flickr30k needs its captions"),
        ("ffhq", "captions.txt", r"expected a ChatIR-format query list \(\.json\) for ffhq"),
        ("clothing-adc", "dataset.json", "expected a ChatIR-format query list"),
    ],
)
def test_a_benchmark_without_usable_annotations_says_what_it_needs(
    tmp_path: Path, benchmark: str, annotations: str | None, message: str
) -> None:
    path = None if annotations is None else write_json(tmp_path / annotations, {"images": []})
    with pytest.raises(ImageloopError, match=message):
        load_genir_benchmark(benchmark, tmp_path, path)


def test_a_sample_is_the_same_for_the_same_seed_and_keeps_the_benchmark_order() -> None:
    targets = list(range(100))
    picked = sample(targets, 10, seed=42)
    assert picked == sample(targets, 10, seed=42) == sorted(picked) and len(set(picked)) == 10
    assert picked != sample(targets, 10, seed=43)
    assert sample(targets, None, seed=0) == targets


@pytest.mark.parametrize("n", [0, 101, -1])
def test_a_sample_larger_than_the_benchmark_or_empty_is_refused(n: int) -> None:
    with pytest.raises(ImageloopError, match=f"`sample` {n}: expected 1 to 100"):
        sample(list(range(100)), n, seed=0)


@settings(max_examples=100)
@given(size=st.integers(1, 50), data=st.data())
def test_any_sample_is_an_ordered_subset_of_the_asked_size(size: int, data: st.DataObject) -> None:
    n, seed = data.draw(st.integers(1, size)), data.draw(st.integers())
    picked = sample(list(range(size)), n, seed)
    assert len(picked) == n and picked == sorted(set(picked))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images for every loader's valid files: COCO ids 42 and 7, Flickr30k 100.jpg and 200.jpg."""
    root = coco_images(tmp_path_factory.mktemp("genir"), [42, 7])
    for name in ("100.jpg", "200.jpg"):
        write_image(root / name, 90)
    return root


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_mangled_visdial_files_load_or_raise_imageloop_error(dataset: Path, data: st.DataObject) -> None:
    annotations = write_json(dataset / "visdial.json", data.draw(mangled(VISDIAL)))
    loads_or_refuses(lambda: load_visdial(annotations, dataset))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_mangled_karpathy_files_load_or_raise_imageloop_error(dataset: Path, data: st.DataObject) -> None:
    annotations = write_json(dataset / "karpathy.json", data.draw(mangled(KARPATHY)))
    split = data.draw(st.sampled_from([None, "test", "val"]))
    loads_or_refuses(lambda: load_flickr30k(annotations, dataset, split))


@settings(max_examples=100, deadline=None)
@given(
    benchmark=st.sampled_from(["mscoco", "flickr30k", "ffhq", "clothing-adc"]),
    document=json_values(("img", "dialog", "data", "dialogs", "images", "sentences", "raw", "filename")),
)
def test_annotations_of_any_json_shape_load_or_raise_imageloop_error(
    dataset: Path, benchmark: str, document: object
) -> None:
    annotations = write_json(dataset / "annotations.json", document)
    loads_or_refuses(lambda: load_genir_benchmark(benchmark, dataset, annotations))


@settings(max_examples=100, deadline=None)
@given(text=st.text())
def test_token_files_of_any_text_load_or_raise_imageloop_error(dataset: Path, text: str) -> None:
    token = dataset / "results.token"
    token.write_text(text, encoding="utf-8", errors="surrogatepass")
    loads_or_refuses(lambda: load_flickr30k(token, dataset))
