"""Peak memory of `imageloop index` on large photos, side by side with small ones, and against another checkout.

One run writes `--photos` photo-like JPEGs of `--megapixels` (default 80 at 12 Mpx, a camera's output)
and as many at 640x480, then indexes each folder with `--profile tiny` (the tiny open_clip image
embedder: the image route, every picture decoded) in a fresh process, and reports each process's peak
RSS (`wait4`'s ru_maxrss). With `--compare-with DIR` (another checkout of imageloop, e.g. `git
worktree add /tmp/main main`) the same indexing runs on that code too, interleaved, so both see the
same machine. The indexer reduces each picture to twice the embedder's input side as it is decoded;
goal: large photos cost little more than small ones.

    python bench/index_memory.py [--photos 80] [--megapixels 12] [--compare-with DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    """`count` JPEGs of `size`: smooth colour fields with fine grain, compressing like photos do."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        tile = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        picture = Image.fromarray(tile).resize(size, Image.Resampling.BICUBIC)
        grain = Image.effect_noise(size, 12).convert("RGB")
        Image.blend(picture, grain, 0.08).save(folder / f"photo{i:03d}.jpg", quality=88)


def peak_rss_mib(code: Path, folder: Path) -> float:
    """Index `folder` with the imageloop at `code` in a fresh process; its peak RSS in MiB."""
    shutil.rmtree(folder / ".imageloop", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "imageloop.cli", "index", str(folder), "--profile", "tiny", "--json"],
        cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"indexing {folder} with {code} failed ({process.returncode})")
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["indexed"] == summary["total"], summary
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=80)
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the median is reported")
    parser.add_argument("--compare-with", type=Path, help="another imageloop checkout to measure side by side")
    args = parser.parse_args()
    width = int((args.megapixels * 1e6 * 4 / 3) ** 0.5)
    large_size = (width, width * 3 // 4)
    codes = {"this checkout": REPO, **({"compared": args.compare_with.resolve()} if args.compare_with else {})}

    with tempfile.TemporaryDirectory(prefix="imageloop-memory-") as tmp:
        folders = {
            f"{args.photos} x {large_size[0]}x{large_size[1]}": Path(tmp) / "large",
            f"{args.photos} x 640x480": Path(tmp) / "small",
        }
        write_photos(folders[next(iter(folders))], args.photos, large_size)
        write_photos(folders[list(folders)[1]], args.photos, (640, 480))
        peaks: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for case, folder in folders.items():
                for name, code in codes.items():
                    peaks.setdefault((name, case), []).append(peak_rss_mib(code, folder))

    print(f"peak RSS of `imageloop index --profile tiny`, median of {args.repeats} fresh processes")
    for (name, case), values in peaks.items():
        print(f"  {name:14s} {case:22s} {float(np.median(values)):8.0f} MiB")
    for name in codes:
        large, small = (float(np.median(peaks[(name, case)])) for case in folders)
        print(f"  {name}: large photos cost {large / small:.2f}x the small ones")
    print(json.dumps({f"{name} | {case}": round(float(np.median(v)), 1) for (name, case), v in peaks.items()}))


if __name__ == "__main__":
    main()
