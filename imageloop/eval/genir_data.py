"""GenIR benchmark targets read from the user's disk: MSCOCO (VisDial), Flickr30k, FFHQ, Clothing-ADC.

GenIR (Yang et al., NeurIPS 2025, arXiv:2506.06220; code: github.com/mikelmh025/generative_ir)
follows the ChatIR protocol (Levy et al., NeurIPS 2023; github.com/levymsn/ChatIR):
- MSCOCO: the 2,064 VisDial v1.0 val dialogues are the targets, searched among 50,000 COCO
  unlabeled2017 images. ChatIR ships both as JSON (`dialogues/VisDial_v1.0_queries_val.json`,
  `ChatIR_Protocol/Search_Space_val_50k.json`), naming images relative to a COCO root
  (`unlabeled2017/000000185565.jpg`: the VisDial val images are COCO unlabeled2017 images with
  the same number). Each ChatIR dialogue is the caption, then ten rounds written "question? answer".
- Flickr30k, FFHQ, Clothing-ADC: GenIR's own scripts (create_flicker30k.py, create_ffhq_json.py,
  create_clothingADC_json.py) list every image of a folder as the corpus (FFHQ: 50,000 of them) and
  draw 2,000 queries from it with seed 42, written in ChatIR's format with empty dialogues
  (`flickr30k_data/flickr30k_queries_2000.json` and the like). Clothing-ADC is read there as a
  folder of PNG files (`004/0045166.png`); no other description of its release format was found,
  so it loads as a plain image folder or from those query lists.

Every loader returns `BenchmarkTarget`s whose `id` is the image's path relative to the images
folder, so the same image has the same id whichever file listed it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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
from imageloop.tools.images import image_files

T = TypeVar("T")

GENIR_BENCHMARKS = ("mscoco", "flickr30k", "ffhq", "clothing-adc")
GENIR_SAMPLE_SEED = 42
"""The seed GenIR's create_*_json.py scripts draw their 2,000 queries with; ``sample` N` draws with it too."""
# Karpathy's split names in dataset_flickr30k.json.
FLICKR30K_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BenchmarkTarget:
    """An image a (simulated) user searches for, and the words the benchmark gives about it.

    `captions` are human captions of the image; `dialog` holds question-answer rounds written
    "question? answer" (ChatIR's form), after the caption that opens them.
    """

    id: str
    path: Path
    captions: tuple[str, ...] = ()
    dialog: tuple[str, ...] = ()


def load_visdial(annotations: Path, images: Path) -> list[BenchmarkTarget]:
    """The VisDial v1.0 val dialogues as targets: `visdial_1.0_val.json` or ChatIR's query file.

    `images` is the COCO root holding `unlabeled2017/` (the ChatIR protocol); a folder of VisDial's
    own `VisualDialog_val2018_<id>.jpg` files works too.
    """
    document = read_json(annotations, "VisDial v1.0 dialogues (visdial_1.0_val.json) or ChatIR's query list")
    if isinstance(document, list):
        return _chatir_queries(document, annotations, images)
    data = as_dict(as_dict(document, str(annotations)).get("data"), f"{annotations}, 'data'")
    questions = get_str_list(data, "questions", f"{annotations}, 'data'")
    answers = get_str_list(data, "answers", f"{annotations}, 'data'")
    targets: list[BenchmarkTarget] = []
    missing: list[tuple[int, list[Path]]] = []
    for i, entry in enumerate(as_list(data.get("dialogs"), f"{annotations}, 'data.dialogs'")):
        where = f"{annotations}, dialog {i}"
        dialog = as_dict(entry, where)
        image_id = get_int(dialog, "image_id", where)
        rounds = [
            _visdial_round(as_dict(turn, f"{where}, round {j}"), questions, answers, f"{where}, round {j}")
            for j, turn in enumerate(as_list(dialog.get("dialog"), f"{where}, 'dialog'"))
        ]
        caption = get_str(dialog, "caption", where)
        candidates = _visdial_image_candidates(images, image_id)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append((image_id, candidates))
            continue
        targets.append(BenchmarkTarget(_relative(path, images), path, (caption,), tuple(rounds)))
    if missing:
        image_id, candidates = missing[0]
        looked = "at " + " or ".join(str(p) for p in candidates)
        raise missing_images(f"VisDial val ({annotations})", str(image_id), looked, len(missing))
    return targets


def _visdial_round(turn: dict[str, object], questions: list[str], answers: list[str], where: str) -> str:
    """One round as ChatIR writes it: VisDial stores questions without their question mark."""
    question = _indexed(questions, get_int(turn, "question", where), "question", where)
    answer = _indexed(answers, get_int(turn, "answer", where), "answer", where)
    return f"{question.rstrip('?')}? {answer}"


def _indexed(table: list[str], index: int, kind: str, where: str) -> str:
    if not 0 <= index < len(table):
        raise ImageloopError(f"{where}: {kind} index {index} is outside the file's {len(table)} {kind}s")
    return table[index]


def _visdial_image_candidates(images: Path, image_id: int) -> list[Path]:
    """Where a VisDial val image may be: COCO unlabeled2017 (ChatIR), or VisDial's own file names."""
    coco = f"{image_id:012d}.jpg"
    visdial = f"VisualDialog_val2018_{image_id:012d}.jpg"
    return [images / "unlabeled2017" / coco, images / coco, images / "VisualDialog_val2018" / visdial, images / visdial]


def load_chatir_queries(queries: Path, images: Path) -> list[BenchmarkTarget]:
    """Targets from a ChatIR-format query list, `[{"img": relative path, "dialog": [caption, rounds...]}]`.

    ChatIR's VisDial file and GenIR's FFHQ, Flickr30k and Clothing-ADC query lists share this form.
    """
    document = read_json(queries, 'a ChatIR query list ([{"img": ..., "dialog": [...]}])')
    return _chatir_queries(as_list(document, str(queries)), queries, images)


def _chatir_queries(entries: list[object], source: Path, images: Path) -> list[BenchmarkTarget]:
    targets: list[BenchmarkTarget] = []
    for i, entry in enumerate(entries):
        where = f"{source}, entry {i}"
        query = as_dict(entry, where)
        path = inside(images, get_str(query, "img", where), where)
        dialog = get_str_list(query, "dialog", where)
        # ChatIR opens each dialogue with the image's caption; GenIR's lists leave it empty.
        targets.append(BenchmarkTarget(_relative(path, images), path, tuple(dialog[:1]), tuple(dialog[1:])))
    require_files(((t.id, t.path) for t in targets), f"{source} (images folder {images})")
    return targets


def load_search_space(corpus: Path, images: Path) -> list[Path]:
    """The images a benchmark searches among, from a ChatIR/GenIR corpus list of relative paths."""
    document = as_list(read_json(corpus, "a corpus list of image paths"), str(corpus))
    paths: list[tuple[str, Path]] = []
    for i, relative in enumerate(document):
        if not isinstance(relative, str):
            raise ImageloopError(f"{corpus}, entry {i}: should be an image path (a string), found {relative!r}")
        paths.append((relative, inside(images, relative, f"{corpus}, entry {i}")))
    require_files(paths, f"{corpus} (images folder {images})")
    return [path for _, path in paths]


def load_flickr30k(annotations: Path, images: Path, split: str | None = None) -> list[BenchmarkTarget]:
    """Flickr30k images with their five captions, from Karpathy's `dataset_flickr30k.json` or `results_20130124.token`.

    `split` (Karpathy's train/val/test) needs the JSON file; None keeps every image, as GenIR does.
    """
    if split is not None and split not in FLICKR30K_SPLITS:
        raise ImageloopError(f"Flickr30k split {split!r}: expected one of {', '.join(FLICKR30K_SPLITS)}")
    if annotations.suffix.lower() == ".json":
        document = read_json(annotations, "Karpathy's dataset_flickr30k.json")
        return _flickr30k_targets(_karpathy_captions(document, annotations, split), annotations, images)
    if split is not None:
        raise ImageloopError(f"{annotations}: the .token file has no splits; use Karpathy's dataset_flickr30k.json")
    return _flickr30k_targets(_token_captions(annotations), annotations, images)


def _flickr30k_targets(captions: dict[str, list[str]], source: Path, images: Path) -> list[BenchmarkTarget]:
    targets: list[BenchmarkTarget] = []
    for name, texts in captions.items():
        path = inside(images, name, str(source))
        targets.append(BenchmarkTarget(_relative(path, images), path, tuple(texts)))
    require_files(((t.id, t.path) for t in targets), f"Flickr30k (images folder {images})")
    return targets


def _karpathy_captions(document: object, annotations: Path, split: str | None) -> dict[str, list[str]]:
    """Image file name -> captions, from Karpathy's `{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`."""
    document = as_dict(document, str(annotations))
    captions: dict[str, list[str]] = {}
    for i, entry in enumerate(as_list(document.get("images"), f"{annotations}, 'images'")):
        where = f"{annotations}, image {i}"
        image = as_dict(entry, where)
        if split is not None and get_str(image, "split", where) != split:
            continue
        sentences = as_list(image.get("sentences"), f"{where}, 'sentences'")
        raw = [
            get_str(as_dict(s, f"{where}, sentence {j}"), "raw", f"{where}, sentence {j}")
            for j, s in enumerate(sentences)
        ]
        captions.setdefault(get_str(image, "filename", where), []).extend(raw)
    return captions


def _token_captions(annotations: Path) -> dict[str, list[str]]:
    """Image file name -> captions, from Flickr30k's own `<name>.jpg#<n>\\t<caption>` lines."""
    try:
        lines = annotations.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ImageloopError(f"{annotations} not found: expected Flickr30k's results_20130124.token") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ImageloopError(f"{annotations}: cannot read Flickr30k captions ({e})") from None
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, _ = key.partition("#")
        if not tab or not hash_sign or not name:
            raise ImageloopError(f"{annotations}, line {number}: expected '<image>.jpg#<n><TAB><caption>'")
        captions.setdefault(name, []).append(caption.strip())
    return captions


def load_image_folder(folder: Path) -> list[BenchmarkTarget]:
    """Every image under `folder` (FFHQ, Clothing-ADC), in path order, with no words attached.

    The same files the indexer would index (hidden files skipped, symlinks kept inside), so a
    folder used as both corpus and target set agrees with itself.
    """
    if not folder.is_dir():
        raise ImageloopError(f"{folder}: no such images folder")
    paths = sorted(image_files(folder), key=lambda p: p.relative_to(folder).as_posix())
    if not paths:
        raise ImageloopError(f"{folder}: no images found")
    return [BenchmarkTarget(_relative(path, folder), path) for path in paths]


def load_genir_benchmark(benchmark: str, images: Path, annotations: Path | None = None) -> list[BenchmarkTarget]:
    """One benchmark's targets, from the file its release (or GenIR) provides, or from the folder.

    mscoco needs `visdial_1.0_val.json` or ChatIR's query list; flickr30k Karpathy's JSON, the .token
    file or a GenIR query list; ffhq and clothing-adc read a GenIR query list when given one, else
    every image under `images`.
    """
    if benchmark not in GENIR_BENCHMARKS:
        raise ImageloopError(f"benchmark {benchmark!r}: expected one of {', '.join(GENIR_BENCHMARKS)}")
    if benchmark == "mscoco":
        if annotations is None:
            raise ImageloopError("mscoco needs the VisDial dialogues: visdial_1.0_val.json or ChatIR's query list")
        return load_visdial(annotations, images)
    if annotations is None:
        if benchmark == "flickr30k":
            raise ImageloopError("flickr30k needs its captions: dataset_flickr30k.json or results_20130124.token")
        return load_image_folder(images)
    if annotations.suffix.lower() != ".json":
        if benchmark == "flickr30k":
            return load_flickr30k(annotations, images)
        raise ImageloopError(f"{annotations}: expected a ChatIR-format query list (.json) for {benchmark}")
    document = read_json(annotations, f"{benchmark} annotations")
    # ChatIR's and GenIR's query files are JSON lists; Karpathy's Flickr30k file is an object.
    if isinstance(document, list):
        return _chatir_queries(document, annotations, images)
    if benchmark == "flickr30k":
        return _flickr30k_targets(_karpathy_captions(document, annotations, None), annotations, images)
    raise ImageloopError(f"{annotations}: expected a ChatIR-format query list (a JSON list) for {benchmark}")


def sample(targets: Sequence[T], n: int | None, seed: int) -> list[T]:
    """`n` of `targets` drawn with `seed` (the same on every machine), in their benchmark order; all if n is None."""
    if n is None:
        return list(targets)
    if not 1 <= n <= len(targets):
        raise ImageloopError(f"`sample` {n}: expected 1 to {len(targets)} (the benchmark's size)")
    picked = sorted(random.Random(seed).sample(range(len(targets)), n))
    return [targets[i] for i in picked]


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
