"""Where a model stage's batches run: this process (``local``) or a Ray cluster (``ray``).

A model stage decides *which* items and *what* each needs (keys, requests,
rows: :mod:`dataprep.stage`); an executor decides *where* that runs. Both
executors take the same :class:`Work`:

- ``prepare(item) -> prepared``: CPU work per item (the caption stage hashes
  and decodes the image, and marks items already done or unreadable);
- ``wants_model(prepared) -> bool``: False passes the item straight back
  (skipped or error rows need no model);
- ``infer(engine, prepared_items) -> outputs``: one engine call for a batch
  of up to ``batch_size``, one output per item, same order.

``run(items, work)`` yields ``(prepared, output or None)`` once per input
item, in any order; the runner turns them into rows and writes them through
its one ShardWriter, so every key is written exactly once and the store,
schemas, keys and manifest are those of the local run.

The Ray executor is a Ray Data pipeline, the pattern vLLM's docs give for
data-parallel batch inference: item refs -> ``map(prepare)`` in CPU tasks
(decoding scales with the cluster's CPUs) -> ``map_batches`` into a pool of
``--replicas`` engine actors (each loads its model once; ``--gpus-per-replica``
each) -> ``iter_batches`` on the driver. An actor that dies is restarted and
its batch retried by Ray Data (its actor pools default to ``max_restarts=-1``
and ``max_task_retries=-1``); a batch's output reaches the driver only once
its task finished, and the driver drops any item index it already yielded,
so a retry never writes a row twice.
Ray is imported lazily: the local executor never needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dataprep.engines import EngineConfig, load_engine
from dataprep.engines.hf import load_config
from dataprep.errors import ConfigError
from dataprep.runtime import at_least, option

EXECUTORS = ("local", "ray")
RAY_INSTALL = 'pip install "softrepa-dataprep[ray]"'

Prepare = Callable[[Any], Any]
Infer = Callable[[Any, list], list]


def _always(_: Any) -> bool:
    return True


@dataclass(frozen=True)
class Work:
    """What a stage's run asks of an executor (see the module docstring).

    ``local_map(items)`` replaces ``map(prepare, items)`` on the local executor
    when the stage has its own parallel preparation (the caption stage's decode
    processes); ``slim(prepared)`` is what a Ray replica sends back (no pixels)."""

    infer: Infer
    batch_size: int
    prepare: Prepare | None = None
    wants_model: Callable[[Any], bool] = _always
    local_map: Callable[[Iterable[Any]], Iterator[Any]] | None = None
    slim: Callable[[Any], Any] | None = None


@dataclass
class ExecutorConfig:
    """``--executor`` and the Ray flags (one field per flag). Invalid values cannot be built."""

    executor: str = option("local", "local (this process, default) or ray (Ray Data: decoding in CPU tasks, --replicas engine actors; needs the ray extra).", panel="Executor")
    # None: start a local Ray; auto: join the running cluster; HOST:PORT
    ray_address: str | None = option(None, "ray: cluster to join: HOST:PORT of `ray start --head`, or auto (the cluster this machine belongs to); default: start a local Ray.", panel="Executor")
    replicas: int = option(1, "ray: engine replicas (actors), each loading the model once.", panel="Executor")  # model copies
    gpus_per_replica: float | None = option(None, "ray: GPUs per replica (default: the tensor-parallel size for vllm, 1 for transformers when the cluster has GPUs, 0 for openai).", panel="Executor")
    cpus_per_replica: float = option(1.0, "ray: CPUs each replica reserves (and its torch threads on CPU).", panel="Executor")

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.executor!r}", "--executor", f"use one of {', '.join(EXECUTORS)}")
        at_least(self.replicas, 1, "--replicas", "e.g. one per GPU")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ConfigError(f"--gpus-per-replica {self.gpus_per_replica} is negative", "--gpus-per-replica", "0 for CPU or remote (openai) engines, else 1 or the tensor-parallel size")
        if self.cpus_per_replica <= 0:
            raise ConfigError(f"--cpus-per-replica {self.cpus_per_replica} must be positive", "--cpus-per-replica", "e.g. 1")
        if self.executor == "local":
            ray_only = [flag for flag, set_ in (("--ray-address", self.ray_address is not None), ("--replicas", self.replicas != 1), ("--gpus-per-replica", self.gpus_per_replica is not None), ("--cpus-per-replica", self.cpus_per_replica != 1.0)) if set_]
            if ray_only:
                raise ConfigError(f"{', '.join(ray_only)} only apply to the Ray executor", ray_only[0], "add --executor ray, or drop the flag")
        elif importlib.util.find_spec("ray") is None:
            raise ConfigError("--executor ray needs Ray Data, which is not installed", "--executor", f"{RAY_INSTALL}, or use --executor local")

    @property
    def is_ray(self) -> bool:
        return self.executor == "ray"

    def public_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_gpus(cfg: ExecutorConfig, engine_cfg: EngineConfig, cluster_gpus: float) -> float:
    """GPUs each replica asks Ray for; a vllm replica needs its whole tensor-parallel group."""
    if cfg.gpus_per_replica is not None:
        gpus = cfg.gpus_per_replica
    elif engine_cfg.engine == "openai":
        gpus = 0.0
    elif engine_cfg.engine == "vllm":
        gpus = float(engine_cfg.tensor_parallel_size)
    else:
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    if engine_cfg.engine == "vllm" and gpus < engine_cfg.tensor_parallel_size:
        raise ConfigError(
            f"--gpus-per-replica {gpus:g} is less than --tensor-parallel-size {engine_cfg.tensor_parallel_size}",
            "--gpus-per-replica",
            "give each vllm replica its whole tensor-parallel group, or leave the flag out",
        )
    return gpus


# ------------------------------------------------------------ local


class LocalExecutor:
    """This process, one engine: batches of ``batch_size`` model items, in input order."""

    def __init__(self, engine: Any):
        self.engine = engine

    def run(self, items: Iterable[Any], work: Work) -> Iterator[tuple[Any, Any]]:
        """In input order; ``work.slim`` is for Ray (nothing leaves this process)."""
        if work.local_map is not None:
            prepared = work.local_map(items)
        else:
            prepared = map(work.prepare, items) if work.prepare is not None else iter(items)
        pending: list[Any] = []
        for p in prepared:
            if not work.wants_model(p):
                yield p, None
                continue
            pending.append(p)
            if len(pending) >= work.batch_size:
                yield from zip(pending, work.infer(self.engine, pending))
                pending = []
        if pending:
            yield from zip(pending, work.infer(self.engine, pending))

    def close(self) -> None:
        pass


# ------------------------------------------------------------ ray (runs on workers: top-level, picklable)


@dataclass
class RemoteEngine:
    """What the driver knows of the replicas' engine without loading a model.

    Enough for the stage's keys (model, revision, quantization), provenance
    (name, model, revision), image preparation (``image_size``) and the
    manifest; ``generate`` runs on the replicas only.
    """

    cfg: EngineConfig
    name: str
    model: str
    revision: str | None
    batch_size: int
    size: int | None = None
    replicas: int = 1
    gpus_per_replica: float = 0.0
    device: str = field(default="ray")

    def image_size(self) -> int | None:
        return self.size

    def generate(self, requests: list) -> list:
        raise RuntimeError("a RemoteEngine only describes the Ray replicas; they run the model")

    def close(self) -> None:
        pass


def describe_model(engine_cfg: EngineConfig) -> tuple[int | None, str | None]:
    """(image side the model consumes, None) or (None, ConfigError text); reads configs, not weights.

    Runs on a Ray worker, where the replicas will find the model.
    """
    try:
        engine_cfg.require_model()
        if engine_cfg.engine == "openai":
            return None, None  # the server resizes for its model
        config = load_config(engine_cfg.model, engine_cfg.revision, engine_cfg.trust_remote_code)
        if getattr(config, "vision_config", None) is None:
            return None, None
        from transformers import AutoProcessor

        local = Path(engine_cfg.model).expanduser()
        processor = AutoProcessor.from_pretrained(str(local) if local.exists() else engine_cfg.model, revision=engine_cfg.revision, trust_remote_code=engine_cfg.trust_remote_code)
        ip = processor.image_processor  # the engines' own rule (TransformersEngine.image_size)
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        return crop.get("height") or size.get("shortest_edge") or size.get("height"), None
    except ConfigError as exc:
        return None, str(exc)


def missing_local_model(engine_cfg: EngineConfig) -> str | None:
    """The engines' message for a model path without config.json (see engines.hf.load_config), else None."""
    if engine_cfg.engine == "openai":
        return None
    local = Path(engine_cfg.model).expanduser()
    if (engine_cfg.model.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        return str(ConfigError(f"no model at {local} (config.json missing)", "--model", "pass a directory written by save_pretrained, or a hub id"))
    return None


def _check_model(engine_cfg: EngineConfig) -> tuple[None, str | None]:
    """describe_model's answer for text-only stages: only whether a local model path exists."""
    return None, missing_local_model(engine_cfg)


def _config_error_of(exc: BaseException) -> ConfigError | None:
    """The ConfigError a replica raised (loading its model), if that is what ended the run."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConfigError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class _Prepare:
    """Ray Data row function: unpickle an item, prepare it, flag whether it needs the model."""

    def __init__(self, prepare: Prepare | None, wants_model: Callable[[Any], bool]):
        self.prepare, self.wants_model = prepare, wants_model

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        item = pickle.loads(row["payload"])
        p = self.prepare(item) if self.prepare is not None else item
        return {"index": row["index"], "payload": _dumps(p), "infer": bool(self.wants_model(p))}


class EngineReplica:
    """One engine replica (a Ray actor): loads the model once, then serves batches.

    Items that do not need the model pass through; each output row carries
    the item (``slim`` drops what the driver does not need, e.g. pixels) and
    the pickled output (null for pass-through items).
    """

    def __init__(self, engine_cfg: EngineConfig, infer: Infer, slim: Callable[[Any], Any] | None):
        self.engine = load_engine(engine_cfg)
        self.infer, self.slim = infer, slim

    def __call__(self, batch):
        import pyarrow as pa

        items = [pickle.loads(b) for b in batch.column("payload").to_pylist()]
        flags = batch.column("infer").to_pylist()
        todo = [it for it, f in zip(items, flags) if f]
        outputs = iter(self.infer(self.engine, todo) if todo else [])
        out = [_dumps(next(outputs)) if f else None for f in flags]
        if self.slim is not None:
            items = [self.slim(it) for it in items]
        return pa.table({
            "index": batch.column("index"),
            "payload": pa.array([_dumps(it) for it in items], pa.large_binary()),
            "output": pa.array(out, pa.large_binary()),
        })


def _quiet_ray_data() -> None:
    """No Ray Data progress bars or per-dataset INFO lines: the stage draws its own bar."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):  # newer Ray Data only
        ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT ``--ray-address`` must accept a TCP connection, or ConfigError.

    ``ray.init`` on an address where nothing listens does not fail: it retries
    the GCS connection for minutes, printing a line every few seconds, so a
    typo'd address would hang a nightly run. ``auto``, ``local`` and
    ``ray://`` client addresses are left to Ray.
    """
    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"nothing answers at --ray-address {address} ({type(exc).__name__}: {exc})",
            "--ray-address",
            "check HOST:PORT (the head prints it at `ray start --head`; default port 6379), use auto on a cluster node, or leave it out to start a local Ray",
        ) from None


class RayExecutor:
    """A Ray Data pipeline on a Ray cluster (see the module docstring).

    Construction connects (``--ray-address``: none starts a local Ray, ``auto``
    joins the running cluster) and, with ``describe`` (stages that prepare
    images for the model), reads the model's image side on a worker, so a bad
    address or a missing model fails before any item is read. Without it only
    a local model path is checked (on a worker); a hub id that does not load
    fails the first replica, which ends the run with the replica's ConfigError.
    ``engine`` is a :class:`RemoteEngine` for the stage's keys and manifest.
    """

    def __init__(self, cfg: ExecutorConfig, engine_cfg: EngineConfig, describe: bool = True):
        import ray

        self.cfg, self.engine_cfg = cfg, engine_cfg
        engine_cfg.require_model()
        if cfg.ray_address is None and (missing := missing_local_model(engine_cfg)):
            raise ConfigError(missing)  # a local Ray sees this machine's files: say so before starting it
        self.own_ray = not ray.is_initialized()
        if self.own_ray:
            address = cfg.ray_address or "local"
            check_reachable(address)
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(
                    f"cannot reach a Ray cluster at {address!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                    "--ray-address",
                    "start one with `ray start --head` (then HOST:PORT or auto), or leave --ray-address out to start a local Ray",
                ) from None
        try:
            _quiet_ray_data()
            self.gpus = resolve_gpus(cfg, engine_cfg, ray.cluster_resources().get("GPU", 0))
            # on a worker: a cluster's model paths need not exist on this machine
            size, error = ray.get(ray.remote(num_cpus=0)(describe_model if describe else _check_model).remote(engine_cfg))
            if error:
                raise ConfigError(error)
        except BaseException:
            self.close()
            raise
        batch = int(engine_cfg.batch_size) if engine_cfg.batch_size != "auto" else (16 if self.gpus else 8)
        self.engine = RemoteEngine(
            cfg=engine_cfg, name=engine_cfg.engine, model=engine_cfg.model, revision=engine_cfg.revision,
            batch_size=batch, size=size, replicas=cfg.replicas, gpus_per_replica=self.gpus,
        )

    def run(self, items: Iterable[Any], work: Work) -> Iterator[tuple[Any, Any]]:
        """Yield ``(prepared, output)`` once per item, in completion order. ``work.local_map``
        is ignored: preparation runs in Ray tasks."""
        import pyarrow as pa
        import ray

        from ray.data import ActorPoolStrategy

        items = list(items)
        if not items:
            return
        prepare, wants_model, batch_size = work.prepare, work.wants_model, work.batch_size
        # blocks of one engine batch: decoding streams into the replicas batch by batch
        blocks = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            columns = {"index": pa.array(range(start, start + len(chunk)), pa.int64()), "payload": pa.array([_dumps(it) for it in chunk], pa.large_binary())}
            if prepare is None:  # nothing to prepare (rewrite): no CPU stage at all
                columns["infer"] = pa.array([bool(wants_model(it)) for it in chunk])
            blocks.append(pa.table(columns))
        ds = ray.data.from_arrow(blocks)
        if prepare is not None:
            ds = ds.map(_Prepare(prepare, wants_model), num_cpus=1)
        ds = ds.map_batches(
            EngineReplica,
            fn_constructor_kwargs={"engine_cfg": self.engine_cfg, "infer": work.infer, "slim": work.slim},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=self.cfg.replicas),
            num_gpus=self.gpus,
            num_cpus=self.cfg.cpus_per_replica,
        )
        seen: set[int] = set()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for i, p, o in zip(batch.column("index").to_pylist(), batch.column("payload").to_pylist(), batch.column("output").to_pylist()):
                    if i in seen:  # a retried batch delivered twice: the first copy was written
                        continue
                    seen.add(i)
                    yield pickle.loads(p), (pickle.loads(o) if o is not None else None)
        except Exception as exc:
            config = _config_error_of(exc)
            if config is None:
                raise
            raise ConfigError(str(config)) from None

    def close(self) -> None:
        import ray

        if self.own_ray and ray.is_initialized():
            ray.shutdown()


def make_executor(cfg: ExecutorConfig | None, engine_cfg: EngineConfig, engine: Any = None, *, describe: bool = True) -> tuple[Any, Any]:
    """(executor, engine for the stage's run). Local: (None, ``engine`` as given; None: the runner loads it).
    Ray: a connected RayExecutor and its RemoteEngine (no model loads on the driver);
    ``describe``: the stage needs the model's image side (see RayExecutor)."""
    cfg = cfg or ExecutorConfig()
    if not cfg.is_ray:
        return None, engine
    if engine is not None:
        raise ConfigError("a loaded engine cannot be shipped to Ray replicas", "--executor", "let the Ray replicas load the model (pass no engine)")
    ex = RayExecutor(cfg, engine_cfg, describe=describe)
    return ex, ex.engine
