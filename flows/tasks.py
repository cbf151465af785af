"""Prefect tasks: one call into a dataprep / softrepa stage each, nothing more.

Three rules of the orchestration live here:

- **The store decides what is redone.** Model stages run per shard of inputs;
  each call skips keys that already have a good row. Prefect's cache is a
  second line: :func:`store_cache_policy` only produces a cache key once the
  store already holds a good row for every input of the shard, and the key
  covers those rows' content keys, so a cache hit can never hide a missing or
  changed row (deleting outputs, or a different model's rows, changes it).
- **The model loads once per process.** :func:`engine_for` keeps one loaded
  engine per EngineConfig in this process; :func:`release_engines` closes
  them when a stage is over, so the captioner leaves the card before the
  rewriter loads.
- **One GPU stage per card.** :func:`gpu_slot` holds a slot of the global
  concurrency limit ``gpu`` (``strict=True``: a missing limit is an error,
  never a silent pass) for as long as a local model may sit on the card.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.tasks import exponential_backoff

from dataprep.engines import Engine, EngineConfig, load_engine
from dataprep.errors import ConfigError
from dataprep.store import shard_paths
from dataprep.batches import build_batches
from dataprep.judge import inputs_from_edits, run_judge
from dataprep.rewrite import run_rewrite

GPU_LIMIT = "gpu"
ENGINE_RETRIES = 2
# Task timeouts: long enough for honest work, short enough that a hung engine
# call (a dead server, a stuck device) fails the task and its retries redo it.
SHARD_TIMEOUT_S = 3600.0  # one shard of 256 images or captions; ~1 min on one GPU for the paper's models
BATCHES_TIMEOUT_S = 3600.0  # pure Python over the caption index; seconds for DIV2K, minutes for COCO
TRAIN_TIMEOUT_S = 72 * 3600.0  # the paper's longest recipe with margin; checkpoints make a retry resume
EVALUATE_TIMEOUT_S = 24 * 3600.0
JUDGE_TIMEOUT_S = 24 * 3600.0  # every edit of a run in one task; resumable by key, so a retry continues
DEDUP_TIMEOUT_S = 6 * 3600.0  # hashing COCO's 118k images and 590k captions on a few cores
_ENGINES: dict[str, Engine] = {}


# ------------------------------------------------------------ engines and the GPU slot


def engine_key(cfg: EngineConfig) -> str:
    return json.dumps(cfg.public_dict(), sort_keys=True, default=str)


def engine_for(cfg: EngineConfig) -> Engine:
    """The loaded engine for ``cfg``, loading it on first use in this process.

    Any other engine still loaded is closed first: a 13B captioner and an 8B
    rewriter do not fit one card together.
    """
    key = engine_key(cfg)
    if key not in _ENGINES:
        release_engines()
        _ENGINES[key] = load_engine(cfg)
    return _ENGINES[key]


def release_engines() -> int:
    """Close every engine this process holds (frees GPU memory); returns how many."""
    n = 0
    while _ENGINES:
        _, engine = _ENGINES.popitem()
        with contextlib.suppress(Exception):  # closing is best effort; the process may be exiting
            engine.close()
        n += 1
    return n


def uses_local_gpu(cfg: EngineConfig) -> bool:
    """Engines that put a model in this process (openai talks to a server elsewhere)."""
    return cfg.engine in ("transformers", "vllm")


@contextlib.contextmanager
def gpu_slot(enabled: bool = True, timeout_s: float | None = None) -> Iterator[None]:
    """Hold one slot of the global limit ``gpu`` (created by ``dataprep server start``)."""
    if not enabled:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=True, timeout_seconds=timeout_s):
        yield


def retry_engine_errors(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed stage call unless the failure is bad configuration.

    A load failure, CUDA OOM or a dropped server connection may pass; a
    ConfigError will fail identically every time. The engine is dropped so
    the retry loads a fresh one.
    """
    try:
        state.result()
    except ConfigError:
        return False
    except Exception as exc:
        if type(exc).__name__ == "ConfigError":  # softrepa's own ConfigError (a ValueError)
            return False
        release_engines()
        return True
    return False


_retry = dict(retries=ENGINE_RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5, retry_condition_fn=retry_engine_errors)


# ------------------------------------------------------------ the cache as a second line


def store_fingerprint(folder: Path | str, ids: Sequence[str], id_column: str = "image_id") -> str | None:
    """Hash of the good rows' keys for ``ids`` in a store; None unless every id has one.

    Reads only the id, key and error columns of each shard.
    """
    wanted = set(ids)
    have: set[str] = set()
    keys: list[str] = []
    for path in shard_paths(folder):
        t = pq.read_table(path, columns=[id_column, "key", "error"])
        for i, k, e in zip(t.column(id_column).to_pylist(), t.column("key").to_pylist(), t.column("error").to_pylist()):
            if e is None and i in wanted:
                have.add(i)
                keys.append(k)
    if not wanted or have != wanted:
        return None
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def store_cache_policy(store_of, ids_of) -> CachePolicy:
    """Cache key = inputs + task source + the store's good rows for this shard.

    ``store_of(params)`` names the output store folder and ``ids_of(params)``
    the input ids of a call. No key (no caching) while any id lacks a good
    row, so the first run and any run that has failures left always executes.
    The run id is deliberately not part of the key: a new flow run over the
    same finished shard is a hit.
    """
    base = INPUTS + TASK_SOURCE

    def key(ctx: Any, params: dict[str, Any]) -> str | None:
        fp = store_fingerprint(store_of(params), ids_of(params))
        if fp is None:
            return None
        inner = base.compute_key(task_ctx=ctx, inputs=params, flow_parameters={})
        return hashlib.sha256(f"{inner}:{fp}".encode()).hexdigest()

    return CachePolicy.from_cache_key_fn(key)


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive shards of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise ConfigError(f"shard size {size} must be at least 1", "--shard-size", "e.g. 256")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# ------------------------------------------------------------ stage tasks


@task(name="caption-shard", cache_policy=store_cache_policy(lambda p: Path(p["out"]) / "captions", lambda p: [r.image_id for r in p["refs"]]), persist_result=True, timeout_seconds=SHARD_TIMEOUT_S, **_retry)
def caption_shard(refs: list, out: Path, engine_cfg: EngineConfig, opts: Any, prompt_sha256: str, executor: Any = None) -> Any:
    """Caption one shard of image refs into ``out/captions`` (see dataprep.caption.run_caption).

    ``prompt_sha256`` is the caption prompt's content hash: it is here so that
    editing the prompt file changes the cache key (the option holds its name only).
    ``executor``: a Ray ExecutorConfig (its replicas load the model), or None (this process).
    """
    from dataprep.caption import run_caption

    if executor is not None and executor.is_ray:
        return run_caption(refs, out, engine_cfg, opts, executor=executor, progress=False)
    return run_caption(refs, out, engine_cfg, opts, engine=engine_for(engine_cfg), progress=False)


@task(name="rewrite-shard", cache_policy=store_cache_policy(lambda p: Path(p["out"]) / "edits", lambda p: [i.image_id for i in p["items"] if i.error is None and i.text]), persist_result=True, timeout_seconds=SHARD_TIMEOUT_S, **_retry)
def rewrite_shard(items: list, out: Path, engine_cfg: EngineConfig, opts: Any, prompt_sha256: str, executor: Any = None) -> Any:
    """Rewrite one shard of captions (RewriteInput) into ``out/edits`` (see dataprep.rewrite.run_rewrite).

    ``prompt_sha256`` is the rules file's content hash (cache key only).
    ``executor``: as in :func:`caption_shard`.
    """
    if executor is not None and executor.is_ray:
        return run_rewrite(items, out, engine_cfg, opts, executor=executor, progress=False)
    return run_rewrite(items, out, engine_cfg, opts, engine=engine_for(engine_cfg), progress=False)


@task(name="build-batches", timeout_seconds=BATCHES_TIMEOUT_S)
def build_batches_task(captions: Path, out_dir: Path, opts: Any, edits: Path | None) -> Any:
    """Contrastive batch shards (deterministic: same inputs and options, same files)."""
    return build_batches(captions, out_dir, opts, edits_dir=edits)


@task(name="train-tokens", timeout_seconds=TRAIN_TIMEOUT_S, **_retry)
def train_task(cfg: Any) -> Any:
    """Train soft tokens (softrepa.train.train); checkpoints make a retry resume."""
    from softrepa.train import train

    return train(cfg)


@task(name="evaluate-edit", timeout_seconds=EVALUATE_TIMEOUT_S, **_retry)
def evaluate_task(cfg: Any) -> Any:
    """FlowEdit with/without tokens on the caption/edit pairs (resumable per image)."""
    from softrepa.evaluate import evaluate_edit

    return evaluate_edit(cfg)


@task(name="judge-edits", timeout_seconds=JUDGE_TIMEOUT_S, **_retry)
def judge_task(out: Path, engine_cfg: EngineConfig, opts: Any) -> Any:
    """Grade the run's edit pairs into ``out/judge`` (see dataprep.judge.run_judge); resumable by key."""
    items, left = inputs_from_edits(Path(out) / "edits", opts.all_edits)
    return run_judge(items, out, engine_cfg, opts, engine=engine_for(engine_cfg), progress=False, left_out=left)


@task(name="dedup", timeout_seconds=DEDUP_TIMEOUT_S)
def dedup_task(out: Path, opts: Any) -> Any:
    """Duplicate clusters of the run's images and captions into ``out/dedup`` (see dataprep.dedup.run_dedup)."""
    from dataprep.dedup import run_dedup

    return run_dedup(out, opts)
