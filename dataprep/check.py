"""`dataprep check`: run the rule checker over pairs from a file.

Reads (source, target) pairs from JSONL, JSON (a list of objects, e.g.
SoftREPA's ``prompts_editing.json``), Parquet, or an edits store folder
(``OUT/edits``), and returns one report row per input row, in input order,
carrying every input column through and adding the verdict columns
(:data:`VERDICT_COLUMNS`; an input column of the same name is replaced, so an
edits store can be re-checked with a newer checker). A row without usable text
gets ``error`` set and ``passed`` false; the run goes on.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dataprep.errors import ConfigError, Reason, failure, reason_of
from dataprep.rules import RULES, check
from dataprep.store import atomic_file, write_table_atomic

# Column pairs recognised without flags, in order of preference.
KNOWN_COLUMNS = (("source", "target"), ("prompt", "tgt_prompt"))
VERDICT_COLUMNS = ("passed", "violations", "source_span", "target_span", "source_spans", "target_spans", "error")


# ------------------------------------------------------------ reading


def read_records(path: Path | str, flag: str = "FILE") -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / Parquet file, or of a folder of Parquet shards.

    A JSONL line that is not a JSON object becomes ``{"error": ...}`` in its
    place (row order is kept); an unreadable, unknown or empty file (no rows)
    raises ConfigError naming ``flag``.
    """
    p = Path(path)
    if p.is_dir():
        shards = sorted(q for q in p.glob("*.parquet") if not q.name.startswith("."))
        if not shards:
            raise ConfigError(f"no Parquet files in folder {p}", flag, "pass a JSONL/JSON/Parquet file or a stage folder such as OUT/edits")
        import pyarrow.parquet as pq

        return [row for q in shards for row in pq.read_table(q).to_pylist()]
    if not p.is_file():
        raise ConfigError(f"file not found: {p}", flag, "pass an existing JSONL, JSON or Parquet file")
    rows = _read_file(p, flag)
    if not rows:
        raise ConfigError(f"{p} is empty: it holds no rows", flag, "pass a file with at least one row")
    return rows


def _read_file(p: Path, flag: str) -> list[dict[str, Any]]:
    suffix = p.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json"):
        raise ConfigError(f"unknown file type {p.suffix!r}: {p}", flag, "use .jsonl, .json or .parquet")
    if p.stat().st_size == 0:
        return []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ConfigError(f"cannot read Parquet file {p}: {exc}", flag, "check the file") from None
    if suffix == ".jsonl":
        rows: list[dict[str, Any]] = []
        for n, line in enumerate(_read_utf8(p, flag).splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append({"error": failure(Reason.BAD_JSON, f"line {n}: {exc.msg}")})
                continue
            rows.append(obj if isinstance(obj, dict) else {"error": failure(Reason.BAD_JSON, f"line {n} is not an object")})
        return rows
    if suffix == ".json":
        text = _read_utf8(p, flag)
        if not text.strip():
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p} is not valid JSON ({exc})", flag, "fix the file, or use JSONL (one object per line)") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise ConfigError(f"{p} holds a JSON {type(data).__name__}, not a list of objects", flag, "write a list of {source, target} objects")
        return [d if isinstance(d, dict) else {"error": failure(Reason.BAD_JSON, f"item {i} is not an object")} for i, d in enumerate(data)]
    raise ConfigError(f"unknown file type {p.suffix!r}: {p}", flag, "use .jsonl, .json or .parquet")


def _read_utf8(p: Path, flag: str) -> str:
    """The file's text; ConfigError (exit 2, before any model loads) when it is not UTF-8."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{p} is not UTF-8 text (byte {exc.start}, line {line}: {exc.reason})",
            flag,
            f"convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}",
        ) from None


def pick_columns(rows: list[dict[str, Any]], source_column: str | None = None, target_column: str | None = None) -> tuple[str, str]:
    """The (source, target) column names: given ones, else source/target, else prompt/tgt_prompt."""
    seen: set[str] = set()
    for r in rows:
        seen.update(r)
    if source_column or target_column:
        src = source_column or "source"
        tgt = target_column or "target"
        for col, flag in ((src, "--source-column"), (tgt, "--target-column")):
            if rows and col not in seen:
                raise ConfigError(f"column {col!r} not in the input (columns: {', '.join(sorted(seen))})", flag, "name an existing column")
        return src, tgt
    for src, tgt in KNOWN_COLUMNS:
        if src in seen and tgt in seen:
            return src, tgt
    if not rows:
        return KNOWN_COLUMNS[0]
    raise ConfigError(
        f"no source/target columns found (columns: {', '.join(sorted(seen))})",
        "--source-column/--target-column",
        "name the columns, e.g. --source-column caption --target-column edit",
    )


# ------------------------------------------------------------ checking


def check_row(row: dict[str, Any], source_column: str, target_column: str) -> dict[str, Any]:
    """``row`` with the verdict columns added (input columns carried through)."""
    out = {k: v for k, v in row.items() if k not in VERDICT_COLUMNS}
    source, target = row.get(source_column), row.get(target_column)
    error = row.get("error") if set(row) == {"error"} else None  # a bad input line
    if error is None:
        if not isinstance(source, str):
            error = failure(Reason.MISSING_SOURCE, f"column {source_column!r} is {'absent' if source is None else type(source).__name__}")
        elif not isinstance(target, str):
            error = failure(Reason.MISSING_TARGET, f"column {target_column!r} is {'absent' if target is None else type(target).__name__}")
    if error is not None:
        return out | {"passed": False, "violations": [], "source_span": None, "target_span": None, "source_spans": [], "target_spans": [], "error": error}
    v = check(source, target)
    return out | {
        "passed": v.passed,
        "violations": list(v.violations),
        "source_span": v.source_span,
        "target_span": v.target_span,
        "source_spans": [list(s) for s in v.source_spans],
        "target_spans": [list(s) for s in v.target_spans],
        "error": None,
    }


@dataclass
class CheckSummary:
    total: int = 0
    passed: int = 0
    errors: Counter = field(default_factory=Counter)  # reason -> rows that could not be checked
    by_rule: Counter = field(default_factory=Counter)  # rule id -> rows violating it

    @property
    def checked(self) -> int:
        return self.total - sum(self.errors.values())

    @property
    def pass_rate(self) -> float:
        return self.passed / self.checked if self.checked else 0.0

    def add(self, report_row: dict[str, Any]) -> None:
        self.total += 1
        if report_row["error"] is not None:
            self.errors[reason_of(report_row["error"])] += 1
            return
        self.passed += bool(report_row["passed"])
        self.by_rule.update(report_row["violations"])


def check_rows(rows: Iterable[dict[str, Any]], source_column: str, target_column: str) -> tuple[list[dict[str, Any]], CheckSummary]:
    """Check every row, in order; returns the report rows and the counts."""
    summary = CheckSummary()
    report = []
    for row in rows:
        r = check_row(row, source_column, target_column)
        summary.add(r)
        report.append(r)
    return report, summary


# ------------------------------------------------------------ writing


def write_report(report: list[dict[str, Any]], out: Path | str) -> Path:
    """Parquet (``.parquet``) or JSONL (``.jsonl``/``.json``) by extension, written atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".json"):
        raise ConfigError(f"unknown report type {out.suffix!r}", "--out", "end the path in .parquet or .jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        write_table_atomic(_report_table(report), out)
        return out
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in report:
            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    return out


def _report_table(report: list[dict[str, Any]]):
    """Carried columns keep their inferred types (JSON text if mixed); verdict columns are typed."""
    import pyarrow as pa

    verdict_types = {
        "passed": pa.bool_(),
        "violations": pa.list_(pa.string()),
        "source_span": pa.string(),
        "target_span": pa.string(),
        "source_spans": pa.list_(pa.list_(pa.int32())),
        "target_spans": pa.list_(pa.list_(pa.int32())),
        "error": pa.string(),
    }
    names: list[str] = []
    for r in report:
        names.extend(k for k in r if k not in names and k not in verdict_types)
    columns: dict[str, Any] = {}
    for name in names:
        values = [r.get(name) for r in report]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # mixed types: a string column with the odd values as JSON text. A
            # string stays itself (JSON-quoting it would shift every span offset)
            columns[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values], pa.string())
    for name, typ in verdict_types.items():
        columns[name] = pa.array([r[name] for r in report], typ)
    return pa.table(columns)


def print_check_summary(summary: CheckSummary, console=None, title: str = "check: single-concept rules") -> None:
    """Counts per rule (every rule, zeros included) and the pass rate, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title, header_style="bold")
    t.add_column("rule", no_wrap=True, min_width=max(map(len, RULES)))
    t.add_column("pairs", justify="right", no_wrap=True, min_width=5)
    t.add_column("share", justify="right", no_wrap=True, min_width=6)
    t.add_column("reason")
    n = summary.checked
    for rule, reason in RULES.items():
        k = summary.by_rule.get(rule, 0)
        t.add_row(rule, str(k), f"{k / n:.1%}" if n else "-", reason)
    console.print(t)
    console.print(f"[bold]passed:[/] {summary.passed} of {n} ({summary.pass_rate:.1%})", highlight=False)
    for reason, k in sorted(summary.errors.items()):
        console.print(f"[yellow]not checked:[/] {k} rows ({reason})", highlight=False)


def print_failures(report: list[dict[str, Any]], limit: int = 10, console=None, id_column: str | None = None) -> None:
    """The first ``limit`` rows that failed: row number (or id), rules, replaced spans."""
    from rich.console import Console

    console = console or Console()
    shown = 0
    for i, r in enumerate(report):
        if r["passed"] or shown >= limit:
            continue
        shown += 1
        name = str(r.get(id_column)) if id_column and r.get(id_column) is not None else f"row {i}"
        what = r["error"] or ", ".join(r["violations"])
        span = f"  ({r['source_span']!r} -> {r['target_span']!r})" if r.get("source_span") else ""
        console.print(f"[red]x[/] {name}: {what}{span}", highlight=False)
    hidden = sum(not r["passed"] for r in report) - shown
    if hidden > 0:
        console.print(f"  ... and {hidden} more failing rows (see --out)", highlight=False)
