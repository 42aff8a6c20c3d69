"""CIR evaluation on CIRR and FashionIQ, every query run through the CIR graph; resumable, one JSONL line a query.

`--annotations` names a benchmark's own annotation file (CIRR `captions/cap.rc2.<split>.json`,
FashionIQ `captions/cap.<category>.<split>.json`: that category only) or the dataset's root folder
(FashionIQ: every category whose file exists). The dataset root is the folder above `captions/`; its
`image_splits/` list the gallery, and the images are found under `--images`, else where the release
puts them: CIRR `ROOT/img_raw` (the split file's `./dev/...` paths start there), FashionIQ
`ROOT/images`. Every gallery image must be in the index (matched by content, so the index may be
any folder that holds them); each query is ranked against its own gallery only (a FashionIQ category
is searched in its category), exactly, from the vectors the index stored.

The run folder holds `eval.json` (the settings; a re-run must match them), `queries.jsonl` (per query:
the descriptions, the top 51 gallery names, the subset's ranking and the target's rank), and
`summary.json`; CIRR's test1 split (targets kept by its server) writes the server's two submission
files instead of recalls. A re-run skips the queries already in `queries.jsonl`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imageloop.errors import ImageloopError
from imageloop.eval import Run, journaled
from imageloop.eval.cir_data import (
    CIRR_SPLITS,
    FASHIONIQ_CATEGORIES,
    CIRBenchmark,
    CIRQuery,
    load_cirr,
    load_fashioniq,
)
from imageloop.eval.cir_metrics import CIRR_RECALL_AT, cirr_metrics, cirr_test_submission, fashioniq_metrics
from imageloop.files import read_jsonl, write_json_atomic
from imageloop.graphs.cir import CIRContext, CIRGraph, CIRInput
from imageloop.protocols import Embedder, RetrievedImage, Vector
from imageloop.tools.images import content_id
from imageloop.tools.indexing.image_index import ImageIndex, Route

Format = Literal["cirr", "fashioniq"]
FORMATS: tuple[Format, ...] = ("cirr", "fashioniq")
QUERIES = "queries.jsonl"
SUMMARY = "summary.json"
EVAL_SETTINGS = "eval.json"
SUBMISSIONS = ("recall_submission.json", "recall_subset_submission.json")
KEPT_RANKS = CIRR_RECALL_AT[-1] + 1
"""Gallery names kept per query: R@50 counts after CIRR removes the reference, so 51 always suffice."""
_CIRR_CAPTIONS = re.compile(r"^cap\.rc2\.(?P<split>[^.]+)\.json$")
_FASHIONIQ_CAPTIONS = re.compile(r"^cap\.(?P<category>[^.]+)\.(?P<split>[^.]+)\.json$")


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's files are, read from ``annotations`` (and ``split``)."""

    format: Format
    root: Path
    split: str
    categories: tuple[str, ...] = ()


def locate(annotations: Path, fmt: str, split: str | None = None) -> BenchmarkSpec:
    """The dataset root, split and (FashionIQ) categories an annotation file or dataset folder names."""
    if fmt not in FORMATS:
        raise ImageloopError(f"`format` {fmt!r}: expected one of {', '.join(FORMATS)}")
    if annotations.is_dir():
        root = annotations
        chosen = split or "val"
        if fmt == "cirr":
            return BenchmarkSpec("cirr", root, chosen)
        present = tuple(c for c in FASHIONIQ_CATEGORIES if (root / "captions" / f"cap.{c}.{chosen}.json").is_file())
        if not present:
            raise ImageloopError(f"{root}: no captions/cap.<category>.{chosen}.json (a FashionIQ root holds captions/)")
        return BenchmarkSpec("fashioniq", root, chosen, present)
    if not annotations.is_file():
        raise ImageloopError(f"`annotations` {annotations}: no such file or folder")
    pattern = _CIRR_CAPTIONS if fmt == "cirr" else _FASHIONIQ_CAPTIONS
    named = pattern.match(annotations.name)
    if named is None or annotations.parent.name != "captions":
        expected = "captions/cap.rc2.<split>.json" if fmt == "cirr" else "captions/cap.<category>.<split>.json"
        raise ImageloopError(f"`annotations` {annotations}: expected {fmt}'s {expected}, or the dataset folder")
    if split is not None and split != named["split"]:
        raise ImageloopError(f"`split` {split} but {annotations.name} is the {named['split']} split")
    root = annotations.parent.parent
    if fmt == "cirr":
        return BenchmarkSpec("cirr", root, named["split"])
    return BenchmarkSpec("fashioniq", root, named["split"], (named["category"],))


def load_benchmarks(spec: BenchmarkSpec, images: Path | None = None) -> list[CIRBenchmark]:
    """The benchmark(s) `spec` names, each with its queries and gallery (images checked on disk)."""
    if spec.format == "cirr":
        if spec.split not in CIRR_SPLITS:
            raise ImageloopError(f"CIRR split {spec.split!r}: expected one of {', '.join(CIRR_SPLITS)}")
        return [load_cirr(spec.root, spec.split, images)]
    if spec.split == "test":
        raise ImageloopError("FashionIQ's test targets are not public: evaluate the val split")
    return list(load_fashioniq(spec.root, spec.split, spec.categories, images).values())


class GalleryRetriever:
    """Exact search within one benchmark gallery, over the vectors the index stored for its images.

    Benchmarks rank within a gallery (a FashionIQ category, a CIRR split) while an index may hold
    more; this searches only the gallery, exactly, so every query is ranked as the benchmark means.
    """

    def __init__(self, index: ImageIndex, embedder: Embedder, gallery: Mapping[str, Path]) -> None:
        index.require_embedder(embedder.model_id)
        self.embedder = embedder
        self._route: Route = index.route
        # One id per distinct image; identical files under two names share it (the first name answers).
        self.names: dict[str, str] = {}
        for name, path in gallery.items():
            self.names.setdefault(content_id(path), name)
        ids = list(self.names)
        records = {record.id: record for record in _chunked_get(index, ids)}
        missing = [self.names[i] for i in ids if i not in records]
        if missing:
            raise ImageloopError(
                f"{len(missing)} gallery images are not in the index at {index.root} (first: {missing[0]}): "
                f"index the benchmark's images first"
            )
        self.ids = ids
        self.paths = {i: index.root / str(records[i].metadata.get("path", "")) for i in ids}
        self.matrix = np.stack([np.asarray(records[i].vector, dtype=np.float32) for i in ids])
        self._row = {i: row for row, i in enumerate(ids)}

    @property
    def route(self) -> Route:
        """The index's route."""
        return self._route

    def __len__(self) -> int:
        return len(self.ids)

    def search_vector(self, vector: Vector, k: int) -> list[RetrievedImage]:
        """The top-`k` gallery images for `vector`, best first (ties keep gallery order)."""
        scores = self.matrix @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [RetrievedImage(self.ids[i], self.paths[self.ids[i]], "", float(scores[i])) for i in order]

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, Vector]:
        """The gallery's vectors of those `ids` it holds."""
        return {i: self.matrix[self._row[i]] for i in ids if i in self._row}


def _chunked_get(index: ImageIndex, ids: Sequence[str], chunk: int = 500) -> Iterable[Any]:
    for start in range(0, len(ids), chunk):
        yield from index.store.get(list(ids[start : start + chunk]))


@dataclass(frozen=True)
class CIREvalSettings:
    """What makes two evaluation runs comparable; a resume must match it exactly."""

    format: str
    split: str
    benchmarks: list[str]
    index: str
    embedder: str
    vlm: str
    generator: str
    knobs: dict[str, Any]


class MemoCaptioner:
    """A captioner that describes each reference once per evaluation (CIRR reuses references), thread-safe."""

    def __init__(self, inner: Callable[[Path], str], known: Mapping[str, str] | None = None) -> None:
        self.inner = inner
        self.known = dict(known or {})
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> str:
        """The description of `path`, computed on first use."""
        key = str(path)
        with self._lock:
            if key in self.known:
                return self.known[key]
        description = self.inner(path)
        with self._lock:
            return self.known.setdefault(key, description)


def finished(queries_file: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The records already in `queries.jsonl`, keyed by (benchmark, query id)."""
    return {(record["benchmark"], record["id"]): record for record in read_jsonl(queries_file)}


def _query_record(
    benchmark: CIRBenchmark, gallery: GalleryRetriever, query: CIRQuery, state: Mapping[str, Any]
) -> dict[str, Any]:
    names = [gallery.names[i] for i in state.get("ranking", [])]
    subset = set(query.subset) - {query.reference}
    rank = None
    if query.target is not None and query.target in names:
        excluded = query.reference if benchmark.name == "cirr" else None
        rank = [n for n in names if n != excluded].index(query.target)
    return {
        "benchmark": benchmark.name,
        "id": query.id,
        "reference": query.reference,
        "target": query.target,
        "modification": query.modification,
        "reference_description": state.get("reference_description"),
        "edited_description": state.get("edited_description"),
        "ranking": names[:KEPT_RANKS],
        "subset_ranking": [n for n in names if n in subset],
        "target_rank": rank,
        "stop_reason": state.get("stop_reason"),
    }


BenchmarkQuery = tuple[str, CIRQuery]
"""One query of an evaluation, as handed to whoever runs it: its benchmark's name and the query."""


def query_search(
    runs: Sequence[tuple[CIRBenchmark, GalleryRetriever, CIRGraph]],
) -> Callable[[BenchmarkQuery], dict[str, Any]]:
    """One query's work, the same in this process and on a cluster's worker: the query through its benchmark's
    graph, ranking its whole gallery (`rank_depth`) with the reference left in (the metrics apply each
    benchmark's own rule for it); the result is its line of `queries.jsonl`."""
    by_name = {benchmark.name: (benchmark, gallery, graph) for benchmark, gallery, graph in runs}

    def search(item: BenchmarkQuery) -> dict[str, Any]:
        benchmark, gallery, graph = by_name[item[0]]
        query = item[1]
        asked = CIRInput(reference=str(benchmark.gallery[query.reference]), change=query.modification)
        context = CIRContext(k=min(len(gallery), CIRR_RECALL_AT[-1]), exclude_reference=False, rank_depth=len(gallery))
        state = graph.invoke(asked, version="v2", context=context).value
        return _query_record(benchmark, gallery, query, state)

    return search


def evaluate_queries(
    benchmarks: Sequence[CIRBenchmark],
    out_dir: Path,
    run: Run[BenchmarkQuery, dict[str, Any]],
    *,
    on_query: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """Run every query not yet in `queries.jsonl` (`run` does each one's `query_search`, here or on a cluster),
    appending (fsynced) as each ends."""
    queries_file = out_dir / QUERIES
    done = finished(queries_file)
    pending = [(b.name, q) for b in benchmarks for q in b.queries if (b.name, q.id) not in done]
    total = sum(len(b.queries) for b in benchmarks)
    for record in journaled(pending, run, queries_file, total=total, on_progress=on_query):
        done[record["benchmark"], record["id"]] = record
    return done


def known_descriptions(records: Iterable[Mapping[str, Any]], benchmarks: Sequence[CIRBenchmark]) -> dict[str, str]:
    """Reference path -> description from finished records, so a resumed run captions no reference twice."""
    paths = {(b.name, name): str(path) for b in benchmarks for name, path in b.gallery.items()}
    known: dict[str, str] = {}
    for record in records:
        path = paths.get((record["benchmark"], record["reference"]))
        if path is not None and record.get("reference_description"):
            known[path] = record["reference_description"]
    return known


def metric_ranking(record: Mapping[str, Any]) -> list[str]:
    """A record's ranking for the metrics: the top names, then the rest of the subset in its ranked order."""
    top = list(record["ranking"])
    return top + [name for name in record["subset_ranking"] if name not in top]


def summarise(
    benchmarks: Sequence[CIRBenchmark],
    done: Mapping[tuple[str, str], Mapping[str, Any]],
    settings: CIREvalSettings,
    out_dir: Path,
) -> dict[str, Any]:
    """The benchmark's metrics over the finished queries (CIRR test1: its server's submission files)."""
    ranked = {
        b.name: [(q, metric_ranking(done[b.name, q.id])) for q in b.queries if (b.name, q.id) in done]
        for b in benchmarks
    }
    summary: dict[str, Any]
    if settings.format == "cirr" and settings.split == "test1":
        recall, recall_subset = cirr_test_submission(ranked["cirr"])
        for name, content in zip(SUBMISSIONS, (recall, recall_subset), strict=True):
            write_json_atomic(out_dir / name, content)
        summary = {"n": len(ranked["cirr"]), "submission": {n: str(out_dir / n) for n in SUBMISSIONS}}
    elif settings.format == "cirr":
        summary = dict(cirr_metrics(ranked["cirr"]))
    else:
        summary = dict(fashioniq_metrics({b.name.removeprefix("fashioniq-"): ranked[b.name] for b in benchmarks}))
    return {**summary, "settings": asdict(settings)}
