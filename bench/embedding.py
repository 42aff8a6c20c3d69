"""Indexing throughput: the project's indexer vs a bare open_clip encode loop, in one run.

Both sides read the same JPEG files and encode them with the same loaded open_clip model (by default
the ViT-B-32 architecture with random weights: real compute, nothing to download). The bare loop
opens each file with PIL, applies open_clip's eval transform and encodes in batches, one thing at a
time. The indexer also hashes every file, checks the index for known content, and writes vectors and
metadata to SQLite; to make up for that its worker threads hash and decode files ahead of the
embedder, whose own pool preprocesses the next batch while the device encodes this one.
Goal: indexer images/s / bare loop images/s >= 0.9.

    python bench/embedding.py [--images 512] [--size 256] [--model ViT-B-32] [--batch-size 32]
                              [--repeats 3] [--device cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageloop.tools.embedders.local import OpenClipEmbedder
from imageloop.tools.indexing.image_index import INDEX_DIRNAME
from imageloop.tools.indexing.indexer import index_folder


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """`count` distinct JPEGs: a colour gradient plus noise, so every file decodes to real work."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(count):
        base = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), i % 256)])
        noise = rng.normal(0, 40, (3, size, size))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=90)


def bare_loop(files: list[Path], embedder: OpenClipEmbedder, batch_size: int) -> float:
    """Seconds for open → preprocess → encode in batches, sequentially, with the embedder's model."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model = embedder._loaded.model
    preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        pixels = torch.stack(
            [preprocess(Image.open(path).convert("RGB")) for path in files[start : start + batch_size]]
        )
        with torch.inference_mode():
            features = model.encode_image(pixels.to(embedder.device, embedder.dtype))
            torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
    return time.perf_counter() - started


def indexer(folder: Path, embedder: OpenClipEmbedder, batch_size: int) -> float:
    """Seconds for `index_folder` to index the folder from scratch."""
    shutil.rmtree(folder / INDEX_DIRNAME, ignore_errors=True)
    started = time.perf_counter()
    summary = index_folder(folder, embedder, None, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - started
    if summary.indexed != summary.total or summary.failed:
        raise SystemExit(f"indexer did not index every file: {summary.to_json()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="side of the square JPEGs, in pixels")
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip architecture, random weights; or 'tiny'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default per device)")
    args = parser.parse_args()

    if args.model == "tiny":
        from imageloop.tiny.clip import tiny_clip_dir

        name = f"local-dir:{tiny_clip_dir()}"
    else:
        name = args.model
    embedder = OpenClipEmbedder(name, None, model_id=f"bench:{args.model}", device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_images(folder, args.images, args.size)
        files = sorted(folder.glob("*.jpg"))
        # Warm-up on a few files: CUDA context, kernels and allocator, file cache.
        bare_loop(files[: 2 * args.batch_size], embedder, args.batch_size)
        indexer(folder, embedder, args.batch_size)
        bare_times, indexer_times = [], []
        for _ in range(args.repeats):
            bare_times.append(bare_loop(files, embedder, args.batch_size))
            indexer_times.append(indexer(folder, embedder, args.batch_size))

    bare_rate = args.images / statistics.median(bare_times)
    indexer_rate = args.images / statistics.median(indexer_times)
    ratio = indexer_rate / bare_rate
    print(
        f"model {args.model} on {embedder.device} ({str(embedder.dtype).removeprefix('torch.')}), "
        f"{args.images} JPEGs {args.size}x{args.size}, batch {args.batch_size}, median of {args.repeats}"
    )
    print(f"bare open_clip loop: {bare_rate:8.1f} images/s")
    print(f"imageloop indexer:   {indexer_rate:8.1f} images/s")
    print(f"ratio indexer/bare:  {ratio:8.3f}  (goal >= 0.9)")
    print(
        json.dumps(
            {
                "benchmark": "embedding",
                "model": args.model,
                "device": embedder.device,
                "dtype": str(embedder.dtype).removeprefix("torch."),
                "images": args.images,
                "size": args.size,
                "batch_size": args.batch_size,
                "bare_images_per_s": round(bare_rate, 1),
                "indexer_images_per_s": round(indexer_rate, 1),
                "ratio": round(ratio, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
