"""``dataprep batches``, ``dedup``, ``export``, ``stats`` and ``report``: what is built from the stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.cli.common import app, progress
from dataprep.errors import ConfigError, print_error
from dataprep.runtime import Flags, config_command


def _image_flags(value: str) -> tuple[str, ...]:
    from dataprep.imagecheck import parse_flags

    return tuple(sorted(parse_flags(value)))


@config_command(app, "batches", options=Flags("dataprep.batches:BatchOptions", parse={"drop_image_flags": (Optional[str], _image_flags)}))
def batches_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the batch shards, e.g. OUT/batches (part-<run>-<n>.parquet + _run-<run>.json + the manifest).")],
    captions: Annotated[Optional[Path], typer.Option("--captions", help="Caption store of a `dataprep caption` run (OUT/captions); the newest good caption per image is used.", rich_help_panel="Input")] = None,
    edits: Annotated[Optional[Path], typer.Option("--edits", help="Edit store of a `dataprep rewrite` run (OUT/edits): passing edits become hard negatives.", rich_help_panel="Input")] = None,
    coco_captions: Annotated[Optional[Path], typer.Option("--coco-captions", help="COCO captions_train2017.json instead of --captions: five captions per image, one positive per epoch (rotating).", rich_help_panel="Input")] = None,
    coco_images: Annotated[Optional[Path], typer.Option("--coco-images", help="COCO image folder (train2017/) for --coco-captions.", rich_help_panel="Input")] = None,
    judge: Annotated[Optional[Path], typer.Option("--judge", help="Judge store for --require-judge (default: judge/ beside --edits).", rich_help_panel="Quality")] = None,
    dedup_dir: Annotated[Optional[Path], typer.Option("--dedup-dir", help="Dedup records (default: dedup/ beside --captions; with --coco-captions, beside --out).", rich_help_panel="Quality")] = None,
    options=None,
) -> None:
    """Build contrastive image x prompt batches (positives, hard negatives from passing edits, negatives) as Parquet shards."""
    from rich.console import Console

    from dataprep.batches import build_batches, build_coco_batches, print_batch_summary

    console = Console()
    if (captions is None) == (coco_captions is None):
        raise ConfigError("pass exactly one caption source", "--captions / --coco-captions", "give --captions OUT/captions, or --coco-captions FILE with --coco-images DIR")
    if coco_captions is not None and coco_images is None:
        raise ConfigError("--coco-captions needs the image folder", "--coco-images", "pass the train2017/ folder")
    for flag, given in (("--dedup-dir", dedup_dir), ("--judge", judge)):
        if given is not None and not given.is_dir():  # named explicitly: silently ignoring it would hide a typo
            raise ConfigError(f"{given} is not a folder", flag, "pass the folder that `dataprep dedup` / `dataprep judge` wrote (RUN/dedup, RUN/judge), or leave it out")
    bar, update = progress("batches")
    with bar:
        if captions is not None:
            s = build_batches(captions, out, options, edits_dir=edits, progress=update, judge_dir=judge, dedup_dir=dedup_dir)
        else:
            s = build_coco_batches(coco_captions, coco_images, out, options, edits_dir=edits, progress=update, judge_dir=judge, dedup_dir=dedup_dir)
    print_batch_summary(s, console)


@config_command(app, "dedup", options=Flags("dataprep.dedup:DedupOptions"))
def dedup_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory: reads RUN/captions (images and captions), writes RUN/dedup/.")],
    captions: Annotated[Optional[Path], typer.Option("--captions", help="Caption store (default: RUN/captions).")] = None,
    coco_captions: Annotated[Optional[Path], typer.Option("--coco-captions", help="COCO captions_train2017.json instead of a caption store (every caption of an image is an item).")] = None,
    coco_images: Annotated[Optional[Path], typer.Option("--coco-images", help="COCO image folder (train2017/) for --coco-captions.")] = None,
    options=None,
) -> None:
    """Find duplicate images and near-duplicate captions; record clusters that `batches` keeps apart (or thins with --dedup keep-one)."""
    from rich.console import Console
    from rich.table import Table

    from dataprep.dedup import run_dedup

    bar, update = progress("dedup")
    with bar:
        s = run_dedup(run_dir, options, captions_dir=captions, coco_captions=coco_captions, coco_images=coco_images, progress=lambda what, done, total: update(done, total))
    t = Table(title=f"dedup: {s.run_id}", header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    for k, v in s.counts().items():
        t.add_row(k.replace("_", " "), str(v))
    for reason, k in s.image_errors.items():
        t.add_row(f"  image error: {reason}", str(k))
    t.add_row("wall time", f"{s.seconds:.2f} s")
    t.add_row("records", str(s.out_dir))
    Console().print(t)


export_app = typer.Typer(help="Export a run's caption/edit pairs: SoftREPA prompts_editing.json, PIE-Bench mapping_file.json, or a Hugging Face dataset. Only passing edits unless --include-failed.", no_args_is_help=True)
app.add_typer(export_app, name="export")

ExportOutArg = Annotated[Path, typer.Argument(help="Folder to write the export into (created).")]
ExportRunOpt = Annotated[Path, typer.Option("--run", help="Run directory holding edits/ (and captions/ for image paths), i.e. the OUT of `dataprep rewrite`.")]
IncludeFailedOpt = Annotated[bool, typer.Option("--include-failed", help="Also export edits that failed the rule checker (an image's passing edit still wins).")]
LinkOpt = Annotated[bool, typer.Option("--link", help="Symlink local image files instead of copying them (zip members are always copied).")]


def _export(name: str, out: Path, run: Path, **kw):
    """Run dataprep.export.export_<name> with a progress bar and print its one-line summary."""
    from rich.console import Console

    from dataprep import export

    bar, update = progress("images")
    with bar:
        s = getattr(export, f"export_{name}")(run, out, progress=update, **kw)
    skipped = ", ".join(f"{k} {v}" for k, v in s.skipped.items()) or "none"
    Console().print(f"export {s.kind}: {s.pairs} pairs -> {s.out}  (skipped: {skipped})", highlight=False)
    return s


@config_command(export_app, "softrepa")
def export_softrepa_cmd(out: ExportOutArg, run: ExportRunOpt, include_failed: IncludeFailedOpt = False, link: LinkOpt = False) -> None:
    """Write OUT/prompts_editing.json (prompt, img_path, tgt_prompt: the official SoftREPA editing format) with the images beside it."""
    _export("softrepa", out, run, include_failed=include_failed, link=link)


@config_command(export_app, "piebench")
def export_piebench_cmd(out: ExportOutArg, run: ExportRunOpt, include_failed: IncludeFailedOpt = False, link: LinkOpt = False) -> None:
    """Write a PIE-Bench style OUT/mapping_file.json (changed spans in [ ], from the rule checker) and OUT/annotation_images/."""
    _export("piebench", out, run, include_failed=include_failed, link=link)


@config_command(export_app, "hf")
def export_hf_cmd(
    out: ExportOutArg,
    run: ExportRunOpt,
    include_failed: IncludeFailedOpt = False,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Also push to this hub dataset repo (user/name); needs a token with write access (huggingface-cli login).")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the hub repo private.")] = False,
    license: Annotated[str, typer.Option("--license", help="license field of the dataset card (a hub license id, e.g. cc-by-4.0; default other: the images keep their source's license).")] = "other",
) -> None:
    """Save a `datasets` dataset (image, pair, provenance columns) with save_to_disk and a dataset card README.md; optionally push it.

    A failed push prints why in one line and exits 1; the local export is kept and listed in RUN/exports.json.
    """
    s = _export("hf", out, run, include_failed=include_failed, push_to_hub=push_to_hub, private=private, license=license)
    if s.push is not None:
        if s.push["ok"]:
            print(f"pushed to {s.push['url']}{' (private)' if private else ''}")
        else:
            print_error(f"push to {s.push['repo']} failed: {s.push['error']} (the local export is kept at {s.out} and listed in {run / 'exports.json'})")
            raise typer.Exit(1)


@config_command(app, "stats")
def stats_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (OUT of the stages: captions/, edits/, batches/, exports.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON instead of a table.")] = False,
) -> None:
    """One table of what a run directory holds: captions, edits (pass rate, violations by rule), batches, exports."""
    from rich.console import Console

    from dataprep import stats

    # inside: check_run_shards is loaded with pyarrow (dataprep.store's lazy attributes); --help must not pay for it
    from dataprep.store import check_run_shards

    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}", "RUN_DIR", "pass the --out folder of a run")
    check_run_shards(run_dir, "RUN_DIR")
    s = stats.collect(run_dir)
    if as_json:
        print(json.dumps(s, indent=2, default=str))
    else:
        Console().print(stats.render(s))


@config_command(app, "report", options=Flags("dataprep.report:ReportOptions"))
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (OUT of the stages: captions/, edits/, optionally judge/ and dedup/).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default RUN_DIR/report): index.html, assets/, data/, thumbs/. Opens from disk, no server.")] = None,
    options=None,
) -> None:
    """Write a static HTML report of a run: a card per image (thumbnail, caption, target with the changed spans
    highlighted, verdict, violations, provenance), filters by rule / verdict / judge / duplicates, text search."""
    from rich.console import Console

    from dataprep.report import build_report

    folder = out or run_dir / "report"
    if folder.exists() and not folder.is_dir():  # else a FileExistsError deep in the writer, exit 1
        raise ConfigError(f"{folder} is a file, not a folder", "--out", "pass a folder (created if missing), or leave --out out for RUN_DIR/report")
    bar, update = progress("thumbnails")
    with bar:
        s = build_report(run_dir, folder, options, progress=update)
    errs = f", {s.thumb_errors} without thumbnail" if s.thumb_errors else ""
    Console().print(f"report: {s.cards} images in {s.chunks} data chunks, {s.thumbs} thumbnails{errs}\n  open {s.index.resolve().as_uri()}", highlight=False, soft_wrap=True)
