"""The I/O shell: batch rows into shards, the completion record, the manifest, the summary.

Batches report like the model stages: the folder's manifest is a
:class:`dataprep.store.Manifest` and the summary prints through
:func:`dataprep.runtime.print_summary` (:meth:`BatchSummary.stage_summary`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from dataprep import clusters
from dataprep.batches.build import BuildCounts, check_fillable, iter_batches, run_id_for, yield_into
from dataprep.batches.index import CaptionIndex, attach_edits, load_caption_index, load_coco_index
from dataprep.batches.options import BatchOptions
from dataprep.errors import ConfigError
from dataprep.judge import require_judged
from dataprep.runtime import StageSummary, print_summary
from dataprep.stage import acquire_stage_lock
from dataprep.store import BATCHES_SCHEMA, Manifest, check_writable, run_record_path, shard_paths, utcnow, write_run_record, write_table_atomic


@dataclass
class BatchSummary:
    run_id: str
    preset: str
    grid: tuple[int, int]
    epochs: int
    images: int  # images in the index
    batches: int
    rows: int
    positives: int
    hard_negatives: int
    negatives: int
    dropped_images: int
    unfillable_batches: int
    duplicate_images: int
    edits_available: int
    edits_unused: int
    skipped: dict[str, int]
    shards: list[Path]
    out_dir: Path
    seconds: float
    other_runs: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The manifest's and the completion record's counts."""
        names = ("images", "batches", "positives", "hard_negatives", "negatives", "dropped_images", "unfillable_batches", "duplicate_images", "edits_available", "edits_unused")
        return {name: getattr(self, name) for name in names}

    def stage_summary(self) -> StageSummary:
        """The run as the model stages report theirs: batches written are ``done``,
        caption and edit rows not used are ``left_out`` by reason (a failed edit is
        normal, not a failure of this stage), the grid's own figures are extras."""
        n, m = self.grid
        extra: dict[str, Any] = {
            "preset (images x prompts)": f"{self.preset} ({n} x {m})",
            "images with a caption": self.images,
            "epochs": self.epochs,
            "prompts: positive / hard negative / negative": f"{self.positives} / {self.hard_negatives} / {self.negatives}",
            "passing edits available / unused": f"{self.edits_available} / {self.edits_unused}",
            "images dropped (last partial batch)": self.dropped_images,
        }
        if self.duplicate_images:
            extra["images left over (caption duplicates one in every open batch)"] = self.duplicate_images
        if self.unfillable_batches:
            extra["batches not fillable (too few distinct captions)"] = self.unfillable_batches
        extra["shard files"] = len(self.shards)
        return StageSummary(stage="batches", out_dir=self.out_dir, run_id=self.run_id, done=self.batches, left_out=Counter(self.skipped),
                            wall_s=self.seconds, shards=list(self.shards), extra=extra, unit="batches")


def print_batch_summary(summary: BatchSummary, console: Any = None) -> None:
    """The summary table (:func:`dataprep.runtime.print_summary`), then a note when the folder holds other runs."""
    from rich.console import Console

    console = console or Console()
    print_summary(summary.stage_summary(), console, title=f"batches: {summary.run_id}")
    if summary.other_runs:
        console.print(f"[yellow]note:[/] {summary.out_dir} also holds shards of other runs: {', '.join(summary.other_runs)} (train on this run with softrepa train --batch-run {summary.run_id})", highlight=False)


def write_batches(index: CaptionIndex, out_dir: Path | str, opts: BatchOptions, progress: Callable[[int, int], None] | None = None, inputs: dict[str, Any] | None = None) -> BatchSummary:
    """Write the index's batches as ``part-<run_id>-<nnnnn>.parquet`` shards.

    Holds at most ``rows_per_shard`` rows beyond the index. Shards of the same
    run id (same options and inputs) are overwritten with identical bytes, so
    a rerun is idempotent; other runs' shards in the folder are left alone.
    ``progress(done, total)`` is called per written batch with the expected
    total number of batches.
    """
    check_fillable(index, opts)
    out = check_writable(out_dir)
    lock = acquire_stage_lock(out, flag="--out", fix="wait for that run to finish, or build into another --out folder")  # a second build into the same folder stops (exit 2) naming this one
    try:
        return _write_batches(index, out, opts, progress, inputs)
    finally:
        lock.__exit__(None, None, None)


def _write_batches(index: CaptionIndex, out: Path, opts: BatchOptions, progress: Callable[[int, int], None] | None, inputs: dict[str, Any] | None) -> BatchSummary:
    t0, started = time.perf_counter(), utcnow().isoformat()
    fingerprint = index.fingerprint()
    run_id = run_id_for(opts, fingerprint)
    # the completion record goes first and comes back last: a run killed while
    # rewriting its shards must not look finished to `softrepa train`
    run_record_path(out, run_id).unlink(missing_ok=True)
    n_img = opts.grid[0]
    per_epoch = len(index) // n_img if opts.drop_last else -(-len(index) // n_img)
    total = per_epoch * opts.epochs
    shards: list[Path] = []
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        if not buffer:
            return
        table = pa.Table.from_pydict({c: [r[c] for r in buffer] for c in BATCHES_SCHEMA.names}, schema=BATCHES_SCHEMA)
        path = out / f"part-{run_id}-{len(shards):05d}.parquet"
        write_table_atomic(table, path)
        shards.append(path)
        buffer.clear()

    def add(row: dict[str, Any]) -> None:
        buffer.append(row)
        if len(buffer) >= opts.rows_per_shard:
            flush()
        if progress:
            progress(len(shards) * opts.rows_per_shard + len(buffer), total)

    counts: BuildCounts = yield_into(iter_batches(index, opts, run_id), add)
    flush()
    # an earlier identical run cannot have more shards, but never leave a stray one
    for p in shard_paths(out):
        if p.name.startswith(f"part-{run_id}-") and p not in shards:
            p.unlink()
    others = sorted({p.name[len("part-") : -len("-00000.parquet")] for p in shard_paths(out)} - {run_id})
    summary = BatchSummary(
        run_id=run_id,
        preset=opts.label,
        grid=opts.grid,
        epochs=opts.epochs,
        images=len(index),
        batches=counts.batches,
        rows=counts.batches,
        positives=counts.positives,
        hard_negatives=counts.hard_negatives,
        negatives=counts.negatives,
        dropped_images=counts.dropped_images,
        unfillable_batches=counts.unfillable_batches,
        duplicate_images=counts.duplicate_images,
        edits_available=index.n_edits(),
        edits_unused=counts.edits_unused,
        skipped={str(k): v for k, v in sorted(index.skipped.items())},  # plain text keys: the manifest and tests read them
        shards=shards,
        out_dir=out,
        seconds=time.perf_counter() - t0,
        other_runs=others,
    )
    config = {"options": asdict(opts), "grid": list(opts.grid), "inputs": inputs or {}, "input_fingerprint": fingerprint}
    # a run's own config, beside its shards and free of timestamps (deterministic);
    # the "_" keeps pyarrow/pandas/datasets from reading it as a shard of the folder
    write_run_record(out, run_id, shards, preset=opts.label, **config, counts=summary.counts())
    Manifest(stage="batches", config=config, run_id=run_id, counts=summary.stage_summary().counts() | summary.counts(), failures=summary.skipped, started_at=started, finished_at=utcnow().isoformat()).write(out)
    return summary


def build_batches(captions_dir: Path | str, out_dir: Path | str, opts: BatchOptions, edits_dir: Path | str | None = None, progress: Callable[[int, int], None] | None = None, *, judge_dir: Path | str | None = None, dedup_dir: Path | str | None = None) -> BatchSummary:
    """Caption store (+ optional edit store) -> batch shards in ``out_dir``.

    The judge and dedup stores default to ``judge/`` beside the edit store and
    ``dedup/`` beside the caption store (see :func:`apply_quality`).
    """
    index = load_caption_index(captions_dir, opts.drop_image_flags)
    if edits_dir is not None:
        attach_edits(index, edits_dir)
    inputs = {"captions": str(captions_dir), "edits": None if edits_dir is None else str(edits_dir)}
    index = apply_quality(index, opts, inputs, judge_dir if judge_dir is not None or edits_dir is None else Path(edits_dir).parent / "judge", dedup_dir if dedup_dir is not None else Path(captions_dir).parent / "dedup")
    return write_batches(index, out_dir, opts, progress, inputs)


def apply_quality(index: CaptionIndex, opts: BatchOptions, inputs: dict[str, Any], judge_dir: Path | str | None, dedup_dir: Path | str | None) -> CaptionIndex:
    """The judge filter (``require_judge``) and the dedup rule (``dedup``) on ``index``.

    Records which stores were used in ``inputs`` (the run's config).
    """
    if opts.require_judge:
        if judge_dir is None:
            raise ConfigError("--require-judge needs edits to filter", "--edits", "pass --edits OUT/edits (and run `dataprep judge --out OUT`)")
        index = require_judged(index, judge_dir)
        inputs["judge"] = str(judge_dir)
    if opts.dedup != "off" and dedup_dir is not None:
        index = clusters.attach_groups(index, dedup_dir, opts.dedup)
        if clusters.check_records(dedup_dir, opts.dedup):
            inputs["dedup"] = str(dedup_dir)
    return index


def build_coco_batches(coco_captions: Path | str, coco_images: Path | str, out_dir: Path | str, opts: BatchOptions, edits_dir: Path | str | None = None, progress: Callable[[int, int], None] | None = None, *, judge_dir: Path | str | None = None, dedup_dir: Path | str | None = None) -> BatchSummary:
    """COCO captions json + image folder (+ optional edit store) -> batch shards."""
    if opts.drop_image_flags:
        raise ConfigError("COCO captions carry no image checks", "--drop-image-flags", "use it with --captions OUT/captions (a `dataprep caption` run), or leave it out")
    index = load_coco_index(coco_captions, coco_images)
    if edits_dir is not None:
        attach_edits(index, edits_dir)
    inputs = {"coco_captions": str(coco_captions), "coco_images": str(coco_images), "edits": None if edits_dir is None else str(edits_dir)}
    # `dataprep dedup RUN --coco-captions ...` writes RUN/dedup: beside OUT/batches
    index = apply_quality(index, opts, inputs, judge_dir if judge_dir is not None or edits_dir is None else Path(edits_dir).parent / "judge", dedup_dir if dedup_dir is not None else Path(out_dir).parent / "dedup")
    return write_batches(index, out_dir, opts, progress, inputs)
