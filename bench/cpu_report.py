"""`dataprep report` cost: build time and page weight for a COCO-size run, thumbnails for DIV2K-size images.

Prints one JSON object:
- ``rows``: N caption + edit rows (generated, all sharing one image): seconds to
  build, rows/s, total data MB, largest chunk KB, index.html + meta.js KB (what
  the first page loads besides one chunk);
- ``thumbs``: thumbnails/s for 2040x1356 PNGs with 0 and 2 worker processes.

    python bench/cpu_report.py [--rows 100000] [--chunk-size 500] [--images 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu_images import make_pngs  # noqa: E402 -- photo-like DIV2K-size PNGs
from dataprep.report import ReportOptions, build_report  # noqa: E402
from dataprep.report.thumbs import make_thumbs  # noqa: E402
from tests.report_factory import make_big_run  # noqa: E402 -- the generator the 100k-row page test uses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--chunk-size", type=int, default=500)
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = make_big_run(tmp / "run", args.rows)
        t = time.perf_counter()
        s = build_report(run, tmp / "report", ReportOptions(chunk_size=args.chunk_size))
        dt = time.perf_counter() - t
        chunks = sorted((tmp / "report" / "data").glob("chunk-*.js"))
        out["rows"] = {
            "rows": args.rows, "seconds": round(dt, 2), "rows_per_s": round(args.rows / dt), "chunks": s.chunks,
            "data_mb": round(sum(p.stat().st_size for p in chunks) / 1e6, 1), "largest_chunk_kb": round(max(p.stat().st_size for p in chunks) / 1e3),
            "first_page_kb": round(sum(p.stat().st_size for p in (tmp / "report" / "index.html", tmp / "report" / "data" / "meta.js", chunks[0])) / 1e3),
        }
        pngs = make_pngs(tmp, args.images)
        out["thumbs"] = {"images": args.images, "size": "2040x1356"}
        for workers in (0, 2):
            folder = tmp / f"thumbs-{workers}"
            t = time.perf_counter()
            made = make_thumbs([str(p) for p in pngs], folder, 256, workers=workers)
            dt = time.perf_counter() - t
            assert all(isinstance(v, tuple) for v in made.values())
            out["thumbs"][f"per_s_workers_{workers}"] = round(args.images / dt, 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
