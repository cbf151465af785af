"""What a run directory holds: ``dataprep stats RUN_DIR``.

A run directory is the ``OUT`` of the stages: ``images/``, ``captions/``,
``edits/``, ``batches/`` (Parquet shards, any may be missing) and
``exports.json`` (written by ``dataprep export``). :func:`collect` reads only
the columns it counts, shard by shard, and returns plain dicts;
:func:`render` turns them into one rich table.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataprep import diversity
from dataprep.diversity import table_rows
from dataprep.judge import agreement
from dataprep.report.views import find_views
from dataprep.store import caption_skips, edit_skip, failure_counts, read_manifest, shard_paths


def _columns(folder: Path, columns: list[str]) -> pa.Table | None:
    """The given columns of every shard (only those a shard has), or None."""
    tables = []
    for p in shard_paths(folder):
        have = set(pq.read_schema(p).names)
        tables.append(pq.read_table(p, columns=[c for c in columns if c in have]))
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _captions(run: Path) -> dict[str, Any] | None:
    t = _columns(run / "captions", ["image_id", "caption", "error", "image_flags"])
    if t is None:
        return None
    good = pc.is_null(t["error"])
    usable = pc.is_null(caption_skips(t))  # captioned = a caption batches would use (dataprep.store.usable)
    flags: Counter = Counter()
    if "image_flags" in t.column_names:
        for names in t["image_flags"].drop_null().to_pylist():
            flags.update(names)
    ids_all = pc.unique(t["image_id"])
    ids_good = pc.unique(t.filter(usable)["image_id"])
    return {
        "rows": t.num_rows,
        "good": pc.sum(good).as_py() or 0,
        "failed": t.num_rows - (pc.sum(good).as_py() or 0),
        "images": len(ids_all),
        "images_captioned": len(ids_good),
        "images_without_caption": len(ids_all) - len(ids_good),
        "failures": failure_counts(run / "captions"),
        **({"image_flags": dict(sorted(flags.items()))} if flags else {}),  # rows per image check (dataprep.imagecheck)
    }


def _edits(run: Path) -> dict[str, Any] | None:
    t = _columns(run / "edits", ["image_id", "source", "target", "passed", "violations", "error"])
    if t is None:
        return None
    checked = t.filter(pc.is_null(t["error"]))
    passed = checked.filter(pc.fill_null(checked["passed"], False))
    # the edits batches and exports would use: dataprep.store.edit_skip decides
    usable = [edit_skip(r) is None for r in checked.select(["source", "target", "passed", "error"]).to_pylist()]
    usable_ids = checked.filter(pa.array(usable, pa.bool_()))["image_id"]
    violations: Counter = Counter()
    if checked.num_rows:
        flat = pc.list_flatten(checked["violations"])
        violations.update({d["values"]: d["counts"] for d in pc.value_counts(flat).to_pylist()} if len(flat) else {})
    return {
        "rows": t.num_rows,
        "errors": t.num_rows - checked.num_rows,
        "checked": checked.num_rows,
        "passed": passed.num_rows,
        "pass_rate": (passed.num_rows / checked.num_rows) if checked.num_rows else None,
        "images_with_passing_edit": len(pc.unique(usable_ids)),
        "violations": dict(violations.most_common()),
        "failures": failure_counts(run / "edits"),
    }


def _batches(run: Path) -> dict[str, Any] | None:
    t = _columns(run / "batches", ["batch_id", "preset", "epoch", "prompt_kinds"])
    if t is None:
        return None
    kinds = {d["values"]: d["counts"] for d in pc.value_counts(pc.list_flatten(t["prompt_kinds"])).to_pylist()} if t.num_rows else {}
    runs: dict[str, dict[str, Any]] = {}
    for p in sorted((run / "batches").glob("_run-*.json")):
        try:
            r = json.loads(p.read_text())
            runs[r["run_id"]] = {"preset": r.get("preset"), "epochs": r.get("options", {}).get("epochs"), "seed": r.get("options", {}).get("seed"), "batches": r.get("counts", {}).get("batches")}
        except (OSError, ValueError, KeyError):
            continue
    return {
        "rows": t.num_rows,
        "shards": len(shard_paths(run / "batches")),
        "presets": dict(Counter(t["preset"].to_pylist())),
        "epochs": len(pc.unique(t["epoch"])),
        "prompts": kinds,
        "runs": runs,
    }


def _exports(run: Path) -> list[dict[str, Any]]:
    path = run / "exports.json"
    try:
        entries = json.loads(path.read_text()).get("exports", []) if path.exists() else []
    except (OSError, ValueError):
        return []
    return [dict(e, exists=Path(e.get("path", "")).exists()) for e in entries]


def _judge(run: Path) -> dict[str, Any] | None:
    """Checker x judge agreement (dataprep.judge.agreement), or None without a judge store."""
    return agreement(run / "judge")


def _dedup(run: Path) -> dict[str, Any] | None:
    """The last dedup run's counts (its manifest), or None."""
    m = read_manifest(run / "dedup")
    return None if m is None else {"run_id": m.get("run_id"), "counts": m.get("counts", {}), "failures": m.get("failures", {})}


def collect(run_dir: Path | str) -> dict[str, Any]:
    """Counts per stage of ``run_dir``; a stage that is absent maps to None."""
    run = Path(run_dir)
    return {"run": str(run), "captions": _captions(run), "edits": _edits(run), "diversity": _diversity(run), "batches": _batches(run), "exports": _exports(run), "judge": _judge(run), "dedup": _dedup(run), "views": find_views(run)}


def _diversity(run: Path) -> dict[str, Any] | None:
    """Replacement diversity of the passing edits (see dataprep.diversity), or None without edits."""
    if not shard_paths(run / "edits"):
        return None
    return diversity.from_edits(run / "edits").summary()


def _fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def render(stats: dict[str, Any]) -> Any:
    """One rich Table: section | what | value."""
    from rich.table import Table

    table = Table(title=f"run {stats['run']}", show_lines=False)
    table.add_column("section", style="bold")
    table.add_column("what")
    table.add_column("value")

    def section(name: str, rows: list[tuple[str, Any]]) -> None:
        for i, (what, value) in enumerate(rows):
            table.add_row(name if i == 0 else "", what, str(value))
        table.add_section()

    cap, ed, b = stats["captions"], stats["edits"], stats["batches"]
    if cap:
        section("captions", [("images", cap["images"]), ("rows good / failed", f"{cap['good']} / {cap['failed']}"), ("images captioned", cap["images_captioned"]), ("images without caption", cap["images_without_caption"]), ("failures by reason", _fmt(cap["failures"])), ("image flags (rows)", _fmt(cap.get("image_flags", {})))])
    else:
        section("captions", [("", "none")])
    if ed:
        rate = "-" if ed["pass_rate"] is None else f"{100 * ed['pass_rate']:.1f}%"
        section("edits", [("rows checked / errors", f"{ed['checked']} / {ed['errors']}"), ("passed", f"{ed['passed']} ({rate})"), ("images with a passing edit", ed["images_with_passing_edit"]), *[(f"violation {k}", v) for k, v in ed["violations"].items()], ("failures by reason", _fmt(ed["failures"]))])
    else:
        section("edits", [("", "none")])
    div = stats.get("diversity")
    if div and div["replacements"]:
        section("diversity", [(r["what"], r["value"]) for r in table_rows(div)])
    if b:
        section("batches", [("batches / shards", f"{b['rows']} / {b['shards']}"), ("presets", _fmt(b["presets"])), ("epochs", b["epochs"]), ("prompts by kind", _fmt(b["prompts"])), *[(f"run {k}", f"{v['preset']}, seed {v['seed']}, {v['epochs']} epochs, {v['batches']} batches") for k, v in b["runs"].items()]])
    else:
        section("batches", [("", "none")])
    if stats.get("judge"):
        section("judge", judge_rows(stats["judge"]))
    if stats.get("dedup"):
        c = stats["dedup"]["counts"]
        section("dedup", [
            ("image clusters / images in them", f"{c.get('image_clusters', 0)} / {c.get('images_in_clusters', 0)} (exact copies {c.get('exact_image_duplicates', 0)})"),
            ("caption clusters / captions in them", f"{c.get('caption_clusters', 0)} / {c.get('captions_in_clusters', 0)}"),
            ("removed by --dedup keep-one", f"{c.get('images_removed_by_keep_one', 0)} images, {c.get('captions_removed_by_keep_one', 0)} captions"),
            ("images hashed / errors", f"{c.get('images', 0)} / {c.get('image_errors', 0)}"),
            ("failures by reason", _fmt(stats["dedup"]["failures"])),
        ])
    if stats["exports"]:
        section("exports", [(e["kind"], f"{e['pairs']} pairs -> {e['path']}{'' if e['exists'] else ' (missing)'}") for e in stats["exports"]])
    else:
        section("exports", [("", "none")])
    views = [(kind, f"{v['path']}{'' if v['exists'] else ' (missing)'}") for kind, found in stats.get("views", {}).items() for v in found]
    if views:  # written by dataprep report, softrepa evaluate-edit (grids), softrepa train (curves)
        section("to look at", views)
    return table


def judge_rows(j: dict[str, Any]) -> list[tuple[str, Any]]:
    """The judge section: verdicts among checker-passed pairs, the 2x2 table when failing pairs were graded too."""
    t = j["table"]
    rows: list[tuple[str, Any]] = [("pairs judged / error rows", f"{j['judged']} / {j['errors']}")]
    rows.append(("checker passed: judge good / bad", f"{t['passed']['good']} / {t['passed']['bad']}"))
    if j["graded_failing"]:
        rows.append(("checker failed: judge good / bad", f"{t['failed']['good']} / {t['failed']['bad']}"))
    if j["agreement"] is not None:
        rows.append(("checker and judge agree", f"{100 * j['agreement']:.1f}%"))
    rows += [(f"judge: {r} not ok", n) for r, n in j["rule_failures"].items() if n]
    return rows
