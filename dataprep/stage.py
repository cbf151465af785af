"""What every model stage shares: the run summary, the progress bar, provenance.

The caption and rewrite stages differ in their inputs and requests only; the
bookkeeping around them (counts by reason, rate, where the shards went, the
table printed at the end) lives here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dataprep.engines import ChatResult, Sampling
from dataprep.runtime import StageSummary, progress_bar
from dataprep.store import Manifest, ShardWriter, StageLocked, check_shards, check_writable, compact, describe_holder, new_run_id, stage_lock, utcnow


def model_identity(engine: Any, engine_cfg: Any = None) -> str:
    """The model part of a content key: the model id, plus the quantization.

    ``--quantize 4bit`` loads other weights (NF4, as the paper's 4-bit LLaVA)
    and gives other outputs, so rows made at full precision must not satisfy
    a 4-bit run or the reverse. The engine's own config wins (it is what loaded).
    """
    cfg = getattr(engine, "cfg", None) or engine_cfg
    quantize = getattr(cfg, "quantize", None)
    return engine.model if not quantize else f"{engine.model} [{quantize}]"


class StageRun:
    """One run of a model stage into its store folder: what both stages share.

    Construction takes the folder's lock (another run on it: ConfigError at
    once, or wait with ``wait_lock``), checks every shard already there
    (a corrupt or foreign one: ConfigError naming it), then loads the engine
    (unless one is passed: flows reuse theirs), so configuration fails before
    any input is read, and compacts the folder (a killed earlier run may have
    left superseded rows). The lock is held until :meth:`close`. Inside ``with``,
    ``writer`` takes rows and ``advance`` moves the progress bar. Leaving,
    normally or by an exception, keeps every finished row: the last shard is
    flushed, the folder compacted again (a retried key keeps one row), the
    manifest written and an engine this run loaded closed.
    """

    def __init__(self, stage: str, folder: Path, schema: Any, engine_cfg: Any, engine: Any = None, *, config: dict[str, Any], rows_per_shard: int, progress: bool = True, wait_lock: bool = False):
        from dataprep.engines import load_engine

        self.folder, self.schema = Path(folder), schema
        check_writable(self.folder)
        self.lock = acquire_stage_lock(self.folder, wait_lock)
        try:
            check_shards(self.folder, schema)
            self.own_engine = engine is None
            self.engine = engine or load_engine(engine_cfg)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        compact(self.folder, schema)
        self.run_id = new_run_id()
        self.summary = StageSummary(stage=stage, out_dir=self.folder, run_id=self.run_id)
        self.manifest = Manifest(stage=stage, run_id=self.run_id, config={"engine": engine_manifest(engine_cfg, self.engine), **config})
        self.manifest_counts: dict[str, int] = {}  # stage-specific counts merged into the manifest
        self.on_finish = None  # called before the manifest is written, also after an error
        self.batch_size = getattr(self.engine, "batch_size", 8)
        self.rows_per_shard, self.progress = rows_per_shard, progress

    def open(self, total: int) -> "StageRun":
        self.total = total
        return self

    def __enter__(self) -> "StageRun":
        self.writer = ShardWriter(self.folder, self.schema, self.run_id, self.rows_per_shard)
        self.bar = progress_bar(self.summary.stage, self.total, self.progress)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.summary.stage, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)

    def __exit__(self, *exc: object) -> None:
        try:
            self.writer.close()
            self.summary.shards = list(self.writer.written)
        finally:
            self.bar.__exit__(*exc)
            self.close()

    def close(self) -> None:
        """Compact, finish the summary, write the manifest, release the engine."""
        try:
            compact(self.folder, self.schema)
            self.summary.finish()
            if self.on_finish is not None:
                self.on_finish()
            self.manifest.counts = self.summary.counts() | self.manifest_counts
            self.manifest.failures = dict(self.summary.failed)
            self.manifest.finished_at = utcnow().isoformat()
            self.manifest.write(self.folder)
        finally:
            try:
                if self.own_engine:
                    self.engine.close()
            finally:
                self.lock.__exit__(None, None, None)


def acquire_stage_lock(
    folder: Path,
    wait: bool = False,
    flag: str = "--wait-lock",
    fix: str = "wait for that run to finish, pass --wait-lock to queue behind it, or write to another --out folder",
) -> stage_lock:
    """The folder's lock, held (release with ``__exit__``); ConfigError (exit 2) naming the holder when taken and not ``wait``."""
    from dataprep.errors import ConfigError

    lock = stage_lock(folder, wait=wait)
    try:
        return lock.__enter__()
    except StageLocked as exc:
        raise ConfigError(f"{folder} is being written by another run ({describe_holder(exc.holder)})", flag, fix) from None


def engine_manifest(engine_cfg: Any, engine: Any) -> dict[str, Any]:
    """The engine section of a manifest: the flags, plus what they resolved to.

    ``--dtype auto`` and ``--device auto`` say nothing about the run; the
    precision actually loaded changes outputs and is not part of the row key,
    so the manifest records it.
    """
    out = dict(engine_cfg.public_dict(), model=engine.model)
    for attr in ("device", "dtype", "batch_size"):
        value = getattr(engine, attr, None)
        if value is not None:
            out[f"resolved_{attr}"] = str(value).replace("torch.", "")
    return out


def provenance(
    *,
    key: str,
    engine: Any,
    prompt_id: str,
    prompt_sha256: str,
    sampling: Sampling,
    run_id: str,
    result: ChatResult | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The provenance columns of one generated row (see PROVENANCE_FIELDS)."""
    r = result or ChatResult()
    return {
        "key": key,
        "engine": getattr(engine, "name", None),
        "model": getattr(engine, "model", None),
        "model_revision": getattr(engine, "revision", None),
        "prompt_id": prompt_id,
        "prompt_sha256": prompt_sha256,
        "sampling": sampling.to_json(),
        "seed": sampling.seed,
        "finish_reason": "error" if error else r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "run_id": run_id,
        "created_at": utcnow(),
        "error": error if error is not None else r.error,
    }
