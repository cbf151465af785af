"""Decode + pad throughput for DIV2K-sized PNGs (2040x1356), 1 and 2 worker processes.

Prints images/s for the same work the caption stage does per image: read,
sha256, decode, convert to RGB, pad to a square, resize to LLaVA-1.5's 336.

    python bench/cpu_images.py [--n 24] [--workers 1,2] [--size 336]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dataprep.images import PrepOptions, prepare


def make_pngs(folder: Path, n: int, w: int = 2040, h: int = 1356) -> list[Path]:
    """Photo-like PNGs: smooth gradients plus noise, ~3-5 MB each like DIV2K."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, (xx + yy) % 256], axis=-1).astype(np.int16)
        noise = rng.integers(-12, 12, size=base.shape, dtype=np.int16)
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        p = folder / f"{i:04d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _one(args: tuple[str, PrepOptions]) -> bool:
    path, opts = args
    return prepare(Path(path).read_bytes(), opts).error is None


def run(paths: list[Path], workers: int, opts: PrepOptions) -> float:
    jobs = [(str(p), opts) for p in paths]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_one, jobs[:workers]))  # warm the workers (spawn + imports) outside the timing
        t0 = time.perf_counter()
        ok = list(pool.map(_one, jobs))
        dt = time.perf_counter() - t0
    assert all(ok)
    return len(paths) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--size", type=int, default=336)
    args = ap.parse_args()
    opts = PrepOptions(mode="pad", size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_pngs(Path(tmp), args.n)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        results = {f"workers_{w}": round(run(paths, int(w), opts), 2) for w in args.workers.split(",")}
    print(json.dumps({"bench": "cpu_images", "images": args.n, "size": "2040x1356", "mean_png_mb": round(mb, 2), "target_side": args.size, "cpus": os.cpu_count(), "images_per_s": results}))


if __name__ == "__main__":
    main()
