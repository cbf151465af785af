"""``dataprep check``, ``dataprep rewrite`` and ``dataprep judge``: the edit pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.cli.common import EXECUTOR, JUDGE_MODEL, REWRITE_MODEL, StrictOpt, app, engine_flags, positive_limit, print_stage
from dataprep.errors import ConfigError
from dataprep.runtime import Flags, config_command


@config_command(app, "check")
def check_cmd(
    path: Annotated[Path, typer.Argument(help="Pairs to check: JSONL, JSON (a list of objects, e.g. SoftREPA's prompts_editing.json), Parquet, or an edits folder (OUT/edits).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the per-row report here: .parquet or .jsonl (input columns carried through, in input order).")] = None,
    source_column: Annotated[Optional[str], typer.Option("--source-column", help="Source text column (default: source, else SoftREPA's prompt).")] = None,
    target_column: Annotated[Optional[str], typer.Option("--target-column", help="Target text column (default: target, else SoftREPA's tgt_prompt).")] = None,
    show: Annotated[int, typer.Option("--show", help="Print the first N failing rows (row number or --id-column, rules, replaced span).")] = 10,
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column naming each row in the failures printed (default: image_id or id if present).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any pair fails the rules or cannot be checked.")] = False,
) -> None:
    """Check (source, target) pairs against the single-concept rules of prompts/edit.txt; print counts per rule and the pass rate."""
    from rich.console import Console

    from dataprep.check import check_rows, pick_columns, print_check_summary, print_failures, read_records, write_report

    if out is not None and out.suffix.lower() not in (".parquet", ".jsonl", ".json"):
        raise ConfigError(f"unknown report type {out.suffix!r}", "--out", "end the path in .parquet or .jsonl")
    from dataprep import diversity  # inside: it loads pyarrow (through dataprep.store), which --help must not pay for

    rows = read_records(path)
    src, tgt = pick_columns(rows, source_column, target_column)
    report, summary = check_rows(rows, src, tgt)
    if out is not None:
        write_report(report, out)
    console = Console()
    print_check_summary(summary, console, title=f"check: {path} ({src} -> {tgt})")
    div = diversity.from_rows(report).summary()
    if div["replacements"]:
        console.print(diversity.render(div))
    if show > 0:
        id_col = id_column or next((c for c in ("image_id", "id", "img_path") if any(c in r for r in rows)), None)
        print_failures(report, show, console, id_col)
    if out is not None:
        console.print(f"report: {out}", highlight=False, markup=False)
    if strict and summary.passed < summary.total:
        raise typer.Exit(1)


@config_command(app, "rewrite", engine=engine_flags(REWRITE_MODEL, "Instruction model: hub id or local directory."), options=Flags("dataprep.rewrite:RewriteOptions"), executor=EXECUTOR)
def rewrite_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory; edits go to OUT/edits/ as Parquet shards + manifest.")] = Path("runs/div2k"),
    captions: Annotated[Optional[Path], typer.Option("--captions", help="Caption store to rewrite (default: OUT/captions).", rich_help_panel="Input")] = None,
    input_file: Annotated[Optional[Path], typer.Option("--input", help="Rewrite the texts of a JSONL, JSON or Parquet file instead of a caption store.", rich_help_panel="Input")] = None,
    text_column: Annotated[str, typer.Option("--text-column", help="With --input: the column holding the captions.", rich_help_panel="Input")] = "caption",
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="With --input: the column with a stable id (default: image_id or id, else the row number).", rich_help_panel="Input")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Rewrite at most N captions.", rich_help_panel="Input")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any row failed or any kept rewrite breaks the rules (default: record and exit 0).", rich_help_panel="Run")] = False,
    engine=None,
    options=None,
    executor=None,
) -> None:
    """Rewrite captions into single-concept edits with Llama-3.1-8B-Instruct and prompts/edit.txt; every output is rule-checked and retried."""
    from dataprep.rewrite import KEPT_FAILING, inputs_from_captions, inputs_from_file, run_rewrite

    if captions is not None and input_file is not None:
        raise ConfigError("--captions and --input both given", "--input", "pass one of them")
    positive_limit(limit)
    if input_file is not None:
        texts = inputs_from_file(input_file, text_column, id_column)
    else:
        texts = inputs_from_captions(captions if captions is not None else out / "captions")
    summary = run_rewrite(texts[:limit] if limit else texts, out, engine, options, executor=executor)
    print_stage(summary, strict and bool(summary.n_failed or summary.extra.get(KEPT_FAILING, 0)))


@config_command(app, "judge", engine=engine_flags(JUDGE_MODEL, "Instruction model: hub id or local directory (a larger judge than the rewriter grades better)."), options=Flags("dataprep.judge:JudgeOptions"))
def judge_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory: reads OUT/edits, writes OUT/judge/ (Parquet shards + manifest).")] = Path("runs/div2k"),
    edits: Annotated[Optional[Path], typer.Option("--edits", help="Edit store to grade (default: OUT/edits).", rich_help_panel="Input")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Grade at most N pairs.", rich_help_panel="Input")] = None,
    strict: StrictOpt = False,
    engine=None,
    options=None,
) -> None:
    """Grade passing edit pairs on rules 1, 2 and 7 of prompts/edit.txt with an instruction model (JSON verdicts with reasons)."""
    from dataprep.judge import inputs_from_edits, run_judge

    positive_limit(limit)
    items, left = inputs_from_edits(edits if edits is not None else out / "edits", options.all_edits)
    summary = run_judge(items[:limit] if limit else items, out, engine, options, left_out=left)
    print_stage(summary, strict and bool(summary.n_failed))
