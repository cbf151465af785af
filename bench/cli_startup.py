"""Start-up time of the command lines: ``dataprep --help`` and ``softrepa --help``.

    python bench/cli_startup.py            # 7 runs each, median and min, seconds
    python bench/cli_startup.py --runs 15

Each run is a fresh interpreter (``python -m dataprep --help``), so the figure
is what a user waits for. Alongside the time it prints how many modules the
``--help`` path imported and whether any heavy package (torch, transformers,
diffusers, prefect, ray, vllm, datasets) was among them: the CLIs keep those
inside the commands, and a refactor that hoists one to module level shows up
here as a jump of ~1-3 s. Prints one JSON line per command. Never part of CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "diffusers", "prefect", "ray", "vllm", "datasets", "accelerate")

PROBE = """
import sys, runpy
sys.argv = [{prog!r}, "--help"]
try:
    runpy.run_module({prog!r}, run_name="__main__")
except SystemExit:
    pass
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("@@", len(sys.modules), ",".join(heavy), file=sys.stderr)
"""


def measure(prog: str, runs: int) -> dict:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", prog, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    probe = subprocess.run([sys.executable, "-c", PROBE.format(prog=prog, heavy=HEAVY)], capture_output=True, text=True)
    line = next((ln for ln in probe.stderr.splitlines() if ln.startswith("@@")), "@@ -1 ")
    _, n_modules, *heavy = line.split(" ")
    return {
        "command": f"{prog} --help",
        "runs": runs,
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "modules_imported": int(n_modules),
        "heavy_imported": [h for h in ",".join(heavy).split(",") if h],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    for prog in ("dataprep", "softrepa"):
        print(json.dumps(measure(prog, args.runs)))


if __name__ == "__main__":
    main()
