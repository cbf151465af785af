"""The SoftREPA trainer: soft tokens on a frozen diffusers model, contrastive batches in.

One step (paper section 3 and appendix B; official ``train.py``):

1. take the next batch row (``B`` images x ``P`` prompts, ``positive_index``);
2. VAE-encode the images (resize shortest side + center crop to the model
   resolution) -> latents ``x`` ``[B, C, h, w]``; encode the prompts (each
   distinct prompt once per run, cached on CPU);
3. draw ONE integer timestep ``t ~ U[min_t, max_t)`` and ONE noise
   ``[1, C, h, w]`` shared by the whole grid (as the official code does), so
   the only thing that differs along a row of ``E`` is the prompt;
4. noise every image and run the wrapped denoiser on all ``P * B`` pairs
   (row ``j * B + i`` = image ``i`` with prompt ``j``):
   SD3 flow matching ``z_t = (1 - t/1000) x + (t/1000) n``, target ``n - x``;
   SD1.5/SDXL DDPM ``z_t = sqrt(abar_t) x + sqrt(1 - abar_t) n`` from the
   scheduler's ``alphas_cumprod``, target ``n`` (or the velocity for
   v-prediction models);
5. ``E`` ``[B, P]`` -> :func:`softrepa.loss.softrepa_loss` -> AdamW on the
   tokens only.

Randomness (timesteps, noise, VAE posterior samples) comes from one CPU
``torch.Generator`` that is checkpointed with the optimizer, scheduler and
step, so a resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from softrepa.backbone import ConfigError, Parts, PromptCache, PromptEmbeds, encode_images, grid_errors, load_image, load_parts
from softrepa.loss import DEFAULT_SCALE, DEFAULT_TEMPERATURE, LossOutput, softrepa_loss
from softrepa.tokens import BACKBONES, UNET_GROUPS, SoftTokens, TokenConfig, save_tokens, wrap_model

# Table 3: iterations per backbone. Denoising-loss weight: 0 for SD3 (paper,
# appendix B); the official SD1.5/SDXL runs (run_train.sh) use --dweight 10.
PRESET_STEPS = {"sd3": 30_000, "sdxl": 30_000, "sd1.5": 26_000}
PRESET_DENOISE_WEIGHT = {"sd3": 0.0, "sdxl": 10.0, "sd1.5": 10.0}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Every field maps one-to-one to a ``softrepa train`` flag. ``None`` = preset default."""

    preset: str
    batches: str  # folder of batch shards (dataprep batches output)
    model: str  # diffusers pipeline id or local path
    out: str
    batch_run: str | None = None  # which `dataprep batches` run in that folder (needed when it holds several)
    allow_partial: bool = False  # train on a batch run that has no completion record (it did not finish)
    steps: int | None = None  # Table 3 iterations
    checkpoint_every: int = 500
    resume: bool = False
    lr: float = 1e-3
    weight_decay: float = 1e-4
    restart_every: int = 5_000  # CosineAnnealingWarmRestarts T_0 in steps (official: 10 x 500 iterations)
    min_lr: float = 1e-5
    n_tokens: int | None = None
    n_layers: int | None = None
    apply: tuple[str, ...] | None = None
    t_dependent: bool | None = None
    denoise_weight: float | None = None
    scale: float = DEFAULT_SCALE
    temperature: float = DEFAULT_TEMPERATURE
    min_t: int = 0
    max_t: int = 1000
    resolution: int | None = None  # default: the model's native (sample_size x VAE factor)
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    gradient_checkpointing: bool = False  # recompute denoiser blocks in backward: less memory, slower
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.preset not in BACKBONES:
            raise ConfigError(f"unknown preset {self.preset!r}", "--preset", f"use one of {', '.join(BACKBONES)}")
        if not Path(self.batches).is_dir():
            raise ConfigError(f"batches folder {self.batches} does not exist", "--batches", "point it at the output of `dataprep batches`")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}", "--steps")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint-every must be >= 1, got {self.checkpoint_every}", "--checkpoint-every")
        if not 0 <= self.min_t < self.max_t <= 1000:
            raise ConfigError(f"need 0 <= min_t < max_t <= 1000, got {self.min_t}, {self.max_t}", "--min-t/--max-t")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}", "--temperature")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", "--precision", f"use one of {', '.join(PRECISIONS)}")
        if self.apply is not None:
            bad = [g for g in self.apply if g not in UNET_GROUPS]
            if bad or (self.preset == "sd3" and self.apply):
                raise ConfigError(f"bad --apply {self.apply}", "--apply", f"UNet presets take a subset of {UNET_GROUPS}; sd3 uses --n-layers")
        if self.preset != "sd3" and self.n_layers not in (None, 1):
            raise ConfigError("UNet presets use one token set", "--n-layers", "use --apply to choose block groups")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}", "--resolution")
        local = Path(self.model)
        if (local.exists() or self.model.startswith((".", "/"))) and not (local / "model_index.json").exists():
            raise ConfigError(f"{self.model} is not a diffusers pipeline folder (no model_index.json)", "--model")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else PRESET_STEPS[self.preset]

    @property
    def effective_denoise_weight(self) -> float:
        return self.denoise_weight if self.denoise_weight is not None else PRESET_DENOISE_WEIGHT[self.preset]


@dataclass
class TrainResult:
    tokens_dir: Path
    steps: int  # optimizer steps done in total (including before a resume)
    final_loss: float
    mean_accuracy: float  # over the steps of this run
    log_path: Path
    skipped: dict[str, int] = field(default_factory=dict)  # batch rows skipped, by reason
    seconds: float = 0.0


# ---------------------------------------------------------------- data


def batch_runs(folder: str | Path) -> dict[str, list[Path]]:
    """Shards per `dataprep batches` run (``part-<run>-<nnnnn>.parquet``), in shard order."""
    import re

    from dataprep.store import shard_paths

    runs: dict[str, list[Path]] = {}
    for path in shard_paths(folder):
        m = re.fullmatch(r"part-(.+)-\d{5}\.parquet", path.name)
        runs.setdefault(m.group(1) if m else path.stem, []).append(path)
    return runs


def read_batch_rows(folder: str | Path, run: str | None = None, allow_partial: bool = False) -> list[dict[str, Any]]:
    """The batch rows of one run, in shard order (the trainer's deterministic data order).

    A folder that holds several runs (rebuilt batches, another seed or grid)
    is refused unless ``run`` picks one: training on all of them would repeat
    images and mix stale captions into the data silently. A run without its
    completion record (``_run-<id>.json``, written last by `dataprep batches`),
    or missing a shard the record lists, did not finish and is refused unless
    ``allow_partial``: its shards may hold a fraction of the epochs.
    """
    import pyarrow.parquet as pq

    from dataprep.store import BATCHES_SCHEMA

    runs = batch_runs(folder)
    if run is not None:
        if run not in runs:
            raise ConfigError(f"no batch run {run!r} in {folder} (runs: {', '.join(sorted(runs)) or 'none'})", "--batch-run", "pass one of the listed run ids")
        paths = runs[run]
    elif len(runs) > 1:
        raise ConfigError(f"{folder} holds {len(runs)} batch runs: {', '.join(sorted(runs))}", "--batch-run", "pick one with --batch-run ID (or build each run into its own --out folder)")
    else:
        paths = [p for ps in runs.values() for p in ps]
    if not allow_partial:
        for run_id in ([run] if run is not None else list(runs)):
            _check_complete(folder, run_id, runs[run_id])
    cols = ["batch_id", "preset", "image_ids", "image_uris", "prompts", "positive_index"]
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(pq.read_table(path, columns=cols, schema=BATCHES_SCHEMA).to_pylist())
    return rows


def _check_complete(folder: str | Path, run_id: str, paths: list[Path]) -> None:
    from dataprep.store import read_run_record, run_record_path

    record = read_run_record(folder, run_id)
    if record is None:
        raise ConfigError(
            f"batch run {run_id} in {folder} has no completion record ({run_record_path(folder, run_id).name}): "
            f"the `dataprep batches` run that wrote its {len(paths)} shard(s) did not finish",
            "--allow-partial",
            "rerun the same `dataprep batches` command to finish it, or pass --allow-partial to train on the shards there are",
        )
    have = {p.name for p in paths}
    missing = [name for name in record["shards"] if name not in have]
    if missing:
        raise ConfigError(
            f"batch run {run_id} in {folder} lacks {len(missing)} of the shards its completion record lists (e.g. {missing[0]})",
            "--allow-partial",
            "rerun the same `dataprep batches` command to rewrite them, or pass --allow-partial to train on the shards there are",
        )


def check_row(row: dict[str, Any]) -> str | None:
    """The reason a batch row cannot be trained on, or None."""
    uris, prompts, pos = row.get("image_uris") or [], row.get("prompts") or [], row.get("positive_index") or []
    if not uris or not prompts:
        return "empty_batch"
    if len(pos) != len(uris):
        return "positive_index_length"
    if any(p is None or not 0 <= p < len(prompts) for p in pos):
        return "positive_index_range"
    if any(not isinstance(p, str) for p in prompts):
        return "null_prompt"
    return None


# ---------------------------------------------------------------- tokens, optimiser


def token_config(cfg: TrainConfig, denoiser: torch.nn.Module) -> TokenConfig:
    base = TokenConfig.preset(cfg.preset, denoiser)
    d = base.to_dict()
    for key in ("n_tokens", "n_layers", "t_dependent"):
        if getattr(cfg, key) is not None:
            d[key] = getattr(cfg, key)
    if cfg.apply is not None:
        d["apply"] = list(cfg.apply)
    if cfg.preset == "sd3" and d["n_layers"] > int(denoiser.config.num_layers):
        raise ConfigError(f"n_layers {d['n_layers']} > the model's {denoiser.config.num_layers} blocks", "--n-layers")
    return TokenConfig.from_dict(d)


@torch.no_grad()
def init_tokens(tokens: SoftTokens, parts: Parts, prompt_cache: PromptCache) -> None:
    """Table 3 token init: SD1.5 from the empty prompt (every token = its BOS
    embedding, as the official code does); SDXL/SD3 keep N(0, 0.02)."""
    if parts.backbone == "sd1.5":
        null = prompt_cache([""]).embeds[0, 0].float().cpu()  # [D]
        tokens.tokens.copy_(null.expand_as(tokens.tokens))


def make_optimizer(tokens: SoftTokens, cfg: TrainConfig):
    opt = torch.optim.AdamW(tokens.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cfg.restart_every, T_mult=1, eta_min=cfg.min_lr)
    return opt, sched


def assert_only_tokens_train(parts: Parts, tokens: SoftTokens) -> None:
    """Gradients flow only into the tokens: every other weight is frozen."""
    token_ids = {id(p) for p in tokens.parameters()}
    for name, comp in parts.pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            live = [n for n, p in comp.named_parameters() if p.requires_grad and id(p) not in token_ids]
            assert not live, f"{name} has trainable parameters {live[:3]}: only the soft tokens may train"
    assert all(p.requires_grad for p in tokens.parameters()), "soft tokens must require grad"


def train_step(parts: Parts, model: torch.nn.Module, optimizer, latents: torch.Tensor, prompts: PromptEmbeds,
               positive_index: torch.Tensor, t: int, noise: torch.Tensor, *, scale: float = DEFAULT_SCALE,
               temperature: float = DEFAULT_TEMPERATURE, denoise_weight: float = 0.0,
               autocast_dtype: torch.dtype | None = None, scaler: Any = None) -> LossOutput:
    """One optimiser step on one grid; returns the loss terms (before the update)."""
    optimizer.zero_grad(set_to_none=True)
    ctx = torch.autocast(parts.device.type, dtype=autocast_dtype) if autocast_dtype is not None else _null()
    with ctx:
        errors = grid_errors(parts, model, latents, prompts, t, noise)
    out = softrepa_loss(errors.float(), positive_index, scale, temperature, denoise_weight)
    if scaler is not None:
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        out.loss.backward()
        optimizer.step()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------- checkpoints


def _checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "state.pt").exists()) if root.is_dir() else []


def save_checkpoint(out: Path, step: int, cursor: int, tokens: SoftTokens, optimizer, scheduler, generator: torch.Generator, scaler: Any, extra: dict[str, Any]) -> Path:
    """``out/checkpoints/step-NNNNNNN/`` = token files + ``state.pt`` (optimizer,
    scheduler, RNG, step, data cursor). Written to a temp folder and renamed."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_tokens(tokens, tmp, extra=extra)
    state = {
        "step": step,
        "cursor": cursor,
        "tokens": {k: v.detach().cpu() for k, v in tokens.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    torch.save(state, tmp / "state.pt")
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    # our own file, but still weights-only: it holds tensors, numbers and dicts
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after checkpoint ``step`` (a run killed past its
    last checkpoint repeats those steps on resume; keep each step once)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("step", 0) > step:
            break
        if line.strip():
            kept.append(line)
    # skip records between the checkpoint and the next step are re-made on resume
    while kept and "step" not in json.loads(kept[-1]):
        kept.pop()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------- the loop


def _resolve_device_precision(cfg: TrainConfig) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if dev.type == "cuda" else "fp32"
    if prec == "fp32":
        return dev, torch.float32, None
    dt = torch.bfloat16 if prec == "bf16" else torch.float16
    if dev.type != "cuda":
        raise ConfigError(f"{prec} autocast needs a CUDA device, got {dev}", "--precision", "use fp32 on CPU")
    return dev, dt, dt


def train(cfg: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train soft tokens on the batch shards in ``cfg.batches``; write ``cfg.out/tokens``.

    Outputs in ``cfg.out``: ``train_config.json``, ``train_log.jsonl`` (one
    line per step: step, loss, contrastive, denoise, accuracy, lr, t),
    ``checkpoints/step-*/`` every ``checkpoint_every`` steps and at the end,
    ``tokens/`` (final :func:`~softrepa.tokens.save_tokens`).
    ``cfg.resume`` continues from the newest checkpoint with the same
    trajectory (optimizer, scheduler, RNG and data cursor restored).
    """
    cfg.validate()
    rows = read_batch_rows(cfg.batches, cfg.batch_run, cfg.allow_partial)
    if not rows:
        raise ConfigError(f"no batch shards (part-*.parquet) in {cfg.batches}", "--batches", "run `dataprep batches` first")
    presets = {r["preset"] for r in rows if r.get("preset")}
    if presets and presets != {cfg.preset}:
        raise ConfigError(f"shards were built for preset(s) {sorted(presets)}, not {cfg.preset}", "--preset", "train with the preset the batches were built for")
    out = Path(cfg.out)
    checkpoints = _checkpoint_dirs(out)
    if not cfg.resume and (checkpoints or (out / "tokens").exists()):
        raise ConfigError(f"{out} already holds a training run", "--out", "pass --resume to continue it, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)

    device, dtype, autocast_dtype = _resolve_device_precision(cfg)
    parts = load_parts(cfg.model, cfg.preset, device, dtype, cfg.resolution)
    tcfg = token_config(cfg, parts.denoiser)
    prompts = PromptCache(parts)
    torch.manual_seed(cfg.seed)
    tokens = SoftTokens(tcfg)
    init_tokens(tokens, parts, prompts)
    tokens.to(device)
    model = wrap_model(parts.denoiser, tokens)
    if cfg.gradient_checkpointing:
        # the token hooks run again on recomputation and reuse this call's tokens
        parts.denoiser.enable_gradient_checkpointing()
    assert_only_tokens_train(parts, tokens)
    optimizer, scheduler = make_optimizer(tokens, cfg)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    step, cursor = 0, 0
    if cfg.resume and checkpoints:
        state = load_checkpoint(checkpoints[-1])
        tokens.load_state_dict(state["tokens"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, cursor = int(state["step"]), int(state["cursor"])
        _truncate_log(out / "train_log.jsonl", step)

    meta = {"preset": cfg.preset, "model": cfg.model, "resolution": parts.resolution}
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "token_config": tcfg.to_dict(), "resolution": parts.resolution,
                                                        "denoise_weight_used": cfg.effective_denoise_weight}, indent=2, default=str) + "\n")
    log_path = out / "train_log.jsonl"
    total = cfg.total_steps
    skipped: dict[str, int] = {}
    accs: list[float] = []
    last_loss = float("nan")
    t0 = time.time()
    consecutive_bad = 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]softrepa train[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[stats]}"), disable=not cfg.progress)
    with progress, open(log_path, "a") as log:
        task = progress.add_task("train", total=total, completed=step, stats="")
        while step < total:
            row = rows[cursor % len(rows)]
            cursor += 1
            reason = check_row(row)
            pixels = None
            if reason is None:
                try:
                    pixels = torch.stack([load_image(u, parts.resolution) for u in row["image_uris"]])
                except Exception as e:  # bad input: record and go on with the next row
                    reason = f"image_unreadable: {type(e).__name__}"
            if reason is not None:
                key = reason.split(":")[0]
                skipped[key] = skipped.get(key, 0) + 1
                log.write(json.dumps({"skipped": row.get("batch_id"), "reason": reason}) + "\n")
                consecutive_bad += 1
                if consecutive_bad >= len(rows):
                    raise RuntimeError(f"every batch row was skipped ({skipped}); nothing to train on")
                continue
            consecutive_bad = 0
            latents = encode_images(parts, pixels, generator)  # [B, C, h, w]
            t = int(torch.randint(cfg.min_t, cfg.max_t, (1,), generator=generator))
            noise = torch.randn((1, *latents.shape[1:]), generator=generator).to(device)
            emb = prompts(row["prompts"])
            pos = torch.tensor(row["positive_index"], dtype=torch.long, device=device)
            res = train_step(parts, model, optimizer, latents, emb, pos, t, noise, scale=cfg.scale, temperature=cfg.temperature,
                             denoise_weight=cfg.effective_denoise_weight, autocast_dtype=autocast_dtype, scaler=scaler)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            last_loss = float(res.loss.detach())
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}; try --precision fp32 or a lower --lr")
            accs.append(res.accuracy)
            rec = {"step": step, "batch_id": row.get("batch_id"), "loss": last_loss, "contrastive": float(res.contrastive),
                   "denoise": float(res.denoise), "accuracy": res.accuracy, "lr": lr, "t": t}
            log.write(json.dumps(rec) + "\n")
            if on_step is not None:
                on_step(rec)
            window = accs[-50:]
            progress.update(task, completed=step, stats=f"loss {last_loss:.4f}  acc {sum(window) / len(window):.2f}")
            if step % cfg.checkpoint_every == 0 or step == total:
                log.flush()
                save_checkpoint(out, step, cursor, tokens, optimizer, scheduler, generator, scaler, {**meta, "step": step})

    tokens_dir = out / "tokens"
    save_tokens(tokens, tokens_dir, extra={**meta, "step": step})
    return TrainResult(tokens_dir=tokens_dir, steps=step, final_loss=last_loss,
                       mean_accuracy=(sum(accs) / len(accs)) if accs else float("nan"), log_path=log_path,
                       skipped=skipped, seconds=time.time() - t0)
