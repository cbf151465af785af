"""The evaluator's tables: per-image score rows (:data:`SCORES_SCHEMA`) -> the summary in the paper's layout.

Pure: :func:`summarize` averages the score rows per setting,
:func:`table_markdown` and :func:`write_csv` print the Tables 5/6 layout.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence


from dataprep.store import SCORES_SCHEMA  # noqa: F401  (the scores table's one schema; re-exported for the evaluator)
from softrepa.metrics import LOWER_IS_BETTER, TABLE_ORDER
from softrepa.paper import LABELS as METRIC_LABELS

METHOD_LABELS = {"flowedit": "FlowEdit", "flowedit+tokens": "FlowEdit + soft tokens"}


def summarize(rows: Sequence[dict[str, Any]], settings: Sequence[Any], fid: dict[str, float | None], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image score rows -> one summary row per setting (means over scored pairs).

    A metric with no value for a setting (not requested, unavailable, every
    row failed) is None there.
    """
    table = []
    for s in settings:
        mine = [r for r in rows if r["setting"] == s.setting_id]
        row: dict[str, Any] = {"method": METHOD_LABELS[s.method], "method_id": s.method, "n_max": s.n_max, "tgt_cfg": s.tgt_cfg,
                               "pairs": sum(1 for r in mine if r["error"] is None), "failed": sum(1 for r in mine if r["error"] is not None)}
        for m in TABLE_ORDER:
            if m == "fid":
                row[m] = fid.get(s.setting_id) if m in metrics else None
                continue
            vals = [r[m] for r in mine if r.get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals else None
        table.append(row)
    return table


def table_markdown(table: Sequence[dict[str, Any]], unavailable: dict[str, str], notes: Sequence[str] = ()) -> str:
    """The summary in the paper's Tables 5/6 layout, plus a line per missing metric."""
    arrows = {m: ("↓" if m in LOWER_IS_BETTER else "↑") for m in TABLE_ORDER}
    head = ["Model", "NMAX", "target CFG", "pairs"] + [f"{METRIC_LABELS[m]}{arrows[m]}" for m in TABLE_ORDER]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["method"], str(r["n_max"]), f"{r['tgt_cfg']:g}", f"{r['pairs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")]
        cells += ["n/a" if r[m] is None else f"{r[m]:.3f}" for m in TABLE_ORDER]
        lines.append("| " + " | ".join(cells) + " |")
    bullets = [f"- {METRIC_LABELS.get(m, m)}: {why}" for m, why in unavailable.items()] + [f"- {n}" for n in notes]
    if bullets:
        lines += [""] + bullets
    return "\n".join(lines) + "\n"


def write_csv(table: Sequence[dict[str, Any]], path: Path) -> None:
    cols = ["method", "n_max", "tgt_cfg", "pairs", "failed", *TABLE_ORDER]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in table:
            w.writerow({c: ("" if r.get(c) is None else r[c]) for c in cols})
