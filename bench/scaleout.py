"""Scale-out: the same job on 1 and on N workers of a Ray cluster, side by side in one run, and in this process.

    python bench/scaleout.py --workload genir|imagerag|index --workers 1,2 [--targets N] [--repeats 1]
                             [--device cpu|cuda] [--gpus-per-worker X] [--cpus-per-worker X] [--address local]

Every run goes through the application layer as the command line's `--ray` does (`App.eval_genir`,
`App.eval_imagerag`, `App.index_folder` with `ray=RayOptions(...)`) on the tiny random models: GenIR with
visual feedback (tiny:qwen2-vl, tiny:sd, tiny:clip; the tiny VLM's answers are noise, so a target ends after
its first round), ImageRAG scored with CLIP (tiny:omnigen, tiny:clip), indexing on the image route (tiny:clip,
pictures of `--side` pixels, handed out in batches of 16). One application runs every job and keeps its
workers, with their models, from one job to the next (as a server or a notebook does): each side first runs
a job of one item per worker, untimed, that starts them (printed: how long it took, which a command line run
pays once), then the job timed. So the figures are the steady state a long evaluation runs at.

The in-process run (no Ray, one item at a time, as each worker runs them) comes first, builds the tiny
models' cache and gives Ray's overhead at one worker. Repeats are interleaved and medians kept. `--address
local` starts a cluster of this machine's cores (a small object store, workers at this process's priority:
`RAY_worker_niceness=0`); `auto` or `ray://HOST:PORT` join one.
Printed: targets/s per run, then one JSON line: {"workload", "workers", "targets_per_s", "ratio" (the most
workers vs one), "in_process_targets_per_s", "ray_overhead" (1 - the 1-worker rate / the in-process rate)}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import prompt_for, write_pictures

from imageloop.app import App
from imageloop.app.core import batches_in_flight
from imageloop.config import Settings
from imageloop.knobs import RayOptions

Job = Callable[[App, Path, int, Path, "RayOptions | None"], None]
BATCH = 16
"""Pictures per indexing batch: a batch is what a worker is handed."""


def genir(app: App, pictures: Path, count: int, out: Path, ray: RayOptions | None) -> None:
    """A GenIR evaluation of `count` targets (visual feedback, one refinement round)."""
    targets = out.parent / f"{out.name}-targets.txt"
    targets.write_text("".join(f"{p}\n" for p in sorted(pictures.glob("*.png"))[:count]))
    knobs = {"feedback": "visual", "rounds": 1, "k": 5, "rank_depth": 100}
    app.eval_genir(pictures, targets, out, knobs=knobs, ray=ray)


def imagerag(app: App, pictures: Path, count: int, out: Path, ray: RayOptions | None) -> None:
    """An ImageRAG evaluation of `count` prompts, draft and final scored with CLIP."""
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("".join(f"{prompt_for(i)}\n" for i in range(count)))
    app.eval_imagerag(prompts, pictures, out, metrics="clip", ray=ray)


def index(app: App, pictures: Path, count: int, out: Path, ray: RayOptions | None) -> None:
    """Indexing `count` new pictures (fresh copies, so every one is new)."""
    out.mkdir()
    for picture in sorted(pictures.glob("*.png"))[:count]:
        shutil.copy(picture, out)
    summary = app.index_folder(out, options={"batch_size": BATCH}, ray=ray)
    assert summary.indexed == count, summary


WORKLOADS: dict[str, Job] = {"genir": genir, "imagerag": imagerag, "index": index}


def settings(workload: str, device: str | None) -> Settings:
    """The tiny models of `workload`, drawing 64x64 in 2 steps."""
    generator = "tiny:omnigen" if workload == "imagerag" else "tiny:sd"
    return Settings.model_validate({
        "vlm": "tiny:qwen2-vl", "generator": generator, "embedder": "tiny:clip", "eval_clip": "tiny:clip",
        "device": device, "size": (64, 64), "steps": 2,
    })  # fmt: skip


def connect(address: str) -> None:
    """Start (local) or join the cluster, before any timing."""
    import ray

    if address == "local":
        # Ray runs its workers at nice 15, so they yield to any other work on the machine; here they are compared
        # with a run in this process (nice 0) on a machine others may share: both at the same priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    print(f"Ray cluster: {ray.cluster_resources()}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="genir")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    parser.add_argument("--targets", type=int, default=24, help="GenIR targets, ImageRAG prompts or pictures")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per side; medians are kept")
    parser.add_argument("--side", type=int, default=64, help="picture side in pixels (indexing: try 512)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where each worker's models run")
    parser.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs each worker holds (cuda)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--address", default="local", help="local (start one here), auto or ray://HOST:PORT")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    job = WORKLOADS[args.workload]
    app = App(settings(args.workload, args.device))
    connect(args.address)
    rates: dict[str, list[float]] = {"here": [], **{str(w): [] for w in counts}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pictures = root / "pictures"
        pictures.mkdir()
        write_pictures(pictures, args.targets, args.side)
        if args.workload != "index":
            app.index_folder(pictures)  # the corpus the evaluations search, indexed once, here
        for repeat in range(args.repeats):
            for side in rates:
                ray = None if side == "here" else RayOptions(ray=args.address, workers=int(side),
                                                             gpus_per_worker=args.gpus_per_worker,
                                                             cpus_per_worker=args.cpus_per_worker)  # fmt: skip
                where = "in this process" if ray is None else f"{side} worker(s)"
                if repeat == 0:  # start the workers and load their models: one item each, untimed
                    started = time.perf_counter()
                    items = 1 if ray is None else int(side)
                    if args.workload == "index":  # a batch is an item, and a worker takes several at once
                        items *= BATCH * (1 if ray is None else batches_in_flight(args.cpus_per_worker))
                    job(app, pictures, items, root / f"{side}-start", ray)
                    print(f"{where}: started in {time.perf_counter() - started:.1f} s", file=sys.stderr)
                started = time.perf_counter()
                job(app, pictures, args.targets, root / f"{side}-{repeat}", ray)
                rates[side].append(args.targets / (time.perf_counter() - started))
                print(f"{args.workload} {where}: {rates[side][-1]:.3f} targets/s", file=sys.stderr)
    app.close()
    median = {side: statistics.median(values) for side, values in rates.items()}
    result: dict[str, Any] = {
        "workload": args.workload,
        "workers": counts,
        "targets_per_s": [round(median[str(w)], 4) for w in counts],
        "ratio": round(median[str(max(counts))] / median[str(min(counts))], 3),
        "in_process_targets_per_s": round(median["here"], 4),
        "ray_overhead": round(1 - median[str(min(counts))] / median["here"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
