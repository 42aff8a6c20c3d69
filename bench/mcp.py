"""What MCP adds to a `retrieve_images` call: the same call in process vs through `imageloop mcp`.

One run builds an indexed folder, starts `imageloop mcp --profile openai` (stdio, and streamable HTTP
on 127.0.0.1), and times the identical retrieval side by side, calls interleaved so both see the same
machine: in process (`ImageloopMCP.retrieve`, which builds the very result the tool returns) and
through the SDK's client (JSON-RPC, argument validation, a worker-thread hop, base64 thumbnails over
the pipe or socket). Query embeddings come from a local fake of the OpenAI API in both cases, so the
difference is the protocol's. Goal: the added latency is under 20 ms at p50, thumbnails included.

    python bench/mcp.py [--images 200] [--k 10] [--max-images 10] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, where `bench/mcp.py` would shadow the
# `mcp` package: the repository root takes its place.
sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
import numpy as np
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ImageContent
from PIL import Image

from imageloop.app import App
from imageloop.cli import main as cli_main
from imageloop.config import load_settings
from imageloop.mcp.server import build_server
from tests.fake_openai_server import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]
GOAL_MS = 20.0
WORDS = ["red", "blue", "green", "jay", "cat", "dog", "snow", "branch", "sofa", "beach", "city", "night"]


def build_library(root: Path, count: int, side: int) -> Path:
    """`count` photo-like images (gradients plus grain, ~side² px) with sidecar captions."""
    folder = root / "photos"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    for i in range(count):
        base = rng.integers(0, 256, 3).astype(np.float32)
        pixels = base * ramp[None, :, None] + (255 - base) * ramp[:, None, None] * 0.5
        pixels += rng.normal(0, 12, (side, side, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img{i:04d}.png")
        caption = " ".join(rng.choice(WORDS, 6))
        (folder / f"img{i:04d}.txt").write_text(f"a photo of {caption}")
    return folder


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@asynccontextmanager
async def session(streams: Callable[[], AbstractAsyncContextManager[Any]]) -> AsyncIterator[ClientSession]:
    async with streams() as opened, ClientSession(opened[0], opened[1]) as client:
        await client.initialize()
        yield client


async def measure(
    server: Any, clients: dict[str, ClientSession], arguments: list[dict[str, Any]], warmup: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved timings (seconds) per path, and the bytes of image data one result carried. In process is
    the server's own tool call (validation, the tool, its result's blocks) without JSON-RPC or a transport."""
    timings: dict[str, list[float]] = {"in_process": [], **{name: [] for name in clients}}
    payload: dict[str, int] = {}
    warmup = min(warmup, len(arguments))
    for i, args in enumerate([*arguments[:warmup], *arguments]):
        started = time.perf_counter()
        direct = await server.call_tool("retrieve_images", args)
        elapsed = time.perf_counter() - started
        if i >= warmup:
            timings["in_process"].append(elapsed)
        for name, client in clients.items():
            started = time.perf_counter()
            result = await client.call_tool("retrieve_images", args)
            elapsed = time.perf_counter() - started
            assert not result.isError, result.content
            # Over HTTP files are named as resources, not paths: the same results, named otherwise.
            same = result.structuredContent == direct.structuredContent if name == "stdio" else (
                len(result.structuredContent["results"]) == len(direct.structuredContent["results"]))  # fmt: skip
            assert same, "the two paths disagree"
            if i >= warmup:
                timings[name].append(elapsed)
            payload[name] = sum(len(b.data) for b in result.content if isinstance(b, ImageContent))
    return timings, payload


def start_http(openai: FakeOpenAIServer, root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "imageloop.cli", "mcp", "--profile", "openai", "--root", str(root), "--http", ":0"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    seen = ""
    while not (match := re.search(r"serving http://\S+:(\d+)/mcp", seen)):
        line = process.stderr.readline()
        if not line:
            raise SystemExit(f"the HTTP server did not start:\n{seen}")
        seen += line
    return process, f"http://127.0.0.1:{match.group(1)}/mcp"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer() as openai:
        root = Path(tmp)
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "OPENAI_BASE_URL": openai.base_url,
               "OPENAI_API_KEY": "sk-bench", "OMP_NUM_THREADS": "1"}  # fmt: skip
        os.environ.update({"OPENAI_BASE_URL": openai.base_url, "OPENAI_API_KEY": "sk-bench"})
        folder = build_library(root, args.images, args.side)
        assert cli_main(["index", str(folder), "--profile", "openai"]) == 0
        rng = np.random.default_rng(1)
        arguments = [
            {"index": "photos", "query": " ".join(rng.choice(WORDS, 4)), "k": args.k, "max_images": args.max_images}
            for _ in range(args.calls)
        ]
        app = App(load_settings("openai"), roots=[root], runs_dir=root / ".imageloop-runs")
        server = build_server(app)
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "imageloop.cli", "mcp", "--profile", "openai", "--root", str(root)],
            env=env,
            cwd=REPO,
        )
        http, url = start_http(openai, root, env)
        try:
            async with (
                session(lambda: stdio_client(params)) as over_stdio,
                session(lambda: streamable_http_client(url)) as over_http,
            ):
                timings, payload = await measure(
                    server, {"stdio": over_stdio, "http": over_http}, arguments, args.warmup
                )
        finally:
            http.terminate()
            http.wait(timeout=10)
            app.close()
    base = statistics.median(timings["in_process"])
    summary: dict[str, Any] = {
        "images": args.images, "k": args.k, "max_images": args.max_images, "calls": args.calls,
        "image_bytes_per_result": payload,
        "in_process_ms": {"p50": round(base * 1e3, 2), "p95": round(percentile(timings["in_process"], 95) * 1e3, 2)},
    }  # fmt: skip
    for name in ("stdio", "http"):
        p50 = statistics.median(timings[name])
        summary[f"{name}_ms"] = {"p50": round(p50 * 1e3, 2), "p95": round(percentile(timings[name], 95) * 1e3, 2)}
        summary[f"{name}_added_ms_p50"] = round((p50 - base) * 1e3, 2)
        summary[f"{name}_ratio_p50"] = round(p50 / base, 2)
        summary[f"{name}_meets_goal"] = (p50 - base) * 1e3 < GOAL_MS
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images in the indexed folder")
    parser.add_argument("--side", type=int, default=256, help="their width and height in pixels")
    parser.add_argument("--k", type=int, default=10, help="results per call")
    parser.add_argument("--max-images", type=int, default=10, help="thumbnails per result (0: paths only)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per path")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (thumbnail caches fill)")
    summary = anyio.run(run, parser.parse_args())
    print(json.dumps(summary, indent=2))
    for name in ("stdio", "http"):
        verdict = "meets" if summary[f"{name}_meets_goal"] else "misses"
        print(
            f"{name}: +{summary[f'{name}_added_ms_p50']} ms at p50 over in-process "
            f"({summary[f'{name}_ratio_p50']}x): {verdict} the < {GOAL_MS:.0f} ms goal",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
