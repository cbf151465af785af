"""The caption stage: images -> caption rows under ``OUT/captions``.

Worker processes read, hash and prepare images (decode, RGB, pad to square,
resize to the model's input side) while the main process runs the model, so a
GPU never waits on PNG decoding. A worker skips decoding when the image's key
already has a good row, which makes a rerun cheap. Bad images become error
rows; the run goes on.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from dataprep.engines import ChatRequest, Engine, EngineConfig, Sampling
from dataprep.errors import ConfigError, Reason, failure, read_failure
from dataprep.executors import ExecutorConfig
from dataprep.images import DEFAULT_MAX_PIXELS, PrepOptions, prepare
from dataprep.promptfile import Prompt, load_prompt
from dataprep.runtime import StageSummary
from dataprep.sources import ImageRef, read_bytes, stored_size
from dataprep.stage import Generated, ModelId, ModelStage, Preparation, Tally, Task, run_model_stage
from dataprep.store import CAPTIONS_SCHEMA, content_key, sha256_text

DEFAULT_MODEL = "llava-hf/llava-1.5-13b-hf"
STAGE = "caption"
# Files above this are refused from their stat / zip header size, unread: a
# DIV2K PNG is ~5 MB and a 100 MP TIFF ~300 MB, while a 2 GiB file read
# whole per worker can exhaust the memory of a shared node.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass
class CaptionOptions:
    prompt_file: str = "caption.txt"
    crop: bool = False  # center crop instead of LLaVA-1.5's pad-to-square
    max_pixels: int = DEFAULT_MAX_PIXELS
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    force: bool = False
    rows_per_shard: int = 256
    workers: int = 2  # decode processes; 0 decodes in the main process
    max_bytes: int = DEFAULT_MAX_BYTES  # larger files become too_large rows without being read
    wait_lock: bool = False  # another run holds OUT/captions: wait for it instead of exit 2
    # image checks stored in image_flags (dataprep.imagecheck); not part of the key
    min_side: int = 128
    blank_std: float = 4.0
    max_aspect: float = 4.0

    def image_checks(self):
        """The thresholds as a validated :class:`dataprep.imagecheck.ImageChecks`."""
        from dataprep.imagecheck import ImageChecks

        return ImageChecks(min_side=self.min_side, blank_std=self.blank_std, max_aspect=self.max_aspect)

    def validate(self) -> None:
        self.image_checks()  # raises ConfigError naming --min-side / --blank-std / --max-aspect
        if self.max_bytes < 1:
            raise ConfigError(f"--max-bytes {self.max_bytes} is not positive", "--max-bytes", f"default {DEFAULT_MAX_BYTES} (256 MiB)")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} is negative", "--workers", "use 0 (in-process) or more")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1", "--max-new-tokens", "e.g. 256")
        if self.temperature < 0:
            raise ConfigError("--temperature must be >= 0", "--temperature", "0 for greedy")
        if self.max_pixels < 1:
            raise ConfigError("--max-pixels must be positive", "--max-pixels", f"default {DEFAULT_MAX_PIXELS}")
        if not 0 < self.top_p <= 1:  # vllm/openai would fail every row with it, after the model loaded
            raise ConfigError(f"--top-p {self.top_p} is outside (0, 1]", "--top-p", "e.g. 1.0")
        if self.rows_per_shard < 1:  # else ShardWriter's ValueError, after the model loaded
            raise ConfigError(f"--rows-per-shard {self.rows_per_shard} is less than 1", "--rows-per-shard", "e.g. 256")

    def sampling(self) -> Sampling:
        # greedy decoding ignores seed and top_p: keep them out of the key, so
        # changing --seed does not recaption everything to the same text
        if self.temperature == 0:
            return Sampling(temperature=0.0, max_new_tokens=self.max_new_tokens, seed=None)
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed)


# ------------------------------------------------------------ worker side (pure, picklable)


@dataclass(frozen=True)
class _KeySpec:
    model: str
    revision: str | None
    prompt_sha256: str
    sampling: str
    seed: int | None
    prep: PrepOptions
    done: frozenset = field(default_factory=frozenset)
    max_bytes: int = DEFAULT_MAX_BYTES


_SPEC: _KeySpec | None = None


def _init_worker(spec: _KeySpec, parent_pid: int | None = None) -> None:
    global _SPEC
    _SPEC = spec
    if parent_pid is not None:
        _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """End this worker when ``parent_pid`` dies, even by kill -9.

    A pool worker otherwise outlives a killed parent, blocked on its task
    queue, holding its memory. On Linux the kernel sends SIGKILL at once
    (PR_SET_PDEATHSIG); everywhere a daemon thread polls the parent pid, which
    also covers the parent dying before the prctl call.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except Exception:  # no libc symbol: the polling thread still works
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def caption_key(input_sha256: str, spec: _KeySpec) -> str:
    # the image preparation (pad vs crop) changes what the model sees, so it is
    # part of the sampling identity too
    sampling = json.dumps({"sampling": json.loads(spec.sampling), "prep": spec.prep.mode}, sort_keys=True)
    return content_key(STAGE, input_sha256, spec.model, spec.revision, spec.prompt_sha256, sampling, spec.seed)


def _work_hash_first(ref: ImageRef, spec: _KeySpec | None = None) -> Task[ImageRef]:
    """Hash first; decode only if the key is not done (reruns skip decoding).

    ``spec`` defaults to the one a pool worker was started with."""
    spec = spec or _SPEC
    uri_key = caption_key("uri:" + sha256_text(ref.uri), spec)
    try:
        size = stored_size(ref)
    except Exception:  # unknown size: read_bytes below reports the real cause
        size = None
    if size is not None and size > spec.max_bytes:
        return Task(ref, uri_key, error=failure(Reason.TOO_LARGE, f"{size} bytes exceeds --max-bytes {spec.max_bytes}"))
    try:
        data = read_bytes(ref)
    except Exception as exc:  # zipfile.BadZipFile (bad CRC), RuntimeError (encrypted), ...: one bad row, not a dead run
        return Task(ref, uri_key, error=read_failure(exc))
    digest = hashlib.sha256(data).hexdigest()
    # the image id is part of the input: two images with the same bytes (or two
    # zero-byte files) each keep their own row (compaction keeps one per key)
    key = caption_key(sha256_text(json.dumps([ref.image_id, digest])), spec)
    if key in spec.done:
        return Task(ref, key, skipped=True)
    prep = prepare(data, spec.prep)
    return Task(ref, key, error=prep.error, prepared=prep)


def _ordered_map(refs: Iterable[ImageRef], spec: _KeySpec, workers: int, window: int) -> Iterator[Task[ImageRef]]:
    """Results in input order with at most ``window`` images in flight (bounded memory)."""
    if workers == 0:
        _init_worker(spec)
        for ref in refs:
            yield _work_hash_first(ref)
        return
    # spawn: workers never inherit the parent's torch/CUDA state
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(spec, os.getpid())) as pool:
        pending: deque[Future] = deque()
        it = iter(refs)
        for ref in it:
            pending.append(pool.submit(_work_hash_first, ref))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _without_pixels(task: Task[ImageRef]) -> Task[ImageRef]:
    """What the writer needs of a captioned image: sizes, not pixels (Ray ships it back)."""
    return replace(task, prepared=replace(task.prepared, image=None)) if task.prepared is not None else task


# ------------------------------------------------------------ the stage


@dataclass
class CaptionStage(ModelStage[ImageRef, Generated]):
    """Images in, one caption row each. The key needs the image's bytes, so tasks are
    made in the decode workers (:meth:`preparation`), which skip done keys before decoding."""

    opts: CaptionOptions
    prompt: Prompt
    left_out: dict[str, int] = field(default_factory=dict)  # files the source walk met and did not caption

    name = STAGE
    folder = "captions"
    schema = CAPTIONS_SCHEMA
    images = True  # a Ray executor reads the model's image side before the first image
    prepares = True

    @property
    def sampling(self) -> Sampling:
        return self.opts.sampling()

    def spec(self, model: ModelId, done: frozenset[str] = frozenset(), engine: Any = None) -> _KeySpec:
        """What a decode worker needs: the key's parts, the done keys, how to prepare an image for ``engine``."""
        sampling = self.sampling
        size, max_side = (engine.image_size(), getattr(engine, "max_image_side", None)) if engine is not None else (None, None)
        prep = PrepOptions(mode="crop" if self.opts.crop else "pad", size=size, max_side=max_side, max_pixels=self.opts.max_pixels, checks=self.opts.image_checks())
        return _KeySpec(model=model.model, revision=model.revision, prompt_sha256=self.prompt.sha256, sampling=sampling.to_json(),
                        seed=sampling.seed, prep=prep, done=done, max_bytes=self.opts.max_bytes)

    def key(self, item: str, model: ModelId) -> str:
        """``item``: the image's input hash (of its id and bytes; of its uri when unreadable)."""
        return caption_key(item, self.spec(model))

    def preparation(self, model: ModelId, done: frozenset[str], engine: Any) -> Preparation:
        spec = self.spec(model, done, engine)
        # read-ahead of two batches, capped: engines without an image size
        # (openai) keep full-size padded images in memory
        window = min(max(2 * getattr(engine, "batch_size", 8), 8), 64)
        return Preparation(
            prepare=partial(_work_hash_first, spec=spec),
            local_map=lambda refs: _ordered_map(refs, spec, self.opts.workers, window=window),
            slim=_without_pixels,
        )

    def infer(self, engine: Engine, tasks: list[Task[ImageRef]]) -> list[Generated]:
        """One engine call: the caption prompt with each prepared image; an empty caption is a failure."""
        sampling = self.sampling
        requests = [
            ChatRequest(messages=[{"role": "user", "content": self.prompt.text}], image=t.prepared.image, sampling=sampling, request_id=t.input.image_id)
            for t in tasks
        ]
        return [
            Generated(r, sampling, r.error if r.error is not None or r.text.strip() else failure(Reason.EMPTY_OUTPUT, "the model returned no text"))
            for r in engine.generate(requests)
        ]

    def row(self, task: Task[ImageRef], out: Generated | None) -> dict[str, Any]:
        prep = task.prepared
        return {
            "image_id": task.input.image_id,
            "image_sha256": getattr(prep, "sha256", None),
            "image_uri": task.input.uri,
            "image_width": getattr(prep, "width", None),
            "image_height": getattr(prep, "height", None),
            "caption": out.result.text if out is not None else None,
            "image_flags": getattr(prep, "flags", None),
        }

    def tally(self) -> Tally:
        return _LeftOut(self.left_out)


class _LeftOut(Tally):
    def __init__(self, left_out: dict[str, int]):
        self.left_out = sorted(left_out.items())

    def extra(self) -> dict[str, Any]:
        return {f"not captioned: {reason}": n for reason, n in self.left_out}

    def counts(self) -> dict[str, int]:
        return {f"source_skipped.{reason}": n for reason, n in self.left_out}


def run_caption(refs: Iterable[ImageRef], out: Path | str, engine_cfg: EngineConfig, opts: CaptionOptions = CaptionOptions(), *,
                engine: Engine | None = None, executor: ExecutorConfig | None = None, progress: bool = True, console=None) -> StageSummary:
    """Caption every image of ``refs`` into ``out/captions``; returns the summary.

    Configuration is checked and the model loaded before any image is read.
    Pass ``engine`` to reuse a loaded model (Prefect tasks, the pipeline command).
    ``executor`` (default local) says where decoding and the model run; with
    Ray the replicas load the model and this process only writes the rows.
    """
    opts.validate()
    prompt = load_prompt(opts.prompt_file)
    if not engine_cfg.model:
        engine_cfg.model = DEFAULT_MODEL
    stage = CaptionStage(opts, prompt, left_out=dict(getattr(refs, "skipped", {}) or {}))
    return run_model_stage(stage, refs, out, engine_cfg, engine=engine, executor=executor, progress=progress,
                           force=opts.force, rows_per_shard=opts.rows_per_shard, wait_lock=opts.wait_lock)
