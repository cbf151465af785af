"""The caption stage: images -> caption rows under ``OUT/captions``.

Worker processes read, hash and prepare images (decode, RGB, pad to square,
resize to the model's input side) while the main process runs the model, so a
GPU never waits on PNG decoding. A worker skips decoding when the image's key
already has a good row, which makes a rerun cheap. Bad images become error
rows; the run goes on.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from dataprep.engines import ChatRequest, ChatResult, Engine, EngineConfig, Sampling
from dataprep.errors import ConfigError, Reason, failure, read_failure
from dataprep.executors import ExecutorConfig, LocalExecutor, make_executor
from dataprep.images import DEFAULT_MAX_PIXELS, PrepOptions, prepare
from dataprep.promptfile import load_prompt
from dataprep.sources import ImageRef, read_bytes, stored_size
from dataprep.runtime import StageSummary
from dataprep.stage import StageRun, model_identity, provenance
from dataprep.store import CAPTIONS_SCHEMA, content_key, done_keys, sha256_text

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
    import os
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

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


def _work_hash_first(ref: ImageRef, spec: _KeySpec | None = None) -> dict[str, Any]:
    """Hash first; decode only if the key is not done (reruns skip decoding).

    ``spec`` defaults to the one a pool worker was started with."""
    import hashlib

    spec = spec or _SPEC
    uri_key = caption_key("uri:" + sha256_text(ref.uri), spec)
    try:
        size = stored_size(ref)
    except Exception:  # unknown size: read_bytes below reports the real cause
        size = None
    if size is not None and size > spec.max_bytes:
        error = failure(Reason.TOO_LARGE, f"{size} bytes exceeds --max-bytes {spec.max_bytes}")
        return {"ref": ref, "key": uri_key, "sha256": None, "error": error}
    try:
        data = read_bytes(ref)
    except Exception as exc:  # zipfile.BadZipFile (bad CRC), RuntimeError (encrypted), ...: one bad row, not a dead run
        return {"ref": ref, "key": uri_key, "sha256": None, "error": read_failure(exc)}
    digest = hashlib.sha256(data).hexdigest()
    # the image id is part of the input: two images with the same bytes (or two
    # zero-byte files) each keep their own row (compaction keeps one per key)
    key = caption_key(sha256_text(json.dumps([ref.image_id, digest])), spec)
    if key in spec.done:
        return {"ref": ref, "key": key, "sha256": digest, "skipped": True}
    prep = prepare(data, spec.prep)
    return {"ref": ref, "key": key, "sha256": digest, "prepared": prep, "error": prep.error}


def _ordered_map(refs: Iterable[ImageRef], spec: _KeySpec, workers: int, window: int) -> Iterator[dict[str, Any]]:
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


def _needs_model(item: dict[str, Any]) -> bool:
    return not item.get("skipped") and not item.get("error")


def _without_pixels(item: dict[str, Any]) -> dict[str, Any]:
    """What the writer needs of a captioned item: sizes, not pixels (Ray ships it back)."""
    prep = item.get("prepared")
    return {**item, "prepared": replace(prep, image=None)} if prep is not None else item


def caption_batch(engine: Engine, items: list[dict[str, Any]], prompt_text: str, sampling: Sampling) -> list[ChatResult]:
    """One engine call for prepared images: the caption prompt with each image; results in order."""
    requests = [
        ChatRequest(messages=[{"role": "user", "content": prompt_text}], image=it["prepared"].image, sampling=sampling, request_id=it["ref"].image_id)
        for it in items
    ]
    return engine.generate(requests)


# ------------------------------------------------------------ main side


def run_caption(
    refs: Iterable[ImageRef],
    out: Path | str,
    engine_cfg: EngineConfig,
    opts: CaptionOptions = CaptionOptions(),
    *,
    engine: Engine | None = None,
    executor: ExecutorConfig | None = None,
    progress: bool = True,
    console=None,
) -> StageSummary:
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
    walk_skips = dict(getattr(refs, "skipped", {}) or {})  # files the source walk met and did not caption
    refs = list(refs)  # refs are ids and paths; no image is read before the model loads
    folder = Path(out) / "captions"
    remote, engine = make_executor(executor, engine_cfg, engine)
    try:
        run = StageRun(
            STAGE, folder, CAPTIONS_SCHEMA, engine_cfg, engine, progress=progress, rows_per_shard=opts.rows_per_shard,
            config={"options": asdict(opts), "prompt_id": prompt.prompt_id, "prompt_sha256": prompt.sha256, "executor": (executor or ExecutorConfig()).public_dict()},
            wait_lock=opts.wait_lock,
        )
        for reason, n in sorted(walk_skips.items()):
            run.summary.extra[f"not captioned: {reason}"] = n
            run.manifest_counts[f"source_skipped.{reason}"] = n
        return _caption_rows(refs, folder, run, remote or LocalExecutor(run.engine), engine_cfg, opts, prompt)
    finally:
        if remote is not None:
            remote.close()


def _caption_rows(refs: list[ImageRef], folder: Path, run: StageRun, executor: Any, engine_cfg: EngineConfig, opts: CaptionOptions, prompt: Any) -> StageSummary:
    """The driver loop: hand the refs to the executor, write one row per image."""
    engine, summary, sampling = run.engine, run.summary, opts.sampling()

    def row(item: dict[str, Any], result=None, error=None) -> dict[str, Any]:
        prep = item.get("prepared")
        return {
            "image_id": item["ref"].image_id,
            "image_sha256": item["sha256"],
            "image_uri": item["ref"].uri,
            "image_width": getattr(prep, "width", None),
            "image_height": getattr(prep, "height", None),
            "caption": result.text if result is not None else None,
            "image_flags": getattr(prep, "flags", None),
            **provenance(key=item["key"], engine=engine, prompt_id=prompt.prompt_id, prompt_sha256=prompt.sha256, sampling=sampling, run_id=run.run_id, result=result, error=error),
        }

    with run.open(total=len(refs)):
        spec = _KeySpec(
            model=model_identity(engine, engine_cfg),
            revision=engine.revision,
            prompt_sha256=prompt.sha256,
            sampling=sampling.to_json(),
            seed=sampling.seed,
            prep=PrepOptions(mode="crop" if opts.crop else "pad", size=engine.image_size(), max_side=getattr(engine, "max_image_side", None),
                             max_pixels=opts.max_pixels, checks=opts.image_checks()),
            done=frozenset() if opts.force else frozenset(done_keys(folder)),
            max_bytes=opts.max_bytes,
        )
        # read-ahead of two batches, capped: engines without an image size
        # (openai) keep full-size padded images in memory
        window = min(max(2 * run.batch_size, 8), 64)
        results = executor.run(
            refs,
            partial(_work_hash_first, spec=spec),
            partial(caption_batch, prompt_text=prompt.text, sampling=sampling),
            wants_model=_needs_model,
            batch_size=run.batch_size,
            local_map=lambda items: _ordered_map(items, spec, opts.workers, window=window),
            slim=_without_pixels,
        )
        for item, res in results:
            if item.get("skipped"):
                summary.skipped += 1
            elif item.get("error"):
                run.writer.add(row(item, error=item["error"]))
                summary.fail(item["error"])
            else:
                error = res.error
                if error is None and not res.text.strip():
                    error = failure(Reason.EMPTY_OUTPUT, "the model returned no text")
                run.writer.add(row(item, res, error))
                if error:
                    summary.fail(error)
                else:
                    summary.done += 1
                    summary.truncated += res.finish_reason == "length"
            run.advance()
    return summary
