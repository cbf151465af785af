"""A model stage is three functions over a typed record; one runner does the rest.

A stage (:class:`ModelStage`) says what is particular to it:

- ``key(item, model)``: the content key of the row ``item`` will get;
- ``infer(engine, tasks)``: one engine call (or a few, under a retry policy)
  for a batch of tasks, one :class:`Output` each, same order;
- ``row(task, output)``: the stage's columns of the row (``output`` is None
  for an input that never reached the model).

:func:`run_model_stage` owns everything else, once for every stage: the
folder's lock, the shard check, loading the engine, compaction, resume from
the keys already done, one row per key within a run, batching, the executor,
the provenance columns, the one ShardWriter, counting done / skipped / failed
(by reason) / truncated, the manifest and the summary. The runner decides
which items go to the model and in what batches; the executor
(:mod:`dataprep.executors`) decides where they run.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Protocol, TypeVar

from dataprep import engines
from dataprep.engines import ChatResult, EngineConfig, Sampling
from dataprep.errors import ConfigError
from dataprep.executors import ExecutorConfig, LocalExecutor, Work, make_executor
from dataprep.promptfile import Prompt
from dataprep.runtime import StageSummary, progress_bar
from dataprep.store import Manifest, ShardWriter, StageLocked, check_shards, check_writable, compact, describe_holder, done_keys, new_run_id, stage_lock, utcnow

Item = TypeVar("Item")
Out = TypeVar("Out", bound="Output")


@dataclass(frozen=True)
class ModelId:
    """The model part of every content key: what loaded (see :func:`model_identity`) and its revision."""

    model: str
    revision: str | None


class Output(Protocol):
    """What ``infer`` returns per task: the kept engine result, how it was sampled, and its error."""

    result: ChatResult
    sampling: Sampling
    error: str | None


@dataclass
class Generated:
    """The plain :class:`Output`: one request, one result (caption)."""

    result: ChatResult
    sampling: Sampling
    error: str | None = None


@dataclass
class Task(Generic[Item]):
    """One input on its way to a row. ``error``: written as an error row without the model;
    ``skipped``: found done while preparing; ``prepared``: what preparation made for the model."""

    input: Item
    key: str
    error: str | None = None
    skipped: bool = False
    prepared: Any = None

    @property
    def needs_model(self) -> bool:
        return not self.skipped and self.error is None


def needs_model(task: Task) -> bool:
    """:attr:`Task.needs_model` as a function (executors take a picklable callable)."""
    return task.needs_model


@dataclass
class Preparation:
    """How a stage makes its tasks where the executor runs, when that is not cheap.

    ``prepare(item) -> Task`` runs in Ray tasks (or here); ``local_map(items)``
    replaces it on the local executor (the caption stage's decode processes);
    ``slim(task)`` drops what the driver does not need back (pixels)."""

    prepare: Callable[[Any], Task]
    local_map: Callable[[Iterable[Any]], Iterator[Task]] | None = None
    slim: Callable[[Task], Task] | None = None


class Tally:
    """Stage-specific figures, folded over the good rows of one run; returned as data at the end."""

    def add(self, task: Task, out: Output) -> None:
        pass

    def extra(self) -> dict[str, Any]:
        """Lines for the summary table (``StageSummary.extra``)."""
        return {}

    def counts(self) -> dict[str, int]:
        """Counts merged into the manifest's ``counts``."""
        return {}


class ModelStage(Generic[Item, Out]):
    """What one model stage is. Subclasses are dataclasses holding their options and prompt.

    ``name`` is the key namespace and the manifest's stage, ``folder`` the
    store folder under ``OUT``, ``schema`` its Parquet schema. ``images``: the
    stage sends images, so a Ray executor reads the model's image side first.
    """

    name: str
    folder: str
    schema: Any
    images: bool = False
    prepares: bool = False  # tasks come from preparation(), not from key() here (see there)
    opts: Any
    prompt: Prompt

    def key(self, item: Item, model: ModelId) -> str:
        raise NotImplementedError

    def infer(self, engine: Any, tasks: list[Task[Item]]) -> list[Out]:
        raise NotImplementedError

    def row(self, task: Task[Item], out: Out | None) -> dict[str, Any]:
        raise NotImplementedError

    # ---------------------------------------------------------------- optional hooks

    @property
    def sampling(self) -> Sampling:
        """Sampling recorded on a row that never reached the model: needed by a stage whose
        inputs can be errors (``input_error``, or a preparation that sets ``Task.error``)."""
        raise NotImplementedError

    def input_error(self, item: Item) -> str | None:
        """Why ``item`` cannot go to the model (written as an error row), or None."""
        return None

    def resume(self, folder: Path, keys: set[str] | None, force: bool) -> set[str]:
        """Keys that already have a finished row (none with ``force``: all are redone).

        ``keys`` are this run's keys when known before preparation, else None."""
        return set() if force else done_keys(folder)

    def preparation(self, model: ModelId, done: frozenset[str], engine: Any) -> Preparation:
        """For a stage that must read an input to know its key (``prepares``; caption hashes
        the image bytes): how its tasks are made where the executor runs. ``done``: skip these keys."""
        raise NotImplementedError

    def tally(self) -> Tally:
        return Tally()

    def manifest_config(self) -> dict[str, Any]:
        return {"options": asdict(self.opts), "prompt_id": self.prompt.prompt_id, "prompt_sha256": self.prompt.sha256}


def model_identity(engine: Any, engine_cfg: Any = None) -> str:
    """The model part of a content key: the model id, plus the quantization.

    ``--quantize 4bit`` loads other weights (NF4, as the paper's 4-bit LLaVA)
    and gives other outputs, so rows made at full precision must not satisfy
    a 4-bit run or the reverse. The engine's own config wins (it is what loaded).
    """
    cfg = getattr(engine, "cfg", None) or engine_cfg
    quantize = getattr(cfg, "quantize", None)
    return engine.model if not quantize else f"{engine.model} [{quantize}]"


# ---------------------------------------------------------------- the runner


def run_model_stage(
    stage: ModelStage,
    items: Iterable[Any],
    out: Path | str,
    engine_cfg: EngineConfig,
    *,
    engine: Any = None,
    executor: ExecutorConfig | None = None,
    progress: bool = True,
    force: bool = False,
    rows_per_shard: int = 256,
    wait_lock: bool = False,
) -> StageSummary:
    """Run ``stage`` over ``items`` into ``out/<stage.folder>``; returns the summary.

    Before any item is read: the executor connects (Ray), the folder is locked
    (another run on it: ConfigError at once, or wait with ``wait_lock``), every
    shard already there is checked, the engine loads (unless ``engine`` is
    given: flows and the pipeline reuse theirs) and the folder is compacted
    (a killed earlier run may have left superseded rows). Keys already done
    are skipped (all redone with ``force``); a key met twice is done once.
    Leaving, normally or by an exception, keeps every finished row: the last
    shard is flushed, the folder compacted again, the manifest written, an
    engine this run loaded closed and the lock released.
    """
    items = list(items)  # caption's are ids and paths: no image is read before the model loads
    folder = Path(out) / stage.folder
    executor_cfg = executor or ExecutorConfig()
    with ExitStack() as leave:  # undone in reverse order, also after an error
        remote, engine = make_executor(executor_cfg, engine_cfg, engine, describe=stage.images)
        if remote is not None:
            leave.callback(remote.close)
        check_writable(folder)
        leave.callback(acquire_stage_lock(folder, wait_lock).__exit__, None, None, None)
        check_shards(folder, stage.schema)
        if engine is None:
            engine = engines.load_engine(engine_cfg)  # through the module: one place to substitute a fake engine
            leave.callback(engine.close)
        compact(folder, stage.schema)
        config = {"engine": engine_manifest(engine_cfg, engine), **stage.manifest_config(), "executor": executor_cfg.public_dict()}
        run = _Run(stage, folder, engine, ModelId(model_identity(engine, engine_cfg), engine.revision), config, rows_per_shard)
        leave.callback(run.finish)
        bar = leave.enter_context(progress_bar(stage.name, len(items), progress))
        run.bar = (bar, bar.add_task(stage.name, total=len(items)))
        run.drive(items, remote or LocalExecutor(engine), force)
    return run.summary


class _Run:
    """The bookkeeping of one :func:`run_model_stage` call: writer, counts, manifest."""

    def __init__(self, stage: ModelStage, folder: Path, engine: Any, model: ModelId, config: dict[str, Any], rows_per_shard: int):
        self.stage, self.folder, self.engine, self.model = stage, folder, engine, model
        self.run_id = new_run_id()
        self.summary = StageSummary(stage=stage.name, out_dir=folder, run_id=self.run_id)
        self.manifest = Manifest(stage=stage.name, run_id=self.run_id, config=config)
        self.writer = ShardWriter(folder, stage.schema, self.run_id, rows_per_shard)
        self.tally = stage.tally()
        self.written: set[str] = set()
        self.batch_size = getattr(engine, "batch_size", 8)
        self.bar: tuple[Any, Any] | None = None  # (rich Progress, its task)

    def drive(self, items: list[Any], executor: Any, force: bool) -> None:
        """Which items go to the model, in what batches; every result becomes a row (or a skip)."""
        stage = self.stage
        if stage.prepares:
            prep = stage.preparation(self.model, frozenset(stage.resume(self.folder, None, force)), self.engine)
            work = Work(stage.infer, self.batch_size, prepare=prep.prepare, wants_model=needs_model, local_map=prep.local_map, slim=prep.slim)
            todo: Iterable[Any] = items
        else:
            tasks = [Task(item, stage.key(item, self.model), stage.input_error(item)) for item in items]
            done = stage.resume(self.folder, {t.key for t in tasks}, force)
            todo = []
            for task in tasks:
                task.skipped = task.error is None and task.key in done
                done.add(task.key)  # the same key twice in the input is done once
                if task.needs_model:
                    todo.append(task)
                else:
                    self.record(task, None)
            work = Work(stage.infer, self.batch_size)
        for task, out in executor.run(todo, work):
            self.record(task, out)

    def record(self, task: Task, out: Output | None) -> None:
        summary = self.summary
        # a preparing stage's duplicate key is only seen here, after the model
        # (preparation ran where the executor runs it): it is still written once
        if task.skipped or task.key in self.written:
            summary.skipped += 1
        else:
            self.written.add(task.key)
            error = out.error if out is not None else task.error
            sampling = out.sampling if out is not None else self.stage.sampling
            result = out.result if out is not None else None
            prompt = self.stage.prompt
            self.writer.add(self.stage.row(task, out) | provenance(
                key=task.key, engine=self.engine, prompt_id=prompt.prompt_id, prompt_sha256=prompt.sha256,
                sampling=sampling, run_id=self.run_id, result=result, error=error,
            ))
            if error:
                summary.fail(error)
            else:
                summary.done += 1
                summary.truncated += out.result.finish_reason == "length"
                self.tally.add(task, out)
        if self.bar is not None:
            self.bar[0].advance(self.bar[1])

    def finish(self) -> None:
        """Flush, compact, finish the summary and write the manifest: also after an error."""
        try:
            self.writer.close()
        finally:
            self.summary.shards = list(self.writer.written)
            compact(self.folder, self.stage.schema)
            self.summary.finish()
            self.summary.extra.update(self.tally.extra())
            self.manifest.counts = self.summary.counts() | self.tally.counts()
            self.manifest.failures = dict(self.summary.failed)
            self.manifest.finished_at = utcnow().isoformat()
            self.manifest.write(self.folder)


def acquire_stage_lock(
    folder: Path,
    wait: bool = False,
    flag: str = "--wait-lock",
    fix: str = "wait for that run to finish, pass --wait-lock to queue behind it, or write to another --out folder",
) -> stage_lock:
    """The folder's lock, held (release with ``__exit__``); ConfigError (exit 2) naming the holder when taken and not ``wait``."""
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
