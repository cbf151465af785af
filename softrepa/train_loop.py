"""The training loop of ``softrepa train`` (see :mod:`softrepa.train` for what one step does).

:func:`run_training` runs one process's share of a run: it reads the rows,
holds out the evaluation images, loads the frozen model, resumes from the
newest checkpoint, trains step after step, evaluates and checkpoints, and
writes the final tokens; :func:`report` writes the run's manifest and builds
its summary the way every data stage does.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dataprep.errors import ConfigError, Reason, failure, reason_of
from dataprep.runtime import StageSummary, progress_bar
from dataprep.store import Manifest, new_run_id, utcnow
from softrepa.backbone import PromptCache, encode_images, load_image, load_parts
from softrepa.checkpoints import (TRAIN_CONFIG, TrainedImages, checkpoint_dirs, checkpoint_resolution, load_checkpoint, read_train_config, save_checkpoint, save_token_dir,
                                  truncate_log, write_json)
from softrepa.curves import write_curves
from softrepa.distributed import Group, process_device
from softrepa.heldout import ClipEval, hold_out, read_prompt_file
from softrepa.sample import DEFAULT_GUIDANCE, DEFAULT_STEPS
from softrepa.tokens import SoftTokens, wrap_model
from softrepa.train_data import RowStream, check_row, read_batch_rows, slot_generator
from softrepa.train_step import assert_only_tokens_train, init_tokens, loss_backward, make_optimizer, token_config, training_precision


@dataclass
class TrainResult:
    tokens_dir: Path
    steps: int  # optimizer steps done in total (including before a resume)
    final_loss: float
    mean_accuracy: float  # over the steps of this run
    log_path: Path
    skipped: dict[str, int] = field(default_factory=dict)  # batch rows skipped, by reason
    seconds: float = 0.0
    best_dir: Path | None = None  # tokens with the best held-out CLIP score (None: evaluation off)
    best_clip: float | None = None
    best_step: int | None = None
    curves: Path | None = None  # curves.png (None: not drawn, see curves_note)
    curves_note: str | None = None
    world: int = 1  # data-parallel processes
    main: bool = True  # False in every process but the first (which wrote the outputs)
    summary: StageSummary | None = None  # the first process's summary (print it with dataprep.runtime.print_summary)
    manifest_path: Path | None = None  # OUT/_manifest.json (first process)


def run_training(cfg: Any, group: Group, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """The loop behind :func:`softrepa.train.train` (``cfg``: a ``TrainConfig``), in one process of ``group``."""
    cfg.validate()
    rows = read_batch_rows(cfg.batches, cfg.batch_run, cfg.allow_partial)
    if not rows:
        raise ConfigError(f"no batch shards (part-*.parquet) in {cfg.batches}", "--batches", "run `dataprep batches` first")
    presets = {r["preset"] for r in rows if r.get("preset")}
    if presets and presets != {cfg.preset}:
        raise ConfigError(f"shards were built for preset(s) {sorted(presets)}, not {cfg.preset}", "--preset", "train with the preset the batches were built for")
    out = Path(cfg.out)
    checkpoints = checkpoint_dirs(out)
    if not cfg.resume and (checkpoints or (out / "tokens").exists()):
        raise ConfigError(f"{out} already holds a training run", "--out", "pass --resume to continue it, or choose a new --out")
    resumed_at = None
    if cfg.resume and checkpoints:  # the size the steps so far ran at (a run from before checkpoints named it: its config)
        resumed_at = checkpoint_resolution(checkpoints[-1]) or (read_train_config(out) or {}).get("resolution_used")
    if resumed_at is not None and cfg.model_resolution is not None:
        _check_resume_resolution(checkpoints[-1], resumed_at, cfg.model_resolution)  # before the model loads
    eval_prompts: list[str] = []
    held = None
    if cfg.best_by == "clip":
        if cfg.eval_prompts is not None:
            eval_prompts = read_prompt_file(cfg.eval_prompts)
        else:
            held = hold_out(rows, cfg.eval_holdout, cfg.seed)
            rows, eval_prompts = held.rows, held.prompts
    group.barrier()  # every process has looked at --out before the first one writes there
    if group.main:
        out.mkdir(parents=True, exist_ok=True)

    device, dtype, autocast_dtype = training_precision(cfg.dtype, process_device(group, cfg.device))
    parts = load_parts(cfg.model, cfg.preset, device, dtype, cfg.model_resolution)
    if resumed_at is not None:
        _check_resume_resolution(checkpoints[-1], resumed_at, parts.resolution)  # "native" is known only now
    tcfg = token_config(cfg, parts.denoiser)
    prompts = PromptCache(parts)
    torch.manual_seed(cfg.seed)
    tokens = SoftTokens(tcfg)
    init_tokens(tokens, parts, prompts)
    tokens.to(device)
    for p in tokens.parameters():  # identical on every process by construction; make it so regardless
        group.broadcast_(p.data)
    model = wrap_model(parts.denoiser, tokens)
    if cfg.gradient_checkpointing:
        # the token hooks run again on recomputation and reuse this call's tokens
        parts.denoiser.enable_gradient_checkpointing()
    assert_only_tokens_train(parts, tokens)
    optimizer, scheduler = make_optimizer(tokens, cfg)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None

    slots = group.world * cfg.accumulate
    mine = list(range(group.rank * cfg.accumulate, (group.rank + 1) * cfg.accumulate))
    gens = {k: slot_generator(cfg.seed, k) for k in mine}
    trained = TrainedImages(rows)
    step, cursor = 0, 0
    best_clip: float | None = None
    best_step: int | None = None
    log_path = out / "train_log.jsonl"
    if cfg.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1])
        saved = state.get("generators") or ([state["generator"]] if "generator" in state else [])
        if len(saved) != slots:
            raise ConfigError(f"{checkpoints[-1]} was written by a run training {len(saved)} rows per step; this run trains {slots} (processes x --accumulate)",
                              "--accumulate", "resume with the same number of processes x --accumulate")
        tokens.load_state_dict(state["tokens"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for k in mine:
            gens[k].set_state(saved[k])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, cursor = int(state["step"]), int(state["cursor"])
        best_clip, best_step = state.get("best_clip"), state.get("best_step")
        trained.ids.update(state.get("trained_image_ids") or [])
        if group.main:
            truncate_log(log_path, step)
    evaluator = None
    if eval_prompts:
        evaluator = ClipEval(parts, eval_prompts, cfg.eval_clip_model, steps=cfg.eval_steps or DEFAULT_STEPS[cfg.preset],
                             guidance=DEFAULT_GUIDANCE[cfg.preset] if cfg.eval_guidance is None else cfg.eval_guidance,
                             size=cfg.eval_size, batch_size=cfg.eval_batch_size, seed=cfg.seed, group=group, autocast_dtype=autocast_dtype)

    run_id, started_at = new_run_id(), utcnow().isoformat()
    meta = {"preset": cfg.preset, "model": cfg.model, "resolution": parts.resolution}
    if group.main:
        heldout = None if held is None else {"image_ids": held.image_ids, "prompts": held.prompts, "rows_dropped": held.rows_dropped,
                                             "image_slots_removed": held.slots_removed}
        write_json(out / TRAIN_CONFIG, json.loads(json.dumps(
            {**asdict(cfg), "token_config": tcfg.to_dict(), "resolution_used": parts.resolution, "denoise_weight_used": cfg.effective_denoise_weight,
             "processes": group.world, "rows_per_step": slots, "training_rows": len(rows), "eval_prompt_count": len(eval_prompts),
             "heldout": heldout}, default=str)))
    total = cfg.total_steps
    skipped: dict[str, int] = {}
    accs: list[float] = []
    last_loss = float("nan")
    t0 = time.time()
    consecutive_bad = 0
    stream = RowStream(len(rows), cfg.seed, cfg.shuffle)
    params = list(tokens.parameters())
    reduce_dev = device if group.backend == "nccl" else torch.device("cpu")
    curves_png, curves_note = out / "curves.png", None

    def draw_curves() -> None:
        nonlocal curves_note
        try:
            curves_note = write_curves(log_path, curves_png)[1]
        except Exception as e:  # noqa: BLE001 - a picture must never stop a long training run
            curves_note = f"could not draw the curves: {type(e).__name__}: {e}"

    progress = progress_bar("softrepa train", total, enabled=cfg.progress and group.main)
    with progress, (open(log_path, "a") if group.main else nullcontext()) as log:
        def write(rec: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps(rec) + "\n")

        task = progress.add_task("softrepa train", total=total, completed=step)
        start_step = step
        while step < total:
            optimizer.zero_grad(set_to_none=True)
            slot_rows = [stream[cursor + k] for k in range(slots)]
            cursor += slots
            stats = torch.zeros(slots, 6, dtype=torch.float64)  # trained?, loss, contrastive, denoise, accuracy, t
            reasons: dict[int, str] = {}
            for k in mine:
                row = rows[slot_rows[k]]
                reason = check_row(row)
                pixels = None
                if reason is None:
                    try:
                        pixels = torch.stack([load_image(u, parts.resolution) for u in row["image_uris"]])
                    except Exception as e:  # bad input: record and go on with the next row
                        reason = failure(Reason.IMAGE_UNREADABLE, type(e).__name__)
                if reason is not None:
                    reasons[k] = reason
                    continue
                g = gens[k]
                latents = encode_images(parts, pixels, g)  # [B, C, h, w]
                t = int(torch.randint(cfg.min_t, cfg.max_t, (1,), generator=g))
                noise = torch.randn((1, *latents.shape[1:]), generator=g).to(device)
                pos = torch.tensor(row["positive_index"], dtype=torch.long, device=device)
                res = loss_backward(parts, model, latents, prompts(row["prompts"]), pos, t, noise, scale=cfg.scale, temperature=cfg.temperature,
                                    denoise_weight=cfg.effective_denoise_weight, autocast_dtype=autocast_dtype, scaler=scaler)
                stats[k] = torch.tensor([1.0, float(res.loss.detach()), float(res.contrastive), float(res.denoise), float(res.accuracy), float(t)], dtype=torch.float64)
            if group.active:
                s = stats.to(reduce_dev)
                group.all_reduce_sum(s)
                stats = s.cpu()
            good = [k for k in range(slots) if stats[k, 0] > 0]
            if len(good) < slots:
                merged: dict[int, str] = {}
                for part in group.all_gather_object(reasons):
                    merged.update(part)
                for k in sorted(merged):
                    key = reason_of(merged[k])
                    skipped[key] = skipped.get(key, 0) + 1
                    write({"skipped": rows[slot_rows[k]].get("batch_id"), "reason": merged[k]})
            if not good:
                consecutive_bad += slots
                if consecutive_bad >= len(rows):
                    raise RuntimeError(f"every batch row was skipped ({skipped}); nothing to train on")
                continue
            consecutive_bad = 0
            # mean gradient over the rows that trained, the same on every process
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if group.active:
                flat = torch.cat([gr.reshape(-1) for gr in grads])
                group.all_reduce_sum(flat)
                offset = 0
                for p in params:
                    p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                    offset += p.numel()
            if len(good) > 1:
                for p in params:
                    p.grad.div_(len(good))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            sel = stats[good]
            last_loss = float(sel[:, 1].mean())
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}; try --dtype float32 or a lower --lr")
            acc = float(sel[:, 4].mean())
            accs.append(acc)
            for k in good:
                trained.add(rows[slot_rows[k]])
            ids = [rows[slot_rows[k]].get("batch_id") for k in good]
            ts = [int(stats[k, 5]) for k in good]
            rec = {"step": step, "batch_id": ids[0] if slots == 1 else ids, "loss": last_loss, "contrastive": float(sel[:, 2].mean()),
                   "denoise": float(sel[:, 3].mean()), "accuracy": acc, "lr": lr, "t": ts[0] if slots == 1 else ts}
            write(rec)
            if on_step is not None and group.main:
                on_step(rec)
            window = accs[-50:]
            progress.update(task, completed=step, description=f"softrepa train  loss {last_loss:.4f}  acc {sum(window) / len(window):.2f}")
            evaluate = evaluator is not None and (step % cfg.eval_every == 0 or step == total)
            if step % cfg.checkpoint_every == 0 or step == total or evaluate:
                record = trained.record() if group.main else None
                if evaluate:
                    clip = evaluator()
                    is_best = best_clip is None or clip > best_clip
                    if is_best:
                        best_clip, best_step = clip, step
                        if group.main:
                            save_token_dir(tokens, out / "best", {**meta, "step": step, "clip": clip}, record)
                    write({"eval_step": step, "clip": clip, "best": is_best, "prompts": len(eval_prompts)})
                states: dict[int, torch.Tensor] = {}
                for part in group.all_gather_object({k: gens[k].get_state() for k in mine}):
                    states.update(part)
                if group.main:
                    log.flush()
                    save_checkpoint(out, step, cursor, tokens, optimizer, scheduler, [states[k] for k in range(slots)], scaler,
                                    {**meta, "step": step}, {"best_clip": best_clip, "best_step": best_step, "trained_image_ids": sorted(trained.ids)},
                                    trained_images=record)
                    draw_curves()

    tokens_dir = out / "tokens"
    if group.main:
        save_token_dir(tokens, tokens_dir, {**meta, "step": step}, trained.record())
        draw_curves()
    group.barrier()  # no process reports success before the tokens are on disk
    result = TrainResult(tokens_dir=tokens_dir, steps=step, final_loss=last_loss,
                         mean_accuracy=(sum(accs) / len(accs)) if accs else float("nan"), log_path=log_path,
                         skipped=skipped, seconds=time.time() - t0,
                         best_dir=(out / "best") if best_step is not None else None, best_clip=best_clip, best_step=best_step,
                         curves=curves_png if curves_png.exists() else None, curves_note=curves_note, world=group.world, main=group.main)
    if group.main:
        report(result, cfg, run_id, started_at, steps_before=start_step, rows=len(rows))
    return result


def report(result: TrainResult, cfg: Any, run_id: str, started_at: str, steps_before: int, rows: int) -> None:
    """The run's manifest (``OUT/_manifest.json``, :class:`dataprep.store.Manifest`, as every stage
    writes) and its :class:`~dataprep.runtime.StageSummary` (``result.summary``, for ``print_summary``).

    Counts: ``steps`` trained in this run, ``steps_resumed`` done before it,
    ``rows_trained`` and ``rows_skipped``; failures: skipped batch rows by reason.
    """
    out = Path(cfg.out)
    trained = result.steps - steps_before
    summary = StageSummary("train", out, run_id, done=trained, skipped=steps_before, failed=Counter(result.skipped), unit="steps")
    summary.wall_s = result.seconds
    summary.extra = {"final loss": result.final_loss, "mean accuracy": result.mean_accuracy, "tokens": str(result.tokens_dir)}
    if result.best_step is not None:
        summary.extra["best held-out CLIP"] = f"{result.best_clip:.4f} at step {result.best_step}"
    manifest = Manifest(stage="train", config=json.loads(json.dumps(asdict(cfg), default=str)), run_id=run_id, started_at=started_at,
                        counts=summary.counts() | {"steps": trained, "steps_resumed": steps_before, "rows": rows, "rows_skipped": summary.n_failed},
                        failures=dict(result.skipped), finished_at=utcnow().isoformat())
    result.manifest_path = manifest.write(out)
    result.summary = summary


def _check_resume_resolution(checkpoint: Path, saved: int, now: int) -> None:
    if saved != now:
        raise ConfigError(f"{checkpoint.parent.parent} was trained at {saved} px up to {checkpoint.name}; this run asks for {now} px",
                          "--resolution", f"resume with --resolution {saved} (or train at {now} px into a new --out)")
