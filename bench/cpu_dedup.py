"""Dedup throughput and peak memory on generated captions and images.

    python bench/cpu_dedup.py                                   # 100k captions, 10k images
    python bench/cpu_dedup.py --captions 20000 --images 2000 --workers 2

Captions: synthetic LLaVA-length texts (~70 words), one in 20 a near-copy
of another (one word changed). Images: small generated pictures (64x64 PNG
by default), one in 10 a resized, JPEG-recompressed or 1-px-shifted copy of
another. Each phase runs in a fresh child process so its figures are its
own: rows/s, clusters found, and the peak RSS of the process (VmHWM) next to
its RSS before the phase, so ``added_mib`` is what the phase holds. Images
and captions are hashed by ``--workers`` processes whose own peak RSS is
reported apart (``worker_peak_rss_mib``, the largest worker: each holds one
chunk of images or texts). Prints one JSON
line per phase. Never part of CI.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OBJECTS = "dog cat boat house tree car bird lamp chair horse bicycle mountain river bridge tower".split()
COLOURS = "red blue green yellow white black brown grey orange purple".split()
PLACES = "street beach park garden field kitchen harbour forest square station".split()


def caption(i: int) -> str:
    """A distinct caption per i (numbers and a word mix), with the shared boilerplate LLaVA writes."""
    return (
        f"The image features a {COLOURS[i % 10]} {OBJECTS[(i // 10) % 15]} number {i} near the {PLACES[(i // 150) % 10]},"
        f" photographed at {i % 24} o'clock from {i % 7 + 2} metres away. The background shows item {i * 7 % 1000}"
        f" beside a {OBJECTS[(i // 3) % 15]} and a {COLOURS[(i // 7) % 10]} {OBJECTS[(i // 70) % 15]} with tag {i * 13 % 997},"
        f" while a {OBJECTS[(i // 5) % 15]} rests on the left next to marker {i * 31 % 1009}. The light is soft and even,"
        f" the colours are muted, and the scene, catalogued as entry {i * 17 % 9973}, looks calm and natural overall."
    )


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def captions_child(n: int, workers: int) -> dict:
    from dataprep.dedup import DedupOptions, caption_clusters, caption_signatures, lsh_params

    texts = [caption(i) for i in range(n)]
    for i in range(0, n, 20):  # plant near-copies
        if i + 1 < n:
            texts[i + 1] = texts[i].replace("soft", "gentle")
    ids = [f"synth/{i:07d}" for i in range(n)]
    opts = DedupOptions(workers=workers)
    before = rss_mib()
    t0 = time.perf_counter()
    sigs = caption_signatures(texts, opts)
    t1 = time.perf_counter()
    bands, rows = lsh_params(opts.caption_threshold, opts.num_perm)
    found = caption_clusters(ids, sigs, opts.caption_threshold, bands, rows)
    t2 = time.perf_counter()
    return {
        "phase": "captions",
        "rows": n,
        "workers": workers,
        "rows_per_s": round(n / (t2 - t0), 1),
        "minhash_rows_per_s": round(n / (t1 - t0), 1),
        "lsh_seconds": round(t2 - t1, 2),
        "bands_rows": [bands, rows],
        "clusters": len(found),
        "planted_pairs": len(range(0, n - 1, 20)),
        "planted_found": sum(any(m == i + 1 for m in c.members) and i in c.members for c in found for i in c.members if i % 20 == 0),
        "signature_mib": round(sigs.nbytes / 2**20, 1),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(rss_mib("VmHWM"), 1),
        "added_mib": round(rss_mib("VmHWM") - before, 1),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def write_images(folder: Path, n: int, side: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        if i % 10 == 9:  # a copy of the previous picture
            src = Image.open(paths[-1]).convert("RGB")
            kind = (i // 10) % 3
            if kind == 0:
                img, fmt = src.resize((side * 3 // 4, side * 3 // 4)), "PNG"
            elif kind == 1:
                img, fmt = src, "JPEG"
            else:
                a = np.asarray(src)
                img, fmt = Image.fromarray(np.pad(a, ((0, 0), (1, 0), (0, 0)), mode="edge")[:side, :side]), "PNG"  # 1 px of 64
        else:  # a smooth random field with a few shapes: structure at several scales, like a photo
            from PIL import ImageDraw

            img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
            draw = ImageDraw.Draw(img)
            for _ in range(3):
                x, y = (int(v) for v in rng.integers(0, side * 3 // 4, 2))
                w, h = (int(v) for v in rng.integers(side // 8, side // 3, 2))
                draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            fmt = "PNG"
        p = folder / f"{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=50) if fmt == "JPEG" else img.save(buf, format=fmt)
        p.write_bytes(buf.getvalue())
        paths.append(str(p))
    return paths


def images_child(n: int, side: int, workers: int) -> dict:
    from dataprep.dedup import DedupOptions, hash_images, image_clusters

    with tempfile.TemporaryDirectory() as tmp:
        t_gen = time.perf_counter()
        paths = write_images(Path(tmp), n, side)
        gen_s = time.perf_counter() - t_gen
        ids = [f"synth/{i:06d}" for i in range(n)]
        opts = DedupOptions(workers=workers)
        before = rss_mib()
        t0 = time.perf_counter()
        hashes, shas, pixels, errors = hash_images(paths, opts)
        t1 = time.perf_counter()
        found = image_clusters(ids, hashes, shas, pixels, errors, opts.image_distance)
        t2 = time.perf_counter()
    cluster_of = {m: k for k, c in enumerate(found) for m in c.members}
    planted = {(i - 1, i) for i in range(9, n, 10)}
    recalled = sum(cluster_of.get(a, -1) == cluster_of.get(b, -2) for a, b in planted)
    # pictures merged that are not copies of each other (chance phash neighbours)
    spurious = sum(len(c.members) - 1 for c in found) - recalled
    return {
        "phase": "images",
        "rows": n,
        "side_px": side,
        "workers": workers,
        "rows_per_s": round(n / (t2 - t0), 1),
        "hash_rows_per_s": round(n / (t1 - t0), 1),
        "cluster_seconds": round(t2 - t1, 3),
        "clusters": len(found),
        "planted_copies": len(planted),
        "planted_found": recalled,
        "spurious_merges": spurious,
        "errors": sum(e is not None for e in errors),
        "generate_seconds": round(gen_s, 1),
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(rss_mib("VmHWM"), 1),
        "added_mib": round(rss_mib("VmHWM") - before, 1),
        "worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", choices=["captions", "images"])
    a = ap.parse_args()
    if a.child == "captions":
        print(json.dumps(captions_child(a.captions, a.workers)))
        return
    if a.child == "images":
        print(json.dumps(images_child(a.images, a.side, a.workers)))
        return
    for phase, n in (("captions", a.captions), ("images", a.images)):
        if n <= 0:
            continue
        cmd = [sys.executable, __file__, "--child", phase, "--captions", str(a.captions), "--images", str(a.images), "--side", str(a.side), "--workers", str(a.workers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


if __name__ == "__main__":
    main()
