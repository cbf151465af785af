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
from dataprep.imagecheck import ImageChecks
from dataprep.images import DEFAULT_MAX_PIXELS, PrepOptions, prepare
from dataprep.promptfile import Prompt, load_prompt
from dataprep.runtime import MAX_NEW_TOKENS_HELP, StageOptions, StageSummary, TOP_P_HELP, at_least, option, wait_lock_help
from dataprep.sources import ImageRef, read_bytes, stored_size
from dataprep.stage import Generated, ModelId, ModelStage, Preparation, Tally, Task, run_model_stage
from dataprep.store import CAPTIONS_SCHEMA, content_key, sha256_text

DEFAULT_MODEL = "llava-hf/llava-1.5-13b-hf"
STAGE = "caption"
# Files above this are refused from their stat / zip header size, unread: a
# DIV2K PNG is ~5 MB and a 100 MP TIFF ~300 MB, while a 2 GiB file read
# whole per worker can exhaust the memory of a shared node.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CaptionOptions(StageOptions):
    """What to caption and how; the fields are the caption commands' flags. Invalid values cannot be built."""

    prompt_file: str = option("caption.txt", "Caption prompt file; a bare name means the shipped prompts/ file.", panel="Caption")
    crop: bool = option(False, "Center-crop to a square instead of padding with the CLIP mean colour (LLaVA-1.5's default; a crop drops up to a third of a DIV2K frame).", panel="Caption")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Images with more pixels are rejected as error rows (decompression-bomb guard).", panel="Caption")
    temperature: float = option(0.0, "0 = greedy (default); > 0 samples.", panel="Sampling")
    top_p: float = option(1.0, TOP_P_HELP, panel="Sampling")
    max_new_tokens: int = option(256, MAX_NEW_TOKENS_HELP, panel="Sampling")
    workers: int = option(2, "Decode processes (0 = decode in the main process).", panel="Run")
    # larger files become too_large rows without being read
    max_bytes: int = option(DEFAULT_MAX_BYTES, "Files larger than this many bytes become too_large error rows, decided from the file size without reading it (default 256 MiB).", panel="Caption")
    wait_lock: bool = option(False, wait_lock_help("captions"), panel="Run")
    # image checks stored in image_flags (dataprep.imagecheck); not part of the key
    min_side: int = option(128, "Image check: flag 'small' when the shorter side is below this many pixels (0 = off). Stored in image_flags; not part of the row key.", panel="Image checks")
    blank_std: float = option(4.0, "Image check: flag 'blank' when the grey-level standard deviation (0-255) is below this (0 = off).", panel="Image checks")
    max_aspect: float = option(4.0, "Image check: flag 'aspect' when long side / short side exceeds this.", panel="Image checks")

    def image_checks(self):
        """The thresholds as a validated :class:`dataprep.imagecheck.ImageChecks`."""
        return ImageChecks(min_side=self.min_side, blank_std=self.blank_std, max_aspect=self.max_aspect)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.image_checks()  # raises ConfigError naming --min-side / --blank-std / --max-aspect
        at_least(self.max_bytes, 1, "--max-bytes", f"default {DEFAULT_MAX_BYTES} (256 MiB)")
        at_least(self.workers, 0, "--workers", "use 0 (in-process) or more")
        at_least(self.max_new_tokens, 1, "--max-new-tokens", "e.g. 256")
        at_least(self.temperature, 0, "--temperature", "0 for greedy")
        at_least(self.max_pixels, 1, "--max-pixels", f"default {DEFAULT_MAX_PIXELS}")
        if not 0 < self.top_p <= 1:  # vllm/openai would fail every row with it, after the model loaded
            raise ConfigError(f"--top-p {self.top_p} is outside (0, 1]", "--top-p", "e.g. 1.0")

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
    prompt = load_prompt(opts.prompt_file)
    if not engine_cfg.model:
        engine_cfg.model = DEFAULT_MODEL
    stage = CaptionStage(opts, prompt, left_out=dict(getattr(refs, "skipped", {}) or {}))
    return run_model_stage(stage, refs, out, engine_cfg, engine=engine, executor=executor, progress=progress,
                           force=opts.force, rows_per_shard=opts.rows_per_shard, wait_lock=opts.wait_lock)
