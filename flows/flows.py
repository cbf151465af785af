"""Prefect flows: caption -> rewrite -> batches (``prepare``), then the hand-off to
``train`` and ``evaluate_edit`` through events. Wiring only.

Parameters are plain JSON values so the UI and ``run_deployment`` can set
them; the ``*_options`` dicts map one-to-one onto the stages' option
dataclasses (``CaptionOptions``, ``RewriteOptions``, ``BatchOptions``,
``TrainConfig``, ``EvalConfig``) and ``engine`` onto ``EngineConfig``, so every
CLI flag is reachable without a flow parameter of its own.

Events (the hand-off contract):

- ``softrepa.shards.written``, resource ``softrepa.shards.<dataset>.<preset>``,
  emitted by ``batches`` only when it wrote shards that were not there before;
  payload: ``shards`` (absolute paths), ``dataset``, ``preset``, ``run_dir``
  (captions + edits, the evaluator's pairs), ``train`` and ``evaluate``
  (options handed on from ``prepare``).
- ``softrepa.tokens.written``, resource ``softrepa.tokens.<dataset>.<preset>``
  with label ``softrepa.evaluate`` = ``true``/``false``, emitted by ``train``;
  payload: ``tokens`` (folder), ``model``, ``pairs``, ``evaluate``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from dataprep.batches import BatchOptions, apply_quality, attach_edits, load_caption_index, run_id_for
from dataprep.caption import CaptionOptions, DEFAULT_MODEL as CAPTION_MODEL
from dataprep.engines import EngineConfig
from dataprep.errors import ConfigError
from dataprep.runtime import StageSummary
from dataprep.rewrite import DEFAULT_MODEL as REWRITE_MODEL, RewriteOptions, inputs_from_captions
from dataprep.store import shard_paths
from flows import artifacts
from flows.defaults import DEFAULT_DATA, DEFAULT_OUT
from flows.tasks import SHARD_TIMEOUT_S, build_batches_task, caption_shard, chunks, evaluate_task, gpu_slot, release_engines, rewrite_shard, train_task, uses_local_gpu
from flows.tasks import dedup_task, judge_task
from softrepa.paper import BACKBONE_MODELS, SD3_MODEL
from dataprep.executors import ExecutorConfig
from dataprep.judge import JudgeOptions
from dataprep.promptfile import load_prompt
from dataprep.report import ReportOptions, build_report
from dataprep.sources import div2k, folder
from softrepa.metrics import MetricConfig

SHARDS_EVENT = "softrepa.shards.written"
TOKENS_EVENT = "softrepa.tokens.written"
# the flows' own defaults; the stages' defaults are their options dataclasses' and model constants
DATASET = "div2k"  # the dataset label of events, artifacts and training folders
SOURCE, SPLIT = "div2k", "train"
SHARD_SIZE = 256  # items per shard task
PRESET = BatchOptions.preset  # the batch grid, and the backbone trained on it


def build(cls: type, options: dict[str, Any] | None, flag: str, *, locked: str | None = None, **fixed: Any) -> Any:
    """``cls(**fixed, **options)`` with unknown option names rejected by name.

    ``options`` override ``fixed`` defaults, unless ``locked`` is given: then
    naming a fixed field is a ConfigError whose fix is ``locked`` (the recipe
    sets those fields itself).
    """
    options = dict(options or {})
    names = sorted(f.name for f in fields(cls))
    # init-only names count too: parameters saved under an earlier name (TrainConfig's precision)
    unknown = sorted(set(options) - set(inspect.signature(cls).parameters))
    if unknown:
        raise ConfigError(f"unknown {flag} option(s) {unknown}", flag, f"use fields of {cls.__name__}: {', '.join(names)}")
    taken = sorted(set(options) & set(fixed))
    if locked is not None and taken:
        raise ConfigError(f"{flag} option(s) {taken} cannot be given here", flag, locked)
    # JSON has lists where the dataclasses use tuples
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return cls(**{**fixed, **options})


def _refs(source: str, data: str, split: str, ids: str | None, limit: int | None) -> list:
    if source == "div2k":
        return div2k(data, split=split, ids=ids, limit=limit)
    if source == "folder":
        return folder(data, limit=limit)
    raise ConfigError(f"unknown source {source!r}", "source", "use div2k or folder")


def _run_shards(dataset: str, stage: str, out: Path, cfg: EngineConfig, calls: list[tuple[Any, dict[str, Any], int]], timeout_s: float | None = None, local_gpu: bool | None = None) -> StageSummary:
    """Submit one stage's shard tasks to the flow's task runner and gather them in order.

    The flows' own runner takes one shard at a time (one engine load for all,
    under the GPU slot); a distributed runner given with
    ``flow.with_options(task_runner=...)`` runs them on its workers, each
    loading its own engine. Each task gets ``timeout_s``: a hung engine call
    fails the shard, which the task's retries then redo.
    """
    progress = artifacts.Progress(dataset, stage, len(calls))
    parts = []
    with gpu_slot(uses_local_gpu(cfg) if local_gpu is None else local_gpu):
        try:
            futures = [(fn.with_options(timeout_seconds=timeout_s).submit(**kwargs), n) for fn, kwargs, n in calls]
            for future, n in futures:
                future.wait()
                state = future.state
                summary = state.result()  # a failed shard (after its retries) fails the flow
                parts.append((summary, n, state.name == "Cached"))
                progress.advance()
        finally:
            release_engines()  # leave the card before the next stage's model loads
    total = artifacts.merge_summaries(stage, out, parts)
    artifacts.publish_counts(dataset, total)
    return total


def _ray(executor: Any) -> dict[str, Any]:
    """The executor argument of a shard task: only when it is Ray (local calls keep their cache keys)."""
    return {"executor": executor} if executor.is_ray else {}


def _shards(items: list, shard_size: int, executor: Any, timeout_s: float | None) -> tuple[list[list], float | None]:
    """(task inputs, per-task timeout). On Ray the whole stage is one task (one
    replica pool, each model loaded once) with the timeout of all its shards."""
    shards = chunks(items, shard_size)
    if executor.is_ray and shards:
        return [list(items)], (timeout_s * len(shards) if timeout_s else None)
    return shards, timeout_s


def _stage_configs(model: str, engine: dict | None, options_cls: type, options: dict | None, options_flag: str, executor: dict | None) -> tuple[Any, Any, Any]:
    """(EngineConfig, the stage's options, ExecutorConfig) of a model stage's flow parameters, each checked as built."""
    return build(EngineConfig, engine, "engine", model=model), build(options_cls, options, options_flag), build(ExecutorConfig, executor, "executor")


def _model_stage(dataset: str, stage: str, store: Path, shard_task: Any, items_arg: str, items: list, cfg: Any, opts: Any, ex: Any,
                 shard_size: int, task_timeout_s: float | None, prompt_file: str, prompt_flag: str = "--prompt-file") -> StageSummary:
    """A model stage as shard tasks: ``shard_task(<items_arg>=shard, ...)`` per ``shard_size`` items, gathered in order."""
    prompt_sha = load_prompt(prompt_file, flag=prompt_flag).sha256
    shards, timeout_s = _shards(items, shard_size, ex, task_timeout_s)
    run = store.parent
    calls = [(shard_task, {items_arg: shard, "out": run, "engine_cfg": cfg, "opts": opts, "prompt_sha256": prompt_sha, **_ray(ex)}, len(shard)) for shard in shards]
    return _run_shards(dataset, stage, store, cfg, calls, timeout_s, local_gpu=uses_local_gpu(cfg) and not ex.is_ray)


# One shard at a time in the flow's process: shards share one loaded engine
# (flows.tasks.engine_for), which is not thread-safe.
SHARD_RUNNER = ThreadPoolTaskRunner(max_workers=1)


@flow(name="caption", log_prints=True, task_runner=SHARD_RUNNER)
def caption(
    data: str = DEFAULT_DATA,
    out: str = DEFAULT_OUT,
    dataset: str = DATASET,
    source: str = SOURCE,
    split: str = SPLIT,
    ids: str | None = None,
    limit: int | None = None,
    model: str = CAPTION_MODEL,
    engine: dict[str, Any] | None = None,
    caption_options: dict[str, Any] | None = None,
    shard_size: int = SHARD_SIZE, executor: dict[str, Any] | None = None, task_timeout_s: float | None = SHARD_TIMEOUT_S,  # how the shards run
) -> StageSummary:
    """Caption the images of ``data`` into ``out/captions``, one task per ``shard_size`` images.

    ``executor``: ExecutorConfig fields (e.g. ``{"executor": "ray", "replicas": 4}``);
    ``task_timeout_s``: seconds a shard task may run (None: no limit).
    """
    cfg, opts, ex = _stage_configs(model, engine, CaptionOptions, caption_options, "caption_options", executor)
    refs = _refs(source, data, split, ids, limit)  # paths are checked before a model loads
    run = Path(out).resolve()
    summary = _model_stage(dataset, "caption", run / "captions", caption_shard, "refs", refs, cfg, opts, ex, shard_size, task_timeout_s, opts.prompt_file)
    artifacts.publish_markdown(f"{dataset}-caption-shards", artifacts.links_markdown("caption", {"captions": run / "captions"}))
    return summary


@flow(name="rewrite", log_prints=True, task_runner=SHARD_RUNNER)
def rewrite(
    out: str = DEFAULT_OUT,
    dataset: str = DATASET,
    model: str = REWRITE_MODEL,
    engine: dict[str, Any] | None = None,
    rewrite_options: dict[str, Any] | None = None,
    shard_size: int = SHARD_SIZE, executor: dict[str, Any] | None = None, task_timeout_s: float | None = SHARD_TIMEOUT_S,  # how the shards run
) -> StageSummary:
    """Rewrite every caption in ``out/captions`` into ``out/edits``, one task per ``shard_size`` captions.

    ``executor`` and ``task_timeout_s`` as in :func:`caption`.
    """
    cfg, opts, ex = _stage_configs(model, engine, RewriteOptions, rewrite_options, "rewrite_options", executor)
    run = Path(out).resolve()
    items = inputs_from_captions(run / "captions")  # caption error rows included: the stage counts them
    summary = _model_stage(dataset, "rewrite", run / "edits", rewrite_shard, "items", items, cfg, opts, ex, shard_size, task_timeout_s, opts.rules_file, "--rules")
    artifacts.publish_rules(dataset, run / "edits")
    artifacts.publish_quality(dataset, run)
    artifacts.publish_markdown(f"{dataset}-rewrite-shards", artifacts.links_markdown("rewrite", {"captions": run / "captions", "edits": run / "edits"}))
    return summary


def shards_event(dataset: str, preset: str, shards: list[Path], run_dir: Path, train: dict[str, Any] | None, evaluate: dict[str, Any] | None) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(event name, resource, payload) announcing new batch shards (pure, for tests)."""
    resource = {"prefect.resource.id": f"softrepa.shards.{dataset}.{preset}", "prefect.resource.name": f"{dataset} {preset} batch shards", "softrepa.dataset": dataset, "softrepa.preset": preset}
    payload = {"shards": [str(Path(p).resolve()) for p in shards], "dataset": dataset, "preset": preset, "run_dir": str(run_dir), "train": train or {}, "evaluate": evaluate}
    return SHARDS_EVENT, resource, payload


@flow(name="batches", log_prints=True)
def batches(
    out: str = DEFAULT_OUT,
    dataset: str = DATASET,
    preset: str = PRESET,
    use_edits: bool = True,
    batch_options: dict[str, Any] | None = None,
    train_options: dict[str, Any] | None = None,
    eval_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Contrastive batch shards in ``out/batches/<preset>``; announces new ones.

    ``train_options`` and ``eval_options`` ride along in the event.
    Returns the summary, the new shards and the emitted event (None if none).
    """
    opts = build(BatchOptions, batch_options, "batch_options", preset=preset)
    run = Path(out).resolve()
    folder = run / "batches" / preset
    edits = run / "edits" if use_edits and shard_paths(run / "edits") else None
    existing = finished_batches(run / "captions", edits, folder, opts)
    if existing is not None:  # same captions, edits and options as a finished run: nothing to redo
        run_id, shards = existing
        get_run_logger().info("batches up to date (run %s, %d shards); no hand-off", run_id, len(shards))
        artifacts.publish_table(f"{dataset}-batches-{preset}-counts", [{"metric": "up to date: run", "value": run_id}, {"metric": "shards", "value": len(shards)}, {"metric": "new shards", "value": 0}], f"batches ({preset}): nothing new")
        artifacts.publish_quality(dataset, run)
        return {"summary": None, "shards": shards, "new_shards": [], "event": None}
    before = {p.name for p in shard_paths(folder)}
    summary = build_batches_task(run / "captions", folder, opts, edits)
    new = [p for p in summary.shards if p.name not in before]
    rows = [{"metric": k, "value": v} for k, v in (("batches", summary.batches), ("positives", summary.positives), ("hard negatives", summary.hard_negatives), ("negatives", summary.negatives), ("images", summary.images), ("dropped images (drop_last)", summary.dropped_images), ("unfillable batches", summary.unfillable_batches), ("edits available", summary.edits_available), ("edits unused", summary.edits_unused), ("shards written", len(summary.shards)), ("new shards", len(new)), ("seconds", round(summary.seconds, 2)))]
    rows += [{"metric": f"skipped: {k}", "value": v} for k, v in summary.skipped.items()]
    artifacts.publish_table(f"{dataset}-batches-{preset}-counts", rows, f"batches ({preset}): grid contents and shards")
    artifacts.publish_quality(dataset, run)
    artifacts.publish_markdown(f"{dataset}-batches-{preset}-shards", artifacts.links_markdown(f"batches ({preset})", {"batches": folder}))
    event = None
    if new:
        from prefect.events import emit_event

        name, resource, payload = shards_event(dataset, preset, summary.shards, run, train_options, eval_options)
        event = emit_event(name, resource=resource, payload=payload)
        get_run_logger().info("emitted %s for %d new shards (%s)", name, len(new), resource["prefect.resource.id"])
    elif not summary.shards:
        get_run_logger().warning("no batch could be filled (%d unfillable, %d images dropped); no hand-off", summary.unfillable_batches, summary.dropped_images)
    return {"summary": summary, "shards": summary.shards, "new_shards": new, "event": event}


def finished_batches(captions: Path, edits: Path | None, folder: Path, opts: Any) -> tuple[str, list[Path]] | None:
    """(run id, shards) when ``folder`` holds a complete run for these inputs and options.

    The batch run id is a function of the options and the input index
    (dataprep.batches.run_id_for); a finished run left ``_run-<id>.json`` listing
    its shards. Rebuilding would only rewrite identical bytes.
    """
    index = load_caption_index(captions)
    if edits is not None:
        attach_edits(index, edits)
    # the judge filter and the dedup rule change the index, hence the run id
    index = apply_quality(index, opts, {}, None if edits is None else Path(edits).parent / "judge", Path(captions).parent / "dedup")
    run_id = run_id_for(opts, index.fingerprint())
    record = folder / f"_run-{run_id}.json"
    if not record.exists():
        return None
    shards = [folder / name for name in json.loads(record.read_text()).get("shards", [])]
    return (run_id, shards) if shards and all(p.is_file() for p in shards) else None


@flow(name="prepare", log_prints=True)
def prepare(
    data: str = DEFAULT_DATA, source: str = SOURCE, split: str = SPLIT, ids: str | None = None, limit: int | None = None,  # the images
    out: str = DEFAULT_OUT,
    dataset: str = DATASET,
    engine: dict[str, Any] | None = None,  # both models
    caption_model: str = CAPTION_MODEL, caption_options: dict[str, Any] | None = None,
    rewrite_model: str = REWRITE_MODEL, rewrite_options: dict[str, Any] | None = None,
    preset: str = PRESET, batch_options: dict[str, Any] | None = None,
    train_options: dict[str, Any] | None = None, eval_options: dict[str, Any] | None = None,  # handed on to training
    make_report: bool = True, report_options: dict[str, Any] | None = None,
    shard_size: int = SHARD_SIZE, executor: dict[str, Any] | None = None, task_timeout_s: float | None = SHARD_TIMEOUT_S,  # how the shards run
) -> dict[str, Any]:
    """caption -> rewrite -> batches -> the HTML report; new shards are handed to training by event.

    ``engine`` applies to both models (device, dtype, batch size, ...).
    ``train_options`` (TrainConfig fields, e.g. model, steps, out) and
    ``eval_options`` (EvalConfig fields; None: no evaluation) travel with the event.
    ``make_report``: write OUT/report (``report_options``: ReportOptions fields).
    ``executor`` and ``task_timeout_s`` apply to caption and rewrite (see :func:`caption`).
    """
    cap = caption(data=data, out=out, dataset=dataset, source=source, split=split, ids=ids, limit=limit, model=caption_model, engine=engine, caption_options=caption_options, shard_size=shard_size, executor=executor, task_timeout_s=task_timeout_s)
    rew = rewrite(out=out, dataset=dataset, model=rewrite_model, engine=engine, rewrite_options=rewrite_options, shard_size=shard_size, executor=executor, task_timeout_s=task_timeout_s)
    bat = batches(out=out, dataset=dataset, preset=preset, batch_options=batch_options, train_options=train_options, eval_options=eval_options)
    rep = report(out=out, dataset=dataset, report_options=report_options) if make_report else None
    return {"caption": cap, "rewrite": rew, "batches": bat, "report": rep}


def shard_folder(shards: list[str], root: Path) -> Path:
    """A folder of links to exactly ``shards`` (the trainer reads a folder).

    Named by the shard set, so the same set maps to the same folder and a
    rerun resumes there.
    """
    paths = [Path(s).resolve() for s in shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"batch shards not found: {missing[:3]}", "shards", "pass shard paths written by the batches flow")
    digest = hashlib.sha256("\n".join(sorted(map(str, paths))).encode()).hexdigest()[:12]
    folder = root / f"shards-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted(paths)):
        link = folder / f"part-{i:05d}-{p.name.removeprefix('part-')}"
        if not link.exists():
            link.symlink_to(p)
    return folder


@flow(name="train", log_prints=True)
def train(
    shards: list[str],
    preset: str = PRESET,
    dataset: str = DATASET,
    run_dir: str | None = None,
    train_options: dict[str, Any] | None = None,
    eval_options: dict[str, Any] | None = None,
) -> Any:
    """Train soft tokens on exactly ``shards`` (softrepa.train); then announce the tokens.

    ``train_options``: TrainConfig fields (model defaults to the preset's paper
    backbone, out to ``<run_dir>/train/<preset>-<shard set>``).
    """
    from softrepa.train import TrainConfig

    options = dict(train_options or {})
    model = options.pop("model", None) or BACKBONE_MODELS.get(preset, "")
    base = Path(run_dir).resolve() if run_dir else Path(shards[0]).resolve().parent.parent.parent
    inputs = shard_folder(shards, base / "train" / "inputs")
    out = options.pop("out", None) or str(base / "train" / f"{preset}-{inputs.name.removeprefix('shards-')}")
    options.setdefault("progress", False)
    # the link folder has no completion record of its own; the batches flow
    # announces shards only after its run wrote _run-<id>.json, so they are whole
    options.setdefault("allow_partial", True)
    cfg = build(TrainConfig, options, "train", preset=preset, batches=str(inputs), model=model, out=out)
    cfg.validate()
    with gpu_slot(getattr(cfg, "device", "auto") != "cpu"):
        result = train_task(cfg)
    artifacts.publish_table(
        f"{dataset}-train-{preset}",
        [{"metric": "steps", "value": result.steps}, {"metric": "final loss", "value": round(result.final_loss, 5)}, {"metric": "mean accuracy", "value": round(result.mean_accuracy, 4)}, {"metric": "seconds", "value": round(result.seconds, 1)}, {"metric": "shards", "value": len(shards)}]
        + [{"metric": f"skipped rows: {k}", "value": v} for k, v in result.skipped.items()],
        f"soft-token training ({preset}) on {len(shards)} shards",
    )
    artifacts.publish_markdown(f"{dataset}-train-{preset}-tokens", f"## tokens ({preset})\n\n- tokens: [{result.tokens_dir}]({Path(result.tokens_dir).resolve().as_uri()})\n- log: [{result.log_path}]({Path(result.log_path).resolve().as_uri()})\n")
    artifacts.publish_views(f"{dataset}-train-{preset}-views", base, {"training curves": Path(out) / "curves.png"})
    from prefect.events import emit_event

    evaluable = eval_options is not None and preset == "sd3"  # FlowEdit is defined on SD3
    emit_event(
        TOKENS_EVENT,
        resource={"prefect.resource.id": f"softrepa.tokens.{dataset}.{preset}", "softrepa.evaluate": str(evaluable).lower()},
        payload={"tokens": str(Path(result.tokens_dir).resolve()), "model": model, "pairs": str(base), "preset": preset, "evaluate": eval_options or {}},
    )
    return result


@flow(name="evaluate_edit", log_prints=True)
def evaluate_edit(pairs: str, model: str = SD3_MODEL, tokens: str | None = None, out: str | None = None, eval_options: dict[str, Any] | None = None) -> Any:
    """FlowEdit with and without soft tokens on the caption/edit pairs of a run (softrepa.evaluate)."""
    from softrepa.evaluate import EvalConfig

    options = dict(eval_options or {})
    metrics = build(MetricConfig, options.pop("metrics", None), "evaluate.metrics")
    out = out or options.pop("out", None) or str(Path(pairs).resolve() / "eval" / (Path(tokens).name if tokens else "vanilla"))
    options.setdefault("progress", False)
    cfg = build(EvalConfig, options, "evaluate", pairs=pairs, model=model, out=out, tokens=tokens, metrics=metrics)
    cfg.validate()
    with gpu_slot(cfg.device != "cpu"):
        result = evaluate_task(cfg)
    artifacts.publish_table("evaluate-edit-summary", result.table, "FlowEdit with/without soft tokens (rows: method x target CFG)")
    artifacts.publish_markdown("evaluate-edit-report", result.markdown or f"scores: {result.scores_path}", "evaluation summary")
    artifacts.publish_views("evaluate-edit-views", pairs if Path(pairs).is_dir() else None, {"editing grids": Path(out) / "grids" / "index.html"})
    return result


@flow(name="report", log_prints=True)
def report(out: str = DEFAULT_OUT, dataset: str = DATASET, report_options: dict[str, Any] | None = None) -> str:
    """The static HTML report of a run (dataprep.report) in OUT/report; returns its index.html path."""
    options = dict(report_options or {})
    folder = options.pop("out", None) or str(Path(out) / "report")
    opts = build(ReportOptions, options, "report")
    result = build_report(out, folder, opts)
    artifacts.publish_table(f"{dataset}-report", [{"metric": "images", "value": result.cards}, {"metric": "thumbnails", "value": result.thumbs}, {"metric": "without thumbnail", "value": result.thumb_errors}], "the run's HTML report")
    artifacts.publish_views(f"{dataset}-views", out, {"report": result.index})
    return str(result.index)


@flow(name="judge", log_prints=True)
def judge(out: str = DEFAULT_OUT, dataset: str = DATASET, model: str = REWRITE_MODEL, engine: dict[str, Any] | None = None, judge_options: dict[str, Any] | None = None) -> StageSummary:
    """Grade ``out/edits`` with an instruction model into ``out/judge``; publishes the checker x judge table.

    Run it before ``batches`` with ``batch_options={"require_judge": true}`` to keep only judged-good edits.
    """
    cfg = build(EngineConfig, engine, "engine", model=model)
    opts = build(JudgeOptions, judge_options, "judge_options")
    run = Path(out).resolve()
    with gpu_slot(uses_local_gpu(cfg)):
        try:
            summary = judge_task(run, cfg, opts)
        finally:
            release_engines()
    artifacts.publish_counts(dataset, summary)
    artifacts.publish_quality(dataset, run)
    return summary


@flow(name="dedup", log_prints=True)
def dedup(out: str = DEFAULT_OUT, dataset: str = DATASET, dedup_options: dict[str, Any] | None = None) -> Any:
    """Duplicate clusters of ``out/captions`` into ``out/dedup``; ``batches`` then keeps cluster members apart."""
    from dataprep.dedup import DedupOptions

    opts = build(DedupOptions, dedup_options, "dedup_options")
    run = Path(out).resolve()
    summary = dedup_task(run, opts)
    artifacts.publish_quality(dataset, run)
    return summary
