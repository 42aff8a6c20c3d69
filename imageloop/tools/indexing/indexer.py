"""Indexing an image folder: content-addressed, incremental, overlapped, and crash-safe.

The images come from a folder, WebDataset shards or a parquet table (`imageloop.tools.indexing.sources`);
each record's `path` is its address under the index's folder. Each image is stored once under the sha256
of its bytes, so re-running over a folder only embeds
files it has not seen, and a file that moved inside the folder keeps its vector and gets its new
path. Besides its path, folder and caption (a sidecar `NAME.txt`, else the captioner's), a record
carries the keys of a sidecar `NAME.json`, e.g. `{"tags": ["sneaker", "red"], "brand": "acme"}`, which
`where` filters match (a list matches when one element does); editing a sidecar and re-running
updates the record without embedding again.

Worker threads hash, decode and caption files ahead of the embedder, which sees one batch at a time;
each batch is committed in one transaction, so a run that is killed (Ctrl-C or kill -9) loses at most
the batches it had not committed yet, and a re-run completes it without duplicates.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, Unpack

from PIL import Image
from tqdm import tqdm

from imageloop.errors import ImageloopError, StorageError
from imageloop.limits import SIDECAR_BYTES
from imageloop.protocols import Embedder, VectorRecord
from imageloop.tools.images import decode_image, file_digest, open_regular
from imageloop.tools.indexing.image_index import (
    INDEX_DIRNAME,
    ImageIndex,
    Route,
    StoreOptions,
    create_or_open_index,
)
from imageloop.tools.indexing.sources import Item, Source
from imageloop.tools.stores.embedded import EmbeddedVectorStore

T = TypeVar("T")
R = TypeVar("R")

Captioner = Callable[[Path], str]
LOCK_FILE = "indexing.lock"
RESERVED_KEYS = frozenset({"path", "folder", "caption"})
"""Metadata the indexer writes itself, which a sidecar `NAME.json` may not set."""

# Pictures wait for the embedder reduced to this many times the side its image tower sees (224 px for
# CLIP ViT-B): twice is plenty for its own resize and crop, and a 12 Mpx photo then holds ~1 MB, not
# 36 MB. An embedder that does not say its side gets pictures of at most FALLBACK_SIDE on their short side.
SIDE_MARGIN = 2
FALLBACK_SIDE = 1024


def prepared_side(embedder: Embedder) -> int:
    """The shortest side pictures are reduced to before `embedder` sees them (indexing and image queries alike)."""
    side = getattr(embedder, "image_side", None)
    return SIDE_MARGIN * int(side) if isinstance(side, int) and side > 0 else FALLBACK_SIDE


def default_workers() -> int:
    """Decoding threads when none are asked for: up to 4, never more than the machine has cores."""
    return min(4, os.cpu_count() or 1)


@dataclass
class IndexSummary:
    """What one indexing run did; `indexed + skipped + failed == total` image files seen.

    `moved` counts the skipped files whose content was already indexed under a path that no longer
    exists: their record now carries the new path, without re-embedding; `retagged` those whose
    sidecar `NAME.json` changed: their record now carries its keys. `removed` counts records pruned
    because their file is gone from the folder (or was edited in place: new bytes, new id).
    """

    indexed: int = 0
    skipped: int = 0
    failed: int = 0
    total: int = 0
    moved: int = 0
    retagged: int = 0
    removed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The counts and the failures (path, reason) as a JSON-ready dict for the CLI and MCP."""
        return {
            "indexed": self.indexed,
            "skipped": self.skipped,
            "failed": self.failed,
            "total": self.total,
            "moved": self.moved,
            "retagged": self.retagged,
            "removed": self.removed,
            "failures": [{"path": path, "reason": reason} for path, reason in self.failures],
        }


class IndexingInterrupted(KeyboardInterrupt):
    """Ctrl-C during indexing; `summary` counts what the committed batches saved."""

    def __init__(self, summary: IndexSummary) -> None:
        super().__init__(f"{summary.indexed} newly indexed images in finished batches are saved")
        self.summary = summary


@dataclass(frozen=True)
class _New:
    """Content not in the index yet, decoded; `image` is kept on the image route only."""

    id: str
    item: Item
    caption: str
    extra: dict[str, Any]
    image: Image.Image | None


@dataclass(frozen=True)
class _Known:
    """Content the index already holds, with its stored record (the path it was indexed under) and its sidecar keys."""

    id: str
    item: Item
    record: VectorRecord
    extra: dict[str, Any]


@dataclass(frozen=True)
class NewFile:
    """Content not in the index yet, hashed but not read: what a cluster's worker opens by its item's address
    (a file, a tar member), decodes, captions and embeds."""

    id: str
    item: Item
    extra: dict[str, Any]


@dataclass(frozen=True)
class _Failed:
    address: str
    reason: str


@dataclass(frozen=True)
class Embedded:
    """A batch of new files as a worker returns it: the records to store, and the files it could not read."""

    records: list[VectorRecord]
    failures: list[tuple[str, str]]


_Outcome = _New | _Known | NewFile | _Failed
EmbedRemotely = Callable[[Iterable[list[NewFile]]], Iterable[Embedded]]
"""How batches of new files are read and embedded elsewhere (a Ray cluster's workers), handed out as the walk
finds them, each result as it arrives."""


def index_folder(
    folder: Path | Source,
    embedder: Embedder,
    captioner: Captioner | None,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    remote: EmbedRemotely | None = None,
    **store_options: Unpack[StoreOptions],
) -> IndexSummary:
    """Add every new image of `folder` (or of a `Source`: shards, a parquet table) to its index.

    Unreadable files are reported, never fatal. `store_options` choose the store of a new index (see
    `create_or_open_index`); default embedded. `on_progress(done, total)` hears how many images were
    handled, at the start, per batch and at the end. `remote` reads and embeds the new images elsewhere
    (see `index_into`).
    """
    _check_sizes(batch_size, workers)
    source = folder if isinstance(folder, Source) else Source(Path(folder).resolve(), "folder")
    index = create_or_open_index(source.root, embedder, **store_options)
    try:
        with one_indexer(index.root / INDEX_DIRNAME):
            return index_into(
                index, embedder, captioner, batch_size=batch_size, workers=workers, progress=progress,
                on_progress=on_progress, source=source, remote=remote,
            )  # fmt: skip
    finally:
        index.close()


@contextmanager
def one_indexer(index_dir: Path) -> Iterator[None]:
    """Index one folder in one run at a time, across processes and threads: a second run waits for the first,
    then finds its images indexed (four at once embedded every image up to four times).

    An advisory lock on `.imageloop/indexing.lock`, released by the operating system however the holder ends.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform (Windows): runs are not kept apart
        yield
        return
    try:
        lock = (index_dir / LOCK_FILE).open("ab")
    except OSError:  # a read-only index: nothing can be added to it, nor by another run
        yield
        return
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def index_into(
    index: ImageIndex,
    embedder: Embedder,
    captioner: Captioner | None,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    source: Source | None = None,
    remote: EmbedRemotely | None = None,
) -> IndexSummary:
    """Index the images of `source` (default: the folder `index.root`) into an open index; see `index_folder`.

    `captioner` is called from `workers` threads at once and must be thread-safe. At most
    `batch_size + 2 * workers` files are prepared ahead of the batch being embedded, so on the image
    route at most `2 * batch_size + 2 * workers` decoded images are held at once, each reduced to
    `prepared_side(embedder)` on its shortest side as it is decoded; the caption route keeps only the captions.

    With `remote`, this process hashes every image and looks it up, and hands the new ones out, in batches of
    `batch_size` as it finds them, to be read and embedded elsewhere (`embed_new_files` on a cluster's
    workers, which open each by its address); it alone writes the index, a batch at a time, as here.
    """
    _check_sizes(batch_size, workers)
    workers = workers or default_workers()
    index.require_embedder(embedder.model_id)
    # A damaged index is said before any work (the store reads every page, ~1 s per GB), never reported
    # as images that all failed, or as a run that found nothing new.
    index.check()
    source = source or Source(index.root, "folder")
    _claim(index, source)
    files = source.items()
    addresses = {item.address for item in files}
    summary = IndexSummary(total=len(files))
    # Workers look up known content while the main thread commits: one lock makes any store safe.
    store_lock = threading.Lock()
    seen: set[str] = set()
    pending: list[_New] = []
    moves: list[tuple[VectorRecord, bool, bool]] = []  # an updated record: moved? retagged?

    side = prepared_side(embedder)

    def prepare(item: Item) -> _Outcome:
        return _prepare(item, index, captioner, store_lock, side, read=remote is None)

    def commit(embedded: list[VectorRecord]) -> None:
        # One upsert per batch, one transaction per upsert: an interruption loses this batch only.
        with store_lock:
            index.store.upsert([*embedded, *(record for record, _, _ in moves)])
        summary.indexed += len(embedded)
        summary.moved += sum(moved for _, moved, _ in moves)
        summary.retagged += sum(retagged for _, _, retagged in moves)
        pending.clear()
        moves.clear()

    bar = tqdm(total=len(files), unit="img", desc="indexing", disable=None if progress else True)
    handled = 0

    def counted(files_handled: int, moves_pending: int) -> None:
        nonlocal handled
        bar.set_postfix(_counts(summary, moves_pending), refresh=False)
        bar.update(files_handled)
        handled += files_handled  # counted here: a disabled bar counts nothing
        crossed = handled // batch_size > (handled - files_handled) // batch_size  # another batch's worth
        if on_progress is not None and crossed and handled < len(files):
            on_progress(handled, len(files))

    def walk(outcomes: Iterable[_Outcome]) -> Iterator[list[NewFile]]:
        """Every image classified, its record updated or embedded here; with `remote`, the new images come out in
        batches for the cluster instead, as they are found."""
        unread: list[NewFile] = []
        for outcome in outcomes:
            if isinstance(outcome, _Failed):
                summary.failed += 1
                summary.failures.append((outcome.address, outcome.reason))
            elif outcome.id in seen:
                summary.skipped += 1  # the same content earlier in this run: stored once
            elif isinstance(outcome, _Known):
                seen.add(outcome.id)
                summary.skipped += 1
                updated = _updated(outcome, addresses)
                if updated is not None:
                    moves.append(updated)
            elif isinstance(outcome, NewFile):
                seen.add(outcome.id)
                unread.append(outcome)
                if len(unread) == batch_size:
                    yield unread
                    unread = []
                continue  # counted when its batch comes back embedded
            else:
                seen.add(outcome.id)
                pending.append(outcome)
            if len(pending) >= batch_size or len(moves) >= batch_size:
                commit(_embedded(pending, index.root, index.route, index.dim, embedder))
            counted(1, len(moves))
        if pending or moves:
            commit(_embedded(pending, index.root, index.route, index.dim, embedder))
            counted(0, 0)
        if unread:
            yield unread

    if on_progress is not None:
        on_progress(0, len(files))
    try:
        # On the way out, `closing` cancels the files not started yet before the pool waits for the
        # few in progress, so Ctrl-C returns after at most one file per worker.
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="imageloop-index") as pool,
            closing(_in_order(pool, prepare, files, lookahead=batch_size + 2 * workers)) as outcomes,
        ):
            if remote is None:
                list(walk(outcomes))  # every new image is read and embedded here as the walk finds it
            else:
                for embedded in remote(walk(outcomes)):
                    commit(embedded.records)
                    summary.failed += len(embedded.failures)
                    summary.failures += embedded.failures
                    counted(len(embedded.records) + len(embedded.failures), 0)
            if on_progress is not None:
                on_progress(handled, len(files))
        with store_lock:
            summary.removed = _prune(index, seen, {path for path, _ in summary.failures})
    except KeyboardInterrupt:
        raise IndexingInterrupted(summary) from None
    finally:
        bar.close()
    if summary.indexed and isinstance(index.store, EmbeddedVectorStore):
        # Past its ANN threshold the store builds its HNSW index here, once, rather than making the
        # first search after indexing wait minutes for it.
        index.store.refresh()
    return summary


def _prune(index: ImageIndex, seen: set[str], unreadable: set[str]) -> int:
    """Delete records whose content no file in the folder has any more; returns how many.

    A record whose file merely failed to read this time (permissions, a file being written) is kept:
    only content that is really gone from the folder is forgotten.
    """
    stale = [record for record in index.store.get([i for i in index.store.ids() if i not in seen])]
    gone = [record.id for record in stale if record.metadata.get("path") not in unreadable]
    index.store.delete(gone)
    return len(gone)


def _check_sizes(batch_size: int, workers: int | None) -> None:
    if batch_size <= 0:
        raise ImageloopError(f"batch_size must be positive, got {batch_size}")
    if workers is not None and workers <= 0:
        raise ImageloopError(f"workers must be positive, got {workers}")


def _counts(summary: IndexSummary, moves_pending: int) -> dict[str, int]:
    """The progress bar's postfix: what the run has done so far."""
    counts = {"indexed": summary.indexed, "skipped": summary.skipped, "failed": summary.failed}
    if summary.moved or moves_pending:
        counts["moved"] = summary.moved + moves_pending
    return counts


def _in_order(
    pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], *, lookahead: int
) -> Generator[R, None, None]:
    """`fn` over `items` in the pool, results in input order, never more than `lookahead` ahead.

    The window keeps workers busy while the caller embeds (the overlap) and bounds how many
    prepared (decoded) items wait in memory. Leaving early cancels what has not started.
    """
    window: deque[Future[R]] = deque()
    iterator = iter(items)
    try:
        for item in iterator:
            window.append(pool.submit(fn, item))
            if len(window) >= lookahead:
                break
        while window:
            result = window.popleft().result()
            for item in iterator:
                window.append(pool.submit(fn, item))
                break
            yield result
    finally:
        for future in window:
            future.cancel()


def _claim(index: ImageIndex, source: Source) -> None:
    """Record which source builds the index; another kind of source (or another parquet file) is refused."""
    stored = index.store.get_meta().get("source")
    # No record: a new index, or one from before sources were recorded, which is a folder's.
    recorded = stored or (source.record() if index.store.count() == 0 else {"kind": "folder", "files": []})
    other = recorded["kind"] != source.kind or (source.kind == "parquet" and recorded["files"] != list(source.files))
    if other:
        built = (
            recorded["kind"] if recorded["kind"] == "folder" else f"{recorded['kind']} {', '.join(recorded['files'])}"
        )
        raise ImageloopError(
            f"the index at {index.root} was built from {built}: each run keeps what its source holds and drops "
            f"the rest, so index this source into a folder of its own"
        )
    if stored != source.record():
        index.store.set_meta({"source": source.record()})


def _prepare(
    item: Item,
    index: ImageIndex,
    captioner: Captioner | None,
    store_lock: threading.Lock,
    side: int,
    read: bool = True,
) -> _Outcome:
    """Runs in a worker thread: hash the item's bytes, look its content up, and (`read`) decode and caption it
    if it is new.

    The bytes hashed and the pixels decoded come from one open file, so a file replaced meanwhile is
    indexed as one whole version, never the id of one and the picture of another.
    """
    if item.problem is not None:
        return _Failed(item.address, item.problem)
    path = index.root / item.address
    try:
        with open_regular(path) as f:
            image_id = file_digest(f)
            # Known content is not decoded: a re-run over a large folder only hashes bytes.
            with store_lock:
                known = index.store.get([image_id])
            extra = dict(item.extra) if item.extra is not None else sidecar_metadata(path, index.root)
            if known:
                return _Known(image_id, item, known[0], extra)
            if not read:
                return NewFile(image_id, item, extra)
            return _read(f, path, NewFile(image_id, item, extra), index.root, index.route, captioner, side)
    except StorageError:
        raise  # the index itself failed (damaged, full, busy): not this file's fault, the run's
    except (ImageloopError, OSError) as e:
        return _unreadable(path, item.address, e)


def _read(
    f: BinaryIO, path: Path, new: NewFile, root: Path, route: Route, captioner: Captioner | None, side: int
) -> _New:
    """New content decoded from its open file (on the caption route too: a broken file fails) and captioned
    (the source's caption, else the sidecar's or the captioner's)."""
    f.seek(0)
    image = decode_image(f, path, shortest_side=side)
    item = new.item
    caption = item.caption if item.caption is not None else _caption(path, item, root, route, captioner)
    return _New(new.id, item, caption, new.extra, image if route == "image" else None)


def _unreadable(path: Path, address: str, error: ImageloopError | OSError) -> _Failed:
    if isinstance(error, OSError):
        return _Failed(address, f"{path}: cannot read ({error.strerror or error})")
    return _Failed(address, str(error))


def embed_new_files(
    root: Path, route: Route, dim: int, embedder: Embedder, captioner: Captioner | None, batch: Sequence[NewFile]
) -> Embedded:
    """A batch of new images read, captioned and embedded (on a cluster's worker): the same records as here.

    Each is opened by its item's address under `root` (a file, a tar member), as the driver hashed it. One
    whose bytes changed since they were hashed is reported, not indexed: the next run indexes it under its
    new content, never the id of one version with the picture of another.
    """
    side = prepared_side(embedder)
    read: list[_New] = []
    failures: list[tuple[str, str]] = []
    for new in batch:
        path = root / new.item.address
        try:
            with open_regular(path) as f:
                if file_digest(f) != new.id:
                    raise ImageloopError(f"{path} changed while it was indexed: run again to index it")
                read.append(_read(f, path, new, root, route, captioner, side))
        except StorageError:
            raise  # not this image's fault but the run's, as on the driver
        except (ImageloopError, OSError) as e:
            failures.append((new.item.address, _unreadable(path, new.item.address, e).reason))
    return Embedded(_embedded(read, root, route, dim, embedder), failures)


def _updated(known: _Known, addresses: set[str]) -> tuple[VectorRecord, bool, bool] | None:
    """The record with its new address (when the one it was indexed under is gone from the source) and its
    tags (when they changed), and which of the two changed; None when neither did.

    A second copy of content whose recorded address is still in the source is a duplicate, not a move: its
    own tags are not read into the record either.
    """
    metadata = dict(known.record.metadata)
    recorded = metadata.get("path")
    address = known.item.address
    if isinstance(recorded, str) and (recorded == address or recorded in addresses):
        if recorded != address:
            return None
        moved = False
    else:
        metadata |= {"path": address, "folder": known.item.folder}
        moved = True
    before = {key: value for key, value in metadata.items() if key not in RESERVED_KEYS}
    retagged = before != known.extra
    if not (moved or retagged):
        return None
    metadata = {**{key: metadata[key] for key in RESERVED_KEYS if key in metadata}, **known.extra}
    return VectorRecord(id=known.id, vector=known.record.vector, metadata=metadata), moved, retagged


def _embedded(pending: list[_New], root: Path, route: Route, dim: int, embedder: Embedder) -> list[VectorRecord]:
    """Records for a batch of new images, embedded in one call (pixels or captions, by route)."""
    if not pending:
        return []
    if route == "image":
        vectors = embedder.embed_images([item.image for item in pending if item.image is not None])
    else:
        vectors = embedder.embed_texts([item.caption for item in pending])
    if vectors.shape != (len(pending), dim):
        raise ImageloopError(
            f"{embedder.model_id} returned vectors of shape {tuple(vectors.shape)} for {len(pending)} images, "
            f"but the index at {root} holds {dim}-d vectors"
        )
    return [
        VectorRecord(
            id=item.id,
            vector=vector,
            metadata={**item.extra, "path": item.item.address, "caption": item.caption, "folder": item.item.folder},
        )
        for item, vector in zip(pending, vectors, strict=True)
    ]


def read_sidecar(image: Path, suffix: str, within: Path) -> str | None:
    """The text of the sidecar `NAME.SUFFIX` beside `image` (None without one), read under the image's own
    confinement: the sidecar is resolved (symlinks followed) and read only when it lies inside `within` (the
    index root, or the folder of a reference image), is a regular file and holds at most `SIDECAR_BYTES`.

    A sidecar linking out of the folder would otherwise hand any file the process can read (`/etc/passwd`)
    to the index, the models and the client as a caption. Nothing outside `within` is opened or probed.
    """
    sidecar = image.with_suffix(suffix)
    if not os.path.lexists(sidecar):
        return None
    try:
        resolved = sidecar.resolve()
        inside = resolved.is_relative_to(within.resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ImageloopError(f"{sidecar}: cannot resolve ({e}); not read") from None
    if not inside:
        raise ImageloopError(f"{sidecar}: links outside {within}; not read")
    try:
        with open_regular(resolved) as f:
            data = f.read(SIDECAR_BYTES + 1)
    except ImageloopError as e:
        if not resolved.exists() and resolved.parent.is_dir():
            return None  # a dangling link inside the folder: no sidecar
        raise ImageloopError(str(e).replace(str(resolved), str(sidecar))) from None
    if len(data) > SIDECAR_BYTES:
        raise ImageloopError(f"{sidecar}: over {SIDECAR_BYTES:,} bytes; not read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageloopError(f"{sidecar}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def sidecar_caption(path: Path, within: Path) -> str | None:
    """The caption a person wrote for `path` in the sidecar `NAME.txt` beside it, else None (see `read_sidecar`)."""
    text = read_sidecar(path, ".txt", within)
    return None if text is None else text.strip()


def sidecar_metadata(path: Path, within: Path) -> dict[str, Any]:
    """The keys of the image's sidecar `NAME.json` (none without one): text, numbers, booleans or lists of them.

    A catalogue's tags and attributes, e.g. `{"tags": ["sneaker", "red"], "brand": "acme"}`, stored
    with the record so `where` can filter on them. A sidecar that is not such an object, or that
    `read_sidecar` refuses, fails that image (reported, never fatal), like an unreadable caption.
    """
    text = read_sidecar(path, ".json", within)
    if text is None:
        return {}
    sidecar = path.with_suffix(".json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ImageloopError(f"{sidecar}: cannot read metadata ({e})") from e
    if not isinstance(data, dict):
        raise ImageloopError(f'{sidecar}: expected a JSON object such as {{"tags": ["sneaker"]}}')
    for key, value in data.items():
        if key in RESERVED_KEYS:
            raise ImageloopError(f"{sidecar}: {key!r} is set by the indexer; use another key")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str | int | float | bool) for item in values):
            raise ImageloopError(f"{sidecar}: {key!r} must be text, a number, a boolean or a list of them")
    return data


def _caption(path: Path, item: Item, root: Path, route: Route, captioner: Captioner | None) -> str:
    """The sidecar `NAME.txt` if present, else the captioner's; the caption route needs one of them."""
    sidecar = sidecar_caption(path, root)
    if sidecar is not None:
        return sidecar
    if captioner is not None:
        return captioner(path)
    if route == "caption":
        sidecar_name = Path(item.address).with_suffix(".txt").as_posix()
        raise ImageloopError(f"no caption: add {sidecar_name} or configure a captioner")
    return ""
