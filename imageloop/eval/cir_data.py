"""Composed image retrieval (CIR) benchmarks read from the user's disk: CIRR and FashionIQ.

A CIR query is a reference image plus a modification text; the answer is one target image in a
gallery. Neither benchmark redistributes its images, so the user points us at their own copies.

CIRR (Liu et al., ICCV 2021; annotations: https://github.com/Cuberick-Orion/CIRR, branch cirr_dataset):
- `captions/cap.rc2.{split}.json`: a list of `{"pairid", "reference", "target_hard", "target_soft",
  "caption", "img_set": {"id", "members"}}`; the test1 split has no `target_hard` (its ground truth is
  kept by the evaluation server).
- `image_splits/split.rc2.{split}.json`: `{image name: "./dev/<name>.png"}`, paths relative to the raw
  images, which come from NLVR2 (the CIRR README's layout puts them under `img_raw/`).

FashionIQ (Wu et al., CVPR 2021; https://github.com/XiaoxiaoGuo/fashion-iq):
- `captions/cap.{category}.{split}.json`: a list of `{"candidate", "target", "captions": [c1, c2]}`.
- `image_splits/split.{category}.{split}.json`: the gallery, a list of image names.
- `images/<name>.png` or `.jpg`: the images are downloaded from product URLs and the copies in
  circulation differ; CLIP4Cir (ABaldrati/CLIP4Cir, src/data_utils.py) reads `<name>.jpg`, SPRC
  (chunmeifeng/SPRC, src/data_utils.py) reads `<name>.png`. Both are accepted, and `.jpeg`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imageloop.errors import ImageloopError
from imageloop.eval.annotations import (
    as_dict,
    as_list,
    get_int,
    get_str,
    get_str_list,
    inside,
    missing_images,
    read_json,
    require_files,
)

CIRR_SPLITS = ("train", "val", "test1")
FASHIONIQ_SPLITS = ("train", "val", "test")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
# In the order they are tried when a FashionIQ name has more than one file.
FASHIONIQ_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class CIRQuery:
    """One composed query: change `reference` as `modification` says, and `target` is the answer.

    `target` is None where the benchmark keeps it secret (CIRR test1, FashionIQ test). `subset` is
    CIRR's `img_set.members`, as released (the reference included): Recall_subset ranks within it.
    """

    id: str
    reference: str
    modification: str
    target: str | None
    subset: tuple[str, ...] = ()


@dataclass(frozen=True)
class CIRBenchmark:
    """The queries of one benchmark split and the gallery they are searched in (image name -> file)."""

    name: str
    split: str
    queries: tuple[CIRQuery, ...]
    gallery: dict[str, Path]


def fashioniq_modification(captions: Sequence[str]) -> str:
    """FashionIQ's two relative captions as one modification text, the way CLIP4Cir and SPRC evaluate.

    Both join them deterministically at validation as `f"{c1.strip('.?, ').capitalize()} and
    {c2.strip('.?, ')}"` (CLIP4Cir src/validate.py, generate_fiq_val_predictions; SPRC
    src/validate_blip.py, the same line). `str.capitalize` also lowercases the rest of the first
    caption; that is kept, so text embeddings see what the published numbers saw.
    """
    first, second = captions
    return f"{first.strip('.?, ').capitalize()} and {second.strip('.?, ')}"


def load_cirr(root: Path, split: str = "val", images: Path | None = None) -> CIRBenchmark:
    """CIRR's queries and gallery for `split`, with every image checked on disk.

    `root` holds `captions/` and `image_splits/`; `images` is the folder the split file's relative
    paths start from (default `root/img_raw`, the CIRR README's layout).
    """
    if split not in CIRR_SPLITS:
        raise ImageloopError(f"CIRR split {split!r}: expected one of {', '.join(CIRR_SPLITS)}")
    images = root / "img_raw" if images is None else images
    split_file = root / "image_splits" / f"split.rc2.{split}.json"
    names = as_dict(read_json(split_file, "CIRR's image split (name -> relative path)"), str(split_file))
    gallery: dict[str, Path] = {}
    for name, relative in names.items():
        if not isinstance(relative, str):
            raise ImageloopError(f"{split_file}: the path of {name!r} should be a string")
        gallery[name] = inside(images, relative, f"{split_file}, image {name!r}")

    captions_file = root / "captions" / f"cap.rc2.{split}.json"
    entries = as_list(read_json(captions_file, "CIRR's captions (a list of query pairs)"), str(captions_file))
    queries = tuple(_cirr_query(entry, split, f"{captions_file}, entry {i}") for i, entry in enumerate(entries))
    _check_queries(queries, captions_file)
    _check_names(queries, gallery, str(split_file))
    require_files(gallery.items(), f"CIRR {split} (images folder {images})")
    return CIRBenchmark("cirr", split, queries, gallery)


def _check_queries(queries: Sequence[CIRQuery], captions_file: Path) -> None:
    """Refuse a captions file with no query (its recalls would read 0, not "nothing measured") or with a query
    id twice (one pair would count twice, and a resumed run would take one for the other)."""
    if not queries:
        raise ImageloopError(f"{captions_file}: holds no queries; expected the benchmark's captions")
    seen: set[str] = set()
    for query in queries:
        if query.id in seen:
            raise ImageloopError(f"{captions_file}: query {query.id!r} appears twice; each pair id must be unique")
        seen.add(query.id)


def _cirr_query(entry: object, split: str, where: str) -> CIRQuery:
    pair = as_dict(entry, where)
    pairid = pair.get("pairid")
    query_id = pairid if isinstance(pairid, str) else str(get_int(pair, "pairid", where))
    img_set = as_dict(pair.get("img_set"), f"{where}, 'img_set'")
    members = tuple(get_str_list(img_set, "members", f"{where}, 'img_set'"))
    # test1's targets are the evaluation server's secret; every other split names one.
    target = None if split == "test1" else get_str(pair, "target_hard", where)
    if target is not None and target not in members:
        raise ImageloopError(f"{where}: target {target!r} is not among its img_set members")
    return CIRQuery(query_id, get_str(pair, "reference", where), get_str(pair, "caption", where), target, members)


def load_fashioniq(
    root: Path,
    split: str = "val",
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    images: Path | None = None,
) -> dict[str, CIRBenchmark]:
    """FashionIQ's queries and gallery per category (each is searched in its own gallery), images checked.

    `root` holds `captions/` and `image_splits/`; `images` holds `<name>.png` or `<name>.jpg`
    (default `root/images`).
    """
    if split not in FASHIONIQ_SPLITS:
        raise ImageloopError(f"FashionIQ split {split!r}: expected one of {', '.join(FASHIONIQ_SPLITS)}")
    unknown = [c for c in categories if c not in FASHIONIQ_CATEGORIES]
    if unknown or not categories:
        raise ImageloopError(
            f"FashionIQ categories {', '.join(unknown) or '(none)'}: expected some of {', '.join(FASHIONIQ_CATEGORIES)}"
        )
    images = root / "images" if images is None else images
    files = _files_by_stem(images)
    return {category: _fashioniq_category(root, split, category, images, files) for category in categories}


def _fashioniq_category(root: Path, split: str, category: str, images: Path, files: dict[str, Path]) -> CIRBenchmark:
    split_file = root / "image_splits" / f"split.{category}.{split}.json"
    names = as_list(read_json(split_file, f"FashionIQ's {category} gallery (a list of image names)"), str(split_file))
    gallery: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ImageloopError(f"{split_file}: image names should be strings, found {name!r}")
        if name in files:
            gallery[name] = files[name]
        else:
            missing.append(name)
    if missing:
        tried = ", ".join(f"{missing[0]}{suffix}" for suffix in FASHIONIQ_SUFFIXES)
        raise missing_images(f"FashionIQ {category} {split}", missing[0], f"in {images} ({tried})", len(missing))

    captions_file = root / "captions" / f"cap.{category}.{split}.json"
    entries = as_list(read_json(captions_file, f"FashionIQ's {category} captions"), str(captions_file))
    queries = tuple(
        _fashioniq_query(entry, f"{category}-{i}", split, f"{captions_file}, entry {i}")
        for i, entry in enumerate(entries)
    )
    _check_queries(queries, captions_file)
    _check_names(queries, gallery, str(split_file))
    return CIRBenchmark(f"fashioniq-{category}", split, queries, gallery)


def _fashioniq_query(entry: object, query_id: str, split: str, where: str) -> CIRQuery:
    triplet = as_dict(entry, where)
    captions = get_str_list(triplet, "captions", where)
    if len(captions) != 2:
        raise ImageloopError(f"{where}: 'captions' should hold two relative captions, found {len(captions)}")
    target = None if split == "test" else get_str(triplet, "target", where)
    return CIRQuery(query_id, get_str(triplet, "candidate", where), fashioniq_modification(captions), target)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """Image name -> file, listing the folder once (a FashionIQ gallery has thousands of names)."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as e:
        raise ImageloopError(f"FashionIQ images folder {folder}: cannot list it ({e.strerror})") from None
    rank = {suffix: i for i, suffix in enumerate(FASHIONIQ_SUFFIXES)}
    chosen: dict[str, tuple[int, Path]] = {}
    for entry in entries:
        stem, suffix = os.path.splitext(entry.name)
        order = rank.get(suffix.lower())
        if order is not None and entry.is_file() and (stem not in chosen or order < chosen[stem][0]):
            chosen[stem] = (order, Path(entry.path))
    return {stem: path for stem, (_, path) in chosen.items()}


def _check_names(queries: Sequence[CIRQuery], gallery: dict[str, Path], split_file: str) -> None:
    """Every image a query names must be in the gallery: the metrics rank within it."""
    for query in queries:
        for name in (query.reference, query.target, *query.subset):
            if name is not None and name not in gallery:
                raise ImageloopError(f"query {query.id} names image {name!r}, which {split_file} does not list")
