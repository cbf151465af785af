"""Batch builder throughput and peak memory on synthetic captions.

    python bench/cpu_batches.py                      # 100k and 1M captions
    python bench/cpu_batches.py --sizes 10000 --preset sdxl

For each size it writes a synthetic caption store (about 300-character
captions, like LLaVA's) and an edit store (a passing edit for half the
images, a failed one for a quarter), then builds batches in a fresh child
process so the figures are the builder's own: captions/s and batch rows/s,
RSS after the id/text index is loaded, the peak RSS while building the index
and, separately (the peak is reset between phases via /proc/self/clear_refs),
while writing the batches; ``writing_over_index_mib`` is what the streaming
writer adds on top of the index: about one shard of rows, independent of the
number of captions. ``peak_rss_mib`` is the whole process. Prints one JSON line
per size. Never part of CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
TAIL = (
    " The scene is lit by soft daylight, and the background shows a quiet street with a few parked cars,"
    " a row of trees and a low stone wall. The overall atmosphere is calm and the colours are muted,"
    " giving the photograph a natural look."
)


def caption(i: int) -> str:
    return f"The image features a {COLOURS[i % 10]} {OBJECTS[i % 15]} (item {i}) standing in the middle of the frame.{TAIL}"


def write_stores(folder: Path, n: int, rows_per_shard: int = 50_000) -> None:
    from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, ShardWriter

    t = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    with ShardWriter(folder / "captions", CAPTIONS_SCHEMA, "bench", rows_per_shard) as w:
        for i in range(n):
            w.add({"image_id": f"synth/{i:07d}", "image_uri": f"/data/synth/{i:07d}.png", "caption": caption(i), "key": f"{i:064x}", "created_at": t})
    with ShardWriter(folder / "edits", EDITS_SCHEMA, "bench", rows_per_shard) as w:
        for i in range(0, n, 2):
            src = caption(i)
            ok = i % 4 == 0
            target = src.replace(OBJECTS[i % 15], OBJECTS[(i + 1) % 15], 1) if ok else src.replace("street", "beach").replace(COLOURS[i % 10], "pink", 1)
            w.add({"image_id": f"synth/{i:07d}", "source": src, "target": target, "passed": ok, "violations": [] if ok else ["multiple_concepts"], "key": f"e{i:063x}", "created_at": t})


def rss_mib(field: str = "VmRSS") -> float:
    """Current RSS (VmRSS) or peak RSS since the last reset (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is one phase's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(folder: Path, preset: str, epochs: int, rows_per_shard: int) -> None:
    from dataprep.batches import BatchOptions, attach_edits, load_caption_index, write_batches

    base = rss_mib()
    t0 = time.perf_counter()
    index = load_caption_index(folder / "captions")
    attach_edits(index, folder / "edits")
    t_index = time.perf_counter() - t0
    after_index = rss_mib()
    index_peak = rss_mib("VmHWM")
    phase_peaks = reset_peak()
    opts = BatchOptions(preset=preset, epochs=epochs, rows_per_shard=rows_per_shard)
    s = write_batches(index, folder / "batches", opts)
    total = time.perf_counter() - t0
    write_peak = rss_mib("VmHWM") if phase_peaks else float("nan")
    # ru_maxrss follows the reset too, so the process peak is the larger phase peak
    peak = max(index_peak, write_peak if write_peak == write_peak else 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({
        "captions": len(index),
        "preset": s.preset,
        "epochs": epochs,
        "batch_rows": s.batches,
        "hard_negatives": s.hard_negatives,
        "index_s": round(t_index, 2),
        "build_s": round(s.seconds, 2),
        "captions_per_s": round(len(index) * epochs / total),
        "batch_rows_per_s": round(s.batches / s.seconds),
        "rss_start_mib": round(base),
        "rss_after_index_mib": round(after_index),
        "peak_rss_index_build_mib": round(index_peak),
        "peak_rss_writing_mib": round(write_peak) if write_peak == write_peak else None,
        "writing_over_index_mib": round(write_peak - after_index) if write_peak == write_peak else None,
        "peak_rss_mib": round(peak),
        "shards": len(s.shards),
        "rows_per_shard": rows_per_shard,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="Comma-separated numbers of synthetic captions.")
    ap.add_argument("--preset", default="sd1.5", help="sd3, sdxl or sd1.5.")
    ap.add_argument("--epochs", type=int, default=1, help="Passes over the captions.")
    ap.add_argument("--rows-per-shard", type=int, default=1024, help="Batch rows per shard.")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.preset, args.epochs, args.rows_per_shard)
        return
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-batches-") as tmp:
            t0 = time.perf_counter()
            write_stores(Path(tmp), n)
            print(f"# {n} synthetic captions written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            cmd = [sys.executable, __file__, "--child", tmp, "--preset", args.preset, "--epochs", str(args.epochs), "--rows-per-shard", str(args.rows_per_shard)]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
