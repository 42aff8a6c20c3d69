"""Reading CIR triplets: a synthesised dataset folder (`DIR/triplets.jsonl`) or a JSONL file of real ones.

One JSON object per line: `{"id", "object", "edit", "reference_text", "change", "target_text",
"reference_image", "target_image"}`. `change` is the modification text of the composed query (what
turns the reference into the target); `id`, `change` and both images are required, the captions may
be empty (real triplets often have none). Image paths are relative to the folder that holds the JSONL
file (or absolute), and must lie inside it or inside a folder the caller names (`image_folders`: the
benchmark's images for `cir-data`'s output), symlinks resolved: a file of triplets someone sent cannot
make training read images from elsewhere on the disk.

`describe_triplets` fills the captions a real triplet lacks with a captioner's, each image captioned once
and journaled as it comes, so an interrupted run captions no image twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imageloop.errors import ImageloopError
from imageloop.files import jsonl_journal, read_jsonl

TRIPLETS_FILENAME = "triplets.jsonl"
_REQUIRED = ("id", "change", "reference_image", "target_image")
_OPTIONAL_TEXT = ("object", "edit", "reference_text", "target_text")


@dataclass(frozen=True)
class Triplet:
    """One (reference image, modification text, target image) example with its captions."""

    id: str
    reference_image: Path
    change: str
    target_image: Path
    object: str = ""
    edit: str = ""
    reference_text: str = ""
    target_text: str = ""


def triplets_file(source: Path) -> Path:
    """The JSONL file `source` names: `source/triplets.jsonl` for a dataset folder, else `source` itself."""
    return source / TRIPLETS_FILENAME if source.is_dir() else source


def read_triplets(source: Path, image_folders: Sequence[Path] = ()) -> list[Triplet]:
    """Every triplet of a dataset folder or JSONL file, images resolved, confined and checked to exist.

    Images must lie inside the file's folder or one of `image_folders`.
    """
    path = triplets_file(source)
    if not path.is_file():
        raise ImageloopError(f"{path}: no such triplets file (expected a dataset folder with {TRIPLETS_FILENAME})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageloopError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSON lines") from None
    except OSError as e:
        raise ImageloopError(f"{path}: cannot read ({e.strerror or e})") from None
    folders = tuple(folder.resolve() for folder in (path.parent, *image_folders))
    triplets = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            triplets.append(_parse(line, f"{path}:{number}", path.parent, folders))
    if not triplets:
        raise ImageloopError(f"{path}: holds no triplets")
    return triplets


def _parse(line: str, where: str, base: Path, folders: tuple[Path, ...]) -> Triplet:
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as e:
        raise ImageloopError(f"{where}: not a JSON object ({e.msg})") from e
    if not isinstance(record, dict):
        raise ImageloopError(f"{where}: not a JSON object")
    missing = [key for key in _REQUIRED if not isinstance(record.get(key), str) or not record[key].strip()]
    if missing:
        raise ImageloopError(f"{where}: missing or empty {', '.join(missing)}")
    texts = {key: record.get(key) or "" for key in _OPTIONAL_TEXT}
    wrong = [key for key, value in texts.items() if not isinstance(value, str)]
    if wrong:
        raise ImageloopError(f"{where}: {', '.join(wrong)} must be text")
    return Triplet(
        id=record["id"],
        reference_image=_resolve(record["reference_image"], base, folders, where),
        change=record["change"].strip(),
        target_image=_resolve(record["target_image"], base, folders, where),
        object=texts["object"].strip(),
        edit=texts["edit"].strip(),
        reference_text=texts["reference_text"].strip(),
        target_text=texts["target_text"].strip(),
    )


def _resolve(name: str, base: Path, folders: tuple[Path, ...], where: str) -> Path:
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        resolved = path.resolve()
        inside = any(resolved.is_relative_to(folder) for folder in folders)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        inside = False
    if not inside:
        raise ImageloopError(
            f"{where}: image {name!r} lies outside {', '.join(map(str, folders))}: triplet images must be inside"
            " the triplets' folder, or name the folder they are in with `images`"
        )
    if not path.is_file():
        raise ImageloopError(f"{where}: image {path} does not exist")
    return path


Captioner = Callable[[Path], str]


def describe_triplets(triplets: Sequence[Triplet], captioner: Captioner, journal: Path) -> list[Triplet]:
    """`triplets` with every missing reference or target caption filled by `captioner`.

    Each caption is appended to `journal` (one fsynced JSON line, `{"image", "caption"}`) as soon as it is
    made; captions already there are reused, so a run killed half-way and started again asks for the rest.
    """
    known = {record["image"]: record["caption"] for record in read_jsonl(journal)}
    wanted = [
        path
        for t in triplets
        for path, text in ((t.reference_image, t.reference_text), (t.target_image, t.target_text))
        if not text
    ]
    missing = [path for path in dict.fromkeys(wanted) if str(path) not in known]
    if missing:
        journal.parent.mkdir(parents=True, exist_ok=True)
        with jsonl_journal(journal) as append:
            for path in missing:
                known[str(path)] = captioner(path).strip()
                append({"image": str(path), "caption": known[str(path)]})
    return [
        replace(
            t,
            reference_text=t.reference_text or known[str(t.reference_image)],
            target_text=t.target_text or known[str(t.target_image)],
        )
        for t in triplets
    ]
