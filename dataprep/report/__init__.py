"""``dataprep report RUN --out DIR``: a static HTML report of a run that opens from disk.

Layout of DIR (no server, no network: every file is local, scripts are plain
``<script src>`` so ``file://`` works without fetch/CORS)::

    index.html            rendered once with Jinja2 (templates/report.html.j2): summary, filters
    assets/report.{js,css}
    data/meta.js          window.__REPORT_META = {summary, chunks, provenance table, rule texts}
    data/chunk-NNNN.js    window.__chunk(N, [card, ...]) with ``chunk_size`` cards each
    thumbs/<hash>.jpg     thumbnails, longest side <= ``thumb_size``

The page shows ``page_size`` cards at a time and loads a chunk only when a
page needs it (a filter or search scans the chunks in order), so a COCO-size
run (100k+ images) opens as fast as a DIV2K one. Cards are described in
:mod:`dataprep.report.cards`.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dataprep.errors import ConfigError
from dataprep.runtime import option
from dataprep.store import atomic_write_text, check_run_shards
from dataprep.report.cards import collect
from dataprep.report.thumbs import make_thumbs
from dataprep.report.views import REPORTS_INDEX  # RUN/reports.json: where reports of this run were written
from dataprep.rules import RULES

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class ReportOptions:
    """Settings of one report; `dataprep report`'s flags are its fields. Invalid values cannot be built."""

    page_size: int = option(48, "Cards per page.")
    chunk_size: int = option(500, "Cards per data file (data/chunk-NNNN.js); the page loads only the chunks it shows.")
    thumb_size: int = option(256, "Longest side of the JPEG thumbnails, in pixels.")
    thumbs: bool = option(True, "Write thumbnails (existing ones are reused).", flag="--thumbs/--no-thumbs")
    workers: int = option(0, "Thumbnail processes (0 = this process).")
    limit: int | None = option(None, "Only the first N images (by id).")
    title: str | None = option(None, "Page title (default: the run folder's name).")
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 1000:
            raise ConfigError(f"page size {self.page_size} out of range", "--page-size", "use 1..1000 cards per page")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk size {self.chunk_size} < 1", "--chunk-size", "use e.g. 500 cards per data file")
        if not 16 <= self.thumb_size <= 1024:
            raise ConfigError(f"thumbnail size {self.thumb_size} out of range", "--thumb-size", "use 16..1024 pixels (default 256)")
        if self.workers < 0:
            raise ConfigError("workers < 0", "--workers", "use 0 (this process) or a number of processes")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit < 1", "--limit", "omit --limit to include every image")


@dataclass
class ReportSummary:
    out: Path
    index: Path
    cards: int
    chunks: int
    thumbs: int
    thumb_errors: int
    summary: dict[str, Any] = field(default_factory=dict)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _js_json(obj: Any) -> str:
    # compact UTF-8 JSON is valid JavaScript (ES2019 allows U+2028/2029 in strings; escape them anyway for older engines)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def environment() -> Any:
    """The Jinja2 environment for the shipped templates (HTML autoescaping on)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PACKAGE_DIR / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


STAGE_DIRS = ("captions", "edits", "judge", "dedup", "batches")


def _within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def build_report(run: Path | str, out: Path | str, options: ReportOptions | None = None, progress: Callable[[int, int], None] | None = None) -> ReportSummary:
    """Write the report of ``run`` into ``out`` (see the module doc) and register it in RUN/reports.json.

    ``progress(done, total)`` follows the thumbnails. Raises ConfigError (naming RUN) when ``run``
    is not a run directory; unreadable images are per-card errors.
    """
    opts = options or ReportOptions()
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise ConfigError(f"run directory not found: {run}", "RUN", "pass the --out folder of a dataprep run (with captions/ and edits/)")
    if not any((run / d).is_dir() for d in ("captions", "edits")):
        raise ConfigError(f"{run} has neither captions/ nor edits/", "RUN", "pass the --out folder of `dataprep caption` / `dataprep rewrite`")
    check_run_shards(run)
    inside = next((d for d in STAGE_DIRS if _within(out, run / d)), None)
    if inside is not None:  # its assets and data files would stop readers of that folder (pd.read_parquet)
        raise ConfigError(f"--out {out} is inside the stage folder {run / inside}", "--out", "write the report beside the stage folders, e.g. RUN/report (the default)")
    data = collect(run, limit=opts.limit)

    n_thumbs = n_thumb_errors = 0
    if opts.thumbs:
        made = make_thumbs((c.get("uri") for c in data.cards), out / "thumbs", opts.thumb_size, opts.workers, opts.max_pixels, progress)
        for c in data.cards:
            res = made.get(c.get("uri"))
            if isinstance(res, tuple):
                c["th"], c["tw"], c["thh"] = f"thumbs/{res[0]}", res[1], res[2]
                n_thumbs += 1
            elif isinstance(res, str):
                c["terr"] = res
                n_thumb_errors += 1

    # data chunks; stale ones of an earlier, larger report are removed
    chunks = []
    for i in range(0, len(data.cards), opts.chunk_size):
        k = len(chunks)
        name = f"data/chunk-{k:04d}.js"
        _write_atomic(out / name, f"window.__chunk({k},{_js_json(data.cards[i:i + opts.chunk_size])});\n")
        chunks.append({"file": name, "start": i, "n": len(data.cards[i:i + opts.chunk_size])})
    current = {Path(c["file"]).name for c in chunks}
    for old in (out / "data").glob("chunk-*.js"):
        if old.name not in current:
            old.unlink()

    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    title = opts.title or f"dataprep report: {run.resolve().name}"
    meta = {
        "title": title,
        "run": str(run.resolve()),
        "generated_at": generated,
        "page_size": opts.page_size,
        "total": len(data.cards),
        "chunks": chunks,
        "provenance": data.provenance,
        "summary": data.summary,
        "rules": RULES,
    }
    _write_atomic(out / "data" / "meta.js", f"window.__REPORT_META={_js_json(meta)};\n")
    for asset in ("report.js", "report.css"):
        (out / "assets").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_DIR / "static" / asset, out / "assets" / asset)
    html = environment().get_template("report.html.j2").render(title=title, run=str(run.resolve()), generated_at=generated, summary=data.summary, rules=RULES, page_size=opts.page_size)
    _write_atomic(out / "index.html", html)
    _register(run, out, len(data.cards), generated)
    return ReportSummary(out, out / "index.html", len(data.cards), len(chunks), n_thumbs, n_thumb_errors, data.summary)


def _register(run: Path, out: Path, cards: int, generated: str) -> None:
    """Record the report in RUN/reports.json (newest entry per folder), for `dataprep stats` and the flows."""
    path = run / REPORTS_INDEX
    try:
        entries = json.loads(path.read_text()).get("reports", []) if path.exists() else []
    except (OSError, ValueError):
        entries = []
    target = str((out / "index.html").resolve())
    entries = [e for e in entries if e.get("path") != target] + [{"path": target, "cards": cards, "created_at": generated}]
    _write_atomic(path, json.dumps({"reports": entries}, indent=2) + "\n")


__all__ = ["ReportOptions", "ReportSummary", "build_report", "environment"]
