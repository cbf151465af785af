"""Where the things to look at of a run are: its HTML report, editing grids and training curves.

Found without a registry beyond ``RUN/reports.json`` (written by
``dataprep report``): grids are ``<eval out>/grids/index.html`` (written by
``softrepa evaluate-edit``), curves are ``<train out>/curves.png`` (written
by ``softrepa train``); both are looked for in the run directory and one or
two folders below it, which covers the flows' defaults (``RUN/eval/<name>``,
``RUN/train/<name>``) and the demo's (``RUN/eval-edit``, ``RUN/train-sd3``).
Cheap: a few globs, no Parquet is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORTS_INDEX = "reports.json"


def _below(run: Path, tail: str) -> list[Path]:
    found = {p.resolve() for pattern in (tail, f"*/{tail}", f"*/*/{tail}") for p in run.glob(pattern)}
    return sorted(found)


def find_views(run: Path | str) -> dict[str, list[dict[str, Any]]]:
    """``{"report": [...], "grids": [...], "curves": [...]}``; each entry has ``path`` and ``exists``
    (a registered report may have been deleted since), reports also ``cards`` and ``created_at``."""
    run = Path(run)
    reports: list[dict[str, Any]] = []
    try:
        index = run / REPORTS_INDEX
        reports = json.loads(index.read_text()).get("reports", []) if index.exists() else []
    except (OSError, ValueError):
        reports = []
    listed = {r.get("path") for r in reports}
    default = (run / "report" / "index.html").resolve()
    if default.exists() and str(default) not in listed:
        reports.append({"path": str(default)})
    return {
        "report": [dict(r, exists=Path(r.get("path", "")).exists()) for r in reports],
        "grids": [{"path": str(p), "exists": True} for p in _below(run, "grids/index.html")],
        "curves": [{"path": str(p), "exists": True} for p in _below(run, "curves.png")],
    }
