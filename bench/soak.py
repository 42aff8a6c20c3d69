"""Soak: mixed MCP calls against one `imageloop mcp` for minutes, through the SDK's real client.

One run starts `imageloop mcp --profile tiny --http 127.0.0.1:0` (random tiny models: seconds on a CPU,
the real loading and inference code) over a folder of small pictures, and keeps `--concurrency`
clients busy for `--minutes` with a mix of calls: `retrieve_images` (text and image queries),
`index_images` (now and then after a new picture arrives), `generate_with_references` (ImageRAG) and
GenIR sessions (`genir_round`, then `genir_feedback` rounds until found or out of rounds). Long calls
that return a run id are polled with `get_run` until they finish.

Before the clock starts, the folder is indexed and each kind of call made once (every model loaded).
It reports calls done, errors (tool errors and exceptions, each kept for the report), lost results (a
run that never finished, or finished without its record or image on disk), p50/p99 latency per call,
and the server's RSS growth from the end of the warm-up (the first fifth of the run, at most 2
minutes, whose calls count like the others) to the end, as a fraction. Goals: zero lost, zero errors,
RSS growth under 5%.

    python bench/soak.py [--minutes 10] [--concurrency 4] [--tracemalloc]

Its last line is JSON: {"calls", "errors", "lost", "p50_ms", "p99_ms", "rss_growth"}; it exits 1 when a goal
is missed. `--tracemalloc` runs the server under tracemalloc (slower) and prints what grew most between
the end of the warm-up and the end of the run, by the traceback that allocated it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

# Run as a script, this file's folder comes first on sys.path, where `bench/mcp.py` would shadow the
# `mcp` package: the repository root takes its place.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import numpy as np
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent
from PIL import Image

from imageloop.app.links import MCP_BASE

REPO = Path(__file__).resolve().parents[1]
RUNS_RESOURCE = MCP_BASE + "runs/"  # how the server names a run's files to an HTTP client
FINISHED = {"done", "error", "cancelled", "interrupted"}
WORDS = ["red", "blue", "green", "bird", "cat", "dog", "snow", "branch", "sofa", "beach", "city", "night"]
# How often each kind of call is made (weights).
MIX = {"retrieve": 5, "retrieve_image": 2, "generate": 2, "genir": 2, "index": 1}
RUN_PATIENCE_S = 300.0  # a run not finished after this long counts as lost
RSS_EVERY_S = 2.0
RSS_GOAL = 0.05
# The server under tracemalloc: SIGUSR1 writes a snapshot to the folder its first argument names (under a
# temporary name first: a large snapshot takes seconds to write, and the reader must not load half of one).
TRACED_SERVER = """
import os, runpy, signal, sys, tracemalloc
from pathlib import Path
folder = Path(sys.argv.pop(1))
tracemalloc.start(12)
def snapshot(signum, frame):
    name = folder / f"{len(list(folder.glob('*.snapshot')))}.snapshot"
    tracemalloc.take_snapshot().dump(f"{name}.part")
    os.replace(f"{name}.part", name)  # whole when it appears: the reader waits for the name
signal.signal(signal.SIGUSR1, snapshot)
runpy.run_module("imageloop.cli", run_name="__main__", alter_sys=True)
"""


@dataclass
class Tally:
    """What the clients did: latencies by call, errors with their text, lost runs, RSS samples."""

    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    seconds: float = 0.0

    def timed(self, name: str, ms: float) -> None:
        self.latencies_ms.setdefault(name, []).append(ms)

    @property
    def calls(self) -> int:
        return sum(len(values) for values in self.latencies_ms.values())


def make_picture(path: Path, rng: np.random.Generator, side: int = 48) -> None:
    """A photo-like picture: a coloured gradient plus grain."""
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    base = rng.integers(0, 256, 3).astype(np.float32)
    pixels = base * ramp[None, :, None] + (255 - base) * ramp[:, None, None] * 0.5 + rng.normal(0, 12, (side, side, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def build_library(root: Path, count: int, rng: np.random.Generator) -> Path:
    folder = root / "photos"
    folder.mkdir(parents=True)
    for i in range(count):
        make_picture(folder / f"p{i:04d}.png", rng)
    return folder


def start_server(
    root: Path, runs: Path, sessions: Path, snapshots: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """`imageloop mcp --profile tiny --http 127.0.0.1:0` in its own process (under tracemalloc, writing
    snapshots to `snapshots` on SIGUSR1, when given); returns it and its URL."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    program = ["-c", TRACED_SERVER, str(snapshots)] if snapshots is not None else ["-m", "imageloop.cli"]
    process = subprocess.Popen(
        [sys.executable, *program, "mcp", "--profile", "tiny", "--root", str(root),
         "--runs", str(runs), "--sessions", str(sessions), "--http", "127.0.0.1:0"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    seen = ""
    while not (match := re.search(r"serving (http://\S+/mcp)", seen)):
        line = process.stderr.readline()
        if not line:
            raise SystemExit(f"the server exited before serving:\n{seen}")
        seen += line
    return process, match.group(1)


@asynccontextmanager
async def client(url: str) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(url) as opened, ClientSession(opened[0], opened[1]) as session:
        await session.initialize()
        yield session


def text_of(result: CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, TextContent))


class Soak:
    """The clients' work: one method per kind of call, each timing itself and checking what came back."""

    def __init__(self, session: ClientSession, folder: Path, runs: Path, tally: Tally, rng: random.Random) -> None:
        self.session = session
        self.folder = folder
        self.runs = runs
        self.tally = tally
        self.rng = rng

    async def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """One tool call, timed; its structured result, or None after recording the error."""
        started = time.perf_counter()
        try:
            result = await self.session.call_tool(name, arguments)
        except Exception as e:  # a transport failure is an error like any other
            self.tally.errors.append(f"{name}: {type(e).__name__}: {e}")
            return None
        finally:
            self.tally.timed(name, 1000 * (time.perf_counter() - started))
        if result.isError or result.structuredContent is None:
            self.tally.errors.append(f"{name}: {text_of(result)[:300]}")
            return None
        return result.structuredContent

    async def finished(self, view: dict[str, Any] | None) -> dict[str, Any] | None:
        """Poll get_run until the run finishes; a run that never does, or ends in error, is counted."""
        if view is None:
            return None
        deadline = time.monotonic() + RUN_PATIENCE_S
        while view["status"] not in FINISHED:
            if time.monotonic() > deadline:
                self.tally.lost.append(f"{view['kind']} run {view['run_id']}: still {view['status']}")
                return None
            polled = await self.call("get_run", {"run_id": view["run_id"], "wait_seconds": 20})
            if polled is None:
                self.tally.lost.append(f"{view['kind']} run {view['run_id']}: get_run failed")
                return None
            view = polled
        if view["status"] != "done":
            self.tally.errors.append(f"{view['kind']} run {view['run_id']}: {view['status']}: {view['error']}")
            return None
        return view

    async def retrieve(self) -> None:
        query = " ".join(self.rng.sample(WORDS, 3))
        found = await self.call("retrieve_images", {"index": "photos", "query": query, "k": 5, "max_images": 3})
        if found is not None and not found["results"]:
            self.tally.lost.append(f"retrieve {query!r}: no results from a non-empty index")

    async def retrieve_image(self) -> None:
        picture = self.rng.choice(sorted(self.folder.glob("p*.png")))
        found = await self.call("retrieve_images", {"index": "photos", "image": str(picture), "k": 3})
        # Over HTTP an image is named as a resource (imageloop://roots/0/<its path, quoted>), not a path.
        if found is not None and unquote(found["results"][0]["path"]).rsplit("/", 1)[-1] != picture.name:
            self.tally.lost.append(f"image query {picture.name}: not found first")

    async def generate(self) -> None:
        prompt = f"a {' '.join(self.rng.sample(WORDS, 2))} at dusk"
        view = await self.finished(await self.call("generate_with_references", {"prompt": prompt, "index": "photos"}))
        if view is None:
            return
        record = view["result"] or {}
        run_record = self.runs / view["run_id"] / "run.json"
        final = str(record.get("final_image") or "")
        image = self.runs / unquote(final.removeprefix(RUNS_RESOURCE))  # the file that resource names
        if not final.startswith(RUNS_RESOURCE) or not image.is_file() or not run_record.is_file():
            self.tally.lost.append(f"generate run {view['run_id']}: finished without its image or record")

    async def genir(self) -> None:
        query = f"a {' '.join(self.rng.sample(WORDS, 2))}"
        arguments = {"index": "photos", "query": query, "rounds": 3, "k": 5, "feedback": "visual"}
        view = await self.finished(await self.call("genir_round", arguments))
        while view is not None and (shown := view["result"])["status"] == "awaiting_feedback":
            answer = "found: 1" if self.rng.random() < 0.3 else f"more {self.rng.choice(WORDS)}, less clutter"
            view = await self.finished(
                await self.call("genir_feedback", {"session_id": shown["session_id"], "feedback": answer})
            )
        if view is not None and view["result"]["status"] != "finished":
            self.tally.lost.append(f"genir session {view['result']['session_id']}: ended {view['result']['status']}")

    async def index(self) -> None:
        if self.rng.random() < 0.5:  # now and then a new picture arrives first
            make_picture(self.folder / f"new-{time.time_ns()}.png", np.random.default_rng(self.rng.getrandbits(32)))
        view = await self.finished(await self.call("index_images", {"folder": "photos"}))
        if view is not None:
            counts = view["result"]
            if counts["indexed"] + counts["skipped"] + counts["failed"] != counts["total"] or counts["failed"]:
                self.tally.lost.append(f"index run {view['run_id']}: counts {counts}")


async def worker(url: str, folder: Path, runs: Path, tally: Tally, seed: int, until: float) -> None:
    rng = random.Random(seed)
    kinds = list(MIX)
    weights = [MIX[kind] for kind in kinds]
    async with client(url) as session:
        soak = Soak(session, folder, runs, tally, rng)
        operations: dict[str, Callable[[], Awaitable[None]]] = {
            "retrieve": soak.retrieve, "retrieve_image": soak.retrieve_image, "generate": soak.generate,
            "genir": soak.genir, "index": soak.index,
        }  # fmt: skip
        while time.monotonic() < until:
            await operations[rng.choices(kinds, weights)[0]]()


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid` (Linux: /proc/PID/statm counts pages)."""
    resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def sample_rss(pid: int, tally: Tally, until: float) -> None:
    started = time.monotonic()
    while time.monotonic() < until:
        tally.rss.append((time.monotonic() - started, rss_bytes(pid)))
        await anyio.sleep(RSS_EVERY_S)


def rss_growth(samples: list[tuple[float, int]], warmup_s: float) -> tuple[float, int, int]:
    """Growth from the warm-up's end to the run's end: medians of the first and last minute after warm-up."""
    after = [(t, rss) for t, rss in samples if t >= warmup_s]
    if len(after) < 2:
        return 0.0, 0, 0
    window = max(1, min(len(after) // 4, int(60 / RSS_EVERY_S)))
    start = int(statistics.median(rss for _, rss in after[:window]))
    end = int(statistics.median(rss for _, rss in after[-window:]))
    return (end - start) / start, start, end


async def warm_up(url: str, folder: Path, runs: Path) -> None:
    """Index the folder and make each kind of call once, so every model is loaded before the clock starts."""
    tally = Tally()
    async with client(url) as session:
        soak = Soak(session, folder, runs, tally, random.Random(-1))
        for operation in (soak.index, soak.retrieve, soak.retrieve_image, soak.generate, soak.genir):
            await operation()
    if tally.errors or tally.lost:
        raise SystemExit(f"the warm-up failed: {tally.errors + tally.lost}")


async def soak(
    url: str, pid: int, folder: Path, runs: Path, minutes: float, concurrency: int, snapshot_at: float | None
) -> Tally:
    await warm_up(url, folder, runs)
    tally = Tally()
    started = time.monotonic()
    until = started + 60 * minutes
    async with anyio.create_task_group() as group:
        group.start_soon(sample_rss, pid, tally, until)
        if snapshot_at is not None:
            group.start_soon(signal_at, pid, snapshot_at)
        for n in range(concurrency):
            group.start_soon(worker, url, folder, runs, tally, n, until)
    tally.seconds = time.monotonic() - started  # the last calls may finish a little after `until`
    if snapshot_at is not None:
        os.kill(pid, signal.SIGUSR1)
    return tally


async def signal_at(pid: int, seconds: float) -> None:
    """The tracemalloc snapshot at the end of the warm-up."""
    await anyio.sleep(seconds)
    os.kill(pid, signal.SIGUSR1)


def largest_growth(snapshots: Path, top: int = 12) -> list[str]:
    """What grew most from the first snapshot to the last, by allocating traceback (innermost frames last)."""
    import tracemalloc

    deadline = time.monotonic() + 600
    while len(list(snapshots.glob("*.snapshot"))) < 2 and time.monotonic() < deadline:
        time.sleep(1)  # the last one is written after the clients stop
    first, last = (tracemalloc.Snapshot.load(str(snapshots / f"{n}.snapshot")) for n in (0, 1))
    ignored = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
    ]
    lines = []
    for stat in last.filter_traces(ignored).compare_to(first.filter_traces(ignored), "traceback")[:top]:
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback[-6:]))
        lines.append(f"  {stat.size_diff / 2**20:+8.2f} MiB {stat.count_diff:+8d} blocks  {frames}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--images", type=int, default=40, help="pictures in the folder at the start")
    parser.add_argument("--tracemalloc", action="store_true", help="show what grew, by allocating traceback")
    args = parser.parse_args()
    warmup_s = min(120.0, 60 * args.minutes / 5)

    growth_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imageloop-soak-") as tmp:
        root = Path(tmp)
        folder = build_library(root, args.images, np.random.default_rng(0))
        runs = root / "runs"
        snapshots = root / "snapshots" if args.tracemalloc else None
        if snapshots is not None:
            snapshots.mkdir()
        process, url = start_server(root, runs, root / "sessions.sqlite", snapshots)
        try:
            load_before = os.getloadavg()[0]
            snapshot_at = warmup_s if snapshots is not None else None
            tally = anyio.run(soak, url, process.pid, folder, runs, args.minutes, args.concurrency, snapshot_at)
            load_after = os.getloadavg()[0]
            if snapshots is not None:
                growth_lines = largest_growth(snapshots)
        finally:
            process.terminate()
            process.wait(timeout=60)

    latencies = [ms for values in tally.latencies_ms.values() for ms in values]
    growth, rss_start, rss_end = rss_growth(tally.rss, warmup_s)
    print(f"{tally.calls} calls in {tally.seconds / 60:.1f} min by {args.concurrency} clients (load average "
          f"{load_before:.1f} at the start, {load_after:.1f} at the end, {os.cpu_count()} cores)")  # fmt: skip
    for name, values in sorted(tally.latencies_ms.items()):
        print(f"  {name:26s} {len(values):5d} calls  p50 {np.percentile(values, 50):8.0f} ms  "
              f"p99 {np.percentile(values, 99):8.0f} ms")  # fmt: skip
    print(f"errors: {len(tally.errors)}")
    for text, count in Counter(tally.errors).most_common(10):
        print(f"  {count} x {text}")
    print(f"lost results: {len(tally.lost)}")
    for text in tally.lost[:10]:
        print(f"  {text}")
    by_minute = {int(t // 60): rss for t, rss in tally.rss}  # the last sample of each minute
    print("server RSS by minute (MiB): " + " ".join(f"{rss / 2**20:.0f}" for _, rss in sorted(by_minute.items())))
    print(f"server RSS after warm-up ({warmup_s:.0f} s) {rss_start / 2**20:.0f} MiB, at the end "
          f"{rss_end / 2**20:.0f} MiB: growth {100 * growth:+.1f}% (goal < {100 * RSS_GOAL:.0f}%)")  # fmt: skip
    if growth_lines:
        print("grown most after warm-up (tracemalloc, by allocating traceback):")
        print("\n".join(growth_lines))
    summary = {
        "calls": tally.calls,
        "errors": len(tally.errors),
        "lost": len(tally.lost),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        "rss_growth": round(growth, 4),
    }
    print(json.dumps(summary))
    if tally.errors or tally.lost or growth > RSS_GOAL:
        sys.exit(1)


if __name__ == "__main__":
    main()
