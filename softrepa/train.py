"""The SoftREPA trainer: soft tokens on a frozen diffusers model, contrastive batches in.

One step (paper section 3 and appendix B; official ``train.py``):

1. take the next batch row (``B`` images x ``P`` prompts, ``positive_index``);
2. VAE-encode the images (resize shortest side + center crop to the training
   resolution: 512 px for every backbone as the official ``--img_size``, or
   the model's native size) -> latents ``x`` ``[B, C, h, w]``; encode the prompts (each
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

Data order: the rows are visited pass after pass, each pass in a fresh
permutation drawn from ``(seed, pass)`` (:func:`batch_order`), as the
official trainer reshuffles its DataLoader every epoch; ``--no-shuffle``
keeps shard order. The position in that stream is checkpointed, so a resume
mid-pass continues the same permutation.

Data parallel (``torchrun`` / ``accelerate launch``, :mod:`softrepa.distributed`):
one step takes ``processes x accumulate`` rows ("slots"); slot ``k`` of a
step takes stream position ``cursor + k`` and draws its randomness
(timestep, noise, VAE posterior) from its own CPU generator seeded from
``(seed, k)``. Every process backpropagates its slots, the token gradients
are summed over processes and divided by the number of rows that trained,
then every process takes the same AdamW step. So 2 processes x 1 row and 1
process x 2 rows (``--accumulate 2``) follow the same trajectory. Only the
first process writes tokens, logs, curves and checkpoints; a checkpoint
carries every slot's generator state (gathered from all processes) with the
optimizer, scheduler, step and stream position, so a resumed run follows the
same trajectory as an uninterrupted one.
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

from softrepa.backbone import Parts, PromptCache, PromptEmbeds, encode_images, grid_errors, load_image, load_parts
from dataprep.errors import ConfigError, Reason, failure, reason_of
from dataprep.store import atomic_write_text
from softrepa.loss import DEFAULT_SCALE, DEFAULT_TEMPERATURE, LossOutput, softrepa_loss
from softrepa.tokens import BACKBONES, UNET_GROUPS, SoftTokens, TokenConfig, save_tokens, wrap_model

# Table 3: iterations per backbone. Denoising-loss weight: 0 for SD3 (paper,
# appendix B); the official SD1.5/SDXL runs (run_train.sh) use --dweight 10.
PRESET_STEPS = {"sd3": 30_000, "sdxl": 30_000, "sd1.5": 26_000}
PRESET_DENOISE_WEIGHT = {"sd3": 0.0, "sdxl": 10.0, "sd1.5": 10.0}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The official trainer trains every backbone at 512 px (train.py --img_size 512).
DEFAULT_RESOLUTION = 512
BEST_BY = ("clip", "none")
# Official trainer: --num_eval 50 validation captions, CLIP ViT-L/14 score.
DEFAULT_EVAL_HOLDOUT = 50
DEFAULT_EVAL_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_EVAL_EVERY = 2_500  # official --num_iter: validation every 2500 iterations


def parse_resolution(value: int | str | None) -> int | str:
    """``512`` / ``"512"`` -> 512; ``"native"`` (or None) -> ``"native"`` (the model's own size)."""
    if value is None or value == "native":
        return "native"
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ConfigError(f"resolution must be a number of pixels or 'native', got {value!r}", "--resolution", "e.g. --resolution 512 or --resolution native")


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
    resolution: int | str = DEFAULT_RESOLUTION  # pixels, or "native" (the model's sample_size x VAE factor)
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    gradient_checkpointing: bool = False  # recompute denoiser blocks in backward: less memory, slower
    seed: int = 0
    progress: bool = True
    shuffle: bool = True  # a new permutation of the rows every pass (official: DataLoader shuffle=True)
    accumulate: int = 1  # rows per process per step; a step trains processes x accumulate rows
    best_by: str = "clip"  # keep best/ tokens by held-out CLIP score at each checkpoint; "none" = off
    eval_prompts: str | None = None  # text file, one prompt per line; default: captions of held-out images
    eval_holdout: int = DEFAULT_EVAL_HOLDOUT  # images held out of training for their captions (when no file)
    eval_every: int = DEFAULT_EVAL_EVERY  # evaluate (and checkpoint) every N steps and at the end
    eval_steps: int | None = None  # sampling steps (default: the official sampler's 28 sd3, 30 sdxl/sd1.5)
    eval_guidance: float | None = None  # CFG (default: 4 sd3, 7 sdxl/sd1.5)
    eval_size: int | None = None  # sampled image size (default: the model's native size, as the official sampler)
    eval_batch_size: int = 4
    eval_clip_model: str = DEFAULT_EVAL_CLIP

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
        self.resolution = parse_resolution(self.resolution)
        if self.resolution != "native" and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}", "--resolution")
        if self.accumulate < 1:
            raise ConfigError(f"accumulate must be >= 1, got {self.accumulate}", "--accumulate")
        if self.best_by not in BEST_BY:
            raise ConfigError(f"unknown --best-by {self.best_by!r}", "--best-by", f"use one of {', '.join(BEST_BY)}")
        if self.best_by != "none":
            if self.eval_prompts is None and self.eval_holdout < 1:
                raise ConfigError(f"eval-holdout must be >= 1, got {self.eval_holdout}", "--eval-holdout", "or pass --eval-prompts FILE, or --best-by none")
            if self.eval_prompts is not None and not Path(self.eval_prompts).is_file():
                raise ConfigError(f"eval prompts file {self.eval_prompts} does not exist", "--eval-prompts", "one prompt per line")
            if self.eval_every < 1:
                raise ConfigError(f"eval-every must be >= 1, got {self.eval_every}", "--eval-every")
            if self.eval_steps is not None and self.eval_steps < 1:
                raise ConfigError(f"eval-steps must be >= 1, got {self.eval_steps}", "--eval-steps")
            if self.eval_batch_size < 1:
                raise ConfigError(f"eval-batch-size must be >= 1, got {self.eval_batch_size}", "--eval-batch-size")
            if self.eval_size is not None and (self.eval_size < 8 or self.eval_size % 8):
                raise ConfigError(f"eval-size must be a positive multiple of 8, got {self.eval_size}", "--eval-size")
        local = Path(self.model)
        if (local.exists() or self.model.startswith((".", "/"))) and not (local / "model_index.json").exists():
            raise ConfigError(f"{self.model} is not a diffusers pipeline folder (no model_index.json)", "--model")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else PRESET_STEPS[self.preset]

    @property
    def model_resolution(self) -> int | None:
        """What :func:`~softrepa.backbone.load_parts` takes: pixels, or None for the native size."""
        r = parse_resolution(self.resolution)
        return None if r == "native" else r

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
    best_dir: Path | None = None  # tokens with the best held-out CLIP score (None: evaluation off)
    best_clip: float | None = None
    best_step: int | None = None
    curves: Path | None = None  # curves.png (None: not drawn, see curves_note)
    curves_note: str | None = None
    world: int = 1  # data-parallel processes
    main: bool = True  # False in every process but the first (which wrote the outputs)


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
        return Reason.EMPTY_BATCH.value
    if len(pos) != len(uris):
        return Reason.POSITIVE_INDEX_LENGTH.value
    if any(p is None or not 0 <= p < len(prompts) for p in pos):
        return Reason.POSITIVE_INDEX_RANGE.value
    if any(not isinstance(p, str) for p in prompts):
        return Reason.NULL_PROMPT.value
    return None


def batch_order(n: int, seed: int, pass_index: int, shuffle: bool = True) -> list[int]:
    """Row indices for pass ``pass_index`` over ``n`` rows: a permutation drawn
    from ``(seed, pass_index)`` (the same on every process and after a resume),
    or ``0..n-1`` without shuffling."""
    if not shuffle:
        return list(range(n))
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, pass_index]).permutation(n)]


class RowStream:
    """Stream position -> row index, pass after pass (one permutation per pass, cached)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._pass, self._order = -1, []

    def __getitem__(self, position: int) -> int:
        p = position // self.n
        if p != self._pass:
            self._pass, self._order = p, batch_order(self.n, self.seed, p, self.shuffle)
        return self._order[position % self.n]


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """The CPU generator of row slot ``slot`` (timesteps, noise, VAE samples), seeded from ``(seed, slot)``."""
    import numpy as np

    s = int(np.random.SeedSequence([seed, slot]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
    return torch.Generator().manual_seed(s)


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
    out = loss_backward(parts, model, latents, prompts, positive_index, t, noise, scale=scale, temperature=temperature,
                        denoise_weight=denoise_weight, autocast_dtype=autocast_dtype, scaler=scaler)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return out


def loss_backward(parts: Parts, model: torch.nn.Module, latents: torch.Tensor, prompts: PromptEmbeds,
                  positive_index: torch.Tensor, t: int, noise: torch.Tensor, *, scale: float = DEFAULT_SCALE,
                  temperature: float = DEFAULT_TEMPERATURE, denoise_weight: float = 0.0,
                  autocast_dtype: torch.dtype | None = None, scaler: Any = None) -> LossOutput:
    """Loss of one grid, backpropagated (gradients add up in the tokens' ``.grad``)."""
    ctx = torch.autocast(parts.device.type, dtype=autocast_dtype) if autocast_dtype is not None else _null()
    with ctx:
        errors = grid_errors(parts, model, latents, prompts, t, noise)
    out = softrepa_loss(errors.float(), positive_index, scale, temperature, denoise_weight)
    (scaler.scale(out.loss) if scaler is not None else out.loss).backward()
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


def save_checkpoint(out: Path, step: int, cursor: int, tokens: SoftTokens, optimizer, scheduler, generators: list[torch.Tensor],
                    scaler: Any, extra: dict[str, Any], run_state: dict[str, Any] | None = None,
                    trained_images: dict[str, list[str]] | None = None) -> Path:
    """``out/checkpoints/step-NNNNNNN/`` = token files (+ ``trained_images.json``)
    + ``state.pt`` (optimizer, scheduler, every slot's generator state, step,
    stream position, ``run_state``). Written to a temp folder and renamed."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    save_tokens(tokens, tmp, extra=extra)
    if trained_images is not None:
        _write_json(tmp / TRAINED_IMAGES, trained_images)
    state = {
        "step": step,
        "cursor": cursor,
        "tokens": {k: v.detach().cpu() for k, v in tokens.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generators": list(generators),
        "scaler": scaler.state_dict() if scaler is not None else None,
        **(run_state or {}),
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
        try:
            rec = json.loads(line) if line.strip() else {}
        except ValueError:  # a line cut by the kill
            break
        if rec.get("step", rec.get("eval_step", 0)) > step:
            break
        if line.strip():
            kept.append(line)
    # skip records between the checkpoint and the next step are re-made on resume;
    # the checkpoint's own evaluation (eval_step == step) happened before it was saved
    while kept and not {"step", "eval_step"} & json.loads(kept[-1]).keys():
        kept.pop()
    atomic_write_text(path, "".join(k + "\n" for k in kept))


# ---------------------------------------------------------------- the loop


TRAINED_IMAGES = "trained_images.json"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def sha256_of(uri: str) -> str:
    """sha256 of the file's bytes (local path or fsspec URL); "" when it cannot be read."""
    import hashlib

    import fsspec

    h = hashlib.sha256()
    try:
        with fsspec.open(uri, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except Exception:  # noqa: BLE001 - unreadable now: unknown, not fatal
        return ""
    return h.hexdigest()


class TrainedImages:
    """Which images the tokens were trained on: ids of rows that took an optimiser step.

    :meth:`record` is the ``trained_images.json`` contract read by
    ``softrepa evaluate-edit`` for its leakage warning:
    ``{"image_ids": [...], "sha256": [...]}``, sorted by id, unique, sha256 of
    the image file bytes ("" when the file cannot be read).
    """

    def __init__(self, rows: list[dict[str, Any]]):
        self.ids: set[str] = set()
        self.uri: dict[str, str] = {}
        for row in rows:
            for iid, uri in zip(row.get("image_ids") or [], row.get("image_uris") or []):
                self.uri.setdefault(iid, uri)
        self._sha: dict[str, str] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.ids.update(row.get("image_ids") or [])

    def record(self) -> dict[str, list[str]]:
        ids = sorted(self.ids)
        for i in ids:
            if i not in self._sha:
                self._sha[i] = sha256_of(self.uri[i]) if i in self.uri else ""
        return {"image_ids": ids, "sha256": [self._sha[i] for i in ids]}


def _save_token_dir(tokens: SoftTokens, final: Path, extra: dict[str, Any], trained: dict[str, list[str]]) -> None:
    """Token files + ``trained_images.json`` into ``final``, replacing it whole (temp folder, renames)."""
    import shutil

    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    save_tokens(tokens, tmp, extra=extra)
    _write_json(tmp / TRAINED_IMAGES, trained)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _resolve_device_precision(cfg: TrainConfig, device: str) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
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

    Outputs in ``cfg.out`` (first process only): ``train_config.json``,
    ``train_log.jsonl`` (one line per step: step, batch_id, loss,
    contrastive, denoise, accuracy, lr, t -- ``batch_id`` and ``t`` are lists
    when a step trains several rows; one line per held-out evaluation:
    eval_step, clip, best), ``checkpoints/step-*/`` every
    ``checkpoint_every`` steps, at each evaluation and at the end, ``tokens/`` (final
    :func:`~softrepa.tokens.save_tokens` + ``trained_images.json``),
    ``best/`` (the tokens with the best held-out CLIP score, unless
    ``best_by="none"``) and ``curves.png`` (when matplotlib is
    installed). ``cfg.resume`` continues from the newest checkpoint with the
    same trajectory. Under ``torchrun``/``accelerate launch`` every process
    calls this; see the module docstring for how they share the work.
    """
    from softrepa import distributed

    group = distributed.from_env(cfg.device)
    try:
        return _train(cfg, group, on_step)
    finally:
        group.close()


def _train(cfg: TrainConfig, group: Any, on_step: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    from contextlib import nullcontext

    from softrepa import distributed
    from softrepa.heldout import ClipEval, hold_out, read_prompt_file
    from softrepa.sample import DEFAULT_GUIDANCE, DEFAULT_STEPS

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

    device, dtype, autocast_dtype = _resolve_device_precision(cfg, distributed.process_device(group, cfg.device))
    parts = load_parts(cfg.model, cfg.preset, device, dtype, cfg.model_resolution)
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
            _truncate_log(log_path, step)
    evaluator = None
    if eval_prompts:
        evaluator = ClipEval(parts, eval_prompts, cfg.eval_clip_model, steps=cfg.eval_steps or DEFAULT_STEPS[cfg.preset],
                             guidance=DEFAULT_GUIDANCE[cfg.preset] if cfg.eval_guidance is None else cfg.eval_guidance,
                             size=cfg.eval_size, batch_size=cfg.eval_batch_size, seed=cfg.seed, group=group, autocast_dtype=autocast_dtype)

    meta = {"preset": cfg.preset, "model": cfg.model, "resolution": parts.resolution}
    if group.main:
        heldout = None if held is None else {"image_ids": held.image_ids, "prompts": held.prompts, "rows_dropped": held.rows_dropped,
                                             "image_slots_removed": held.slots_removed}
        _write_json(out / "train_config.json", json.loads(json.dumps(
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
        from softrepa.curves import write_curves

        try:
            curves_note = write_curves(log_path, curves_png)[1]
        except Exception as e:  # noqa: BLE001 - a picture must never stop a long training run
            curves_note = f"could not draw the curves: {type(e).__name__}: {e}"

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]softrepa train[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[stats]}"), disable=not (cfg.progress and group.main))
    with progress, (open(log_path, "a") if group.main else nullcontext()) as log:
        def write(rec: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps(rec) + "\n")

        task = progress.add_task("train", total=total, completed=step, stats="")
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
                raise FloatingPointError(f"loss became {last_loss} at step {step}; try --precision fp32 or a lower --lr")
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
            progress.update(task, completed=step, stats=f"loss {last_loss:.4f}  acc {sum(window) / len(window):.2f}")
            evaluate = evaluator is not None and (step % cfg.eval_every == 0 or step == total)
            if step % cfg.checkpoint_every == 0 or step == total or evaluate:
                record = trained.record() if group.main else None
                if evaluate:
                    clip = evaluator()
                    is_best = best_clip is None or clip > best_clip
                    if is_best:
                        best_clip, best_step = clip, step
                        if group.main:
                            _save_token_dir(tokens, out / "best", {**meta, "step": step, "clip": clip}, record)
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
        _save_token_dir(tokens, tokens_dir, {**meta, "step": step}, trained.record())
        draw_curves()
    group.barrier()  # no process reports success before the tokens are on disk
    return TrainResult(tokens_dir=tokens_dir, steps=step, final_loss=last_loss,
                       mean_accuracy=(sum(accs) / len(accs)) if accs else float("nan"), log_path=log_path,
                       skipped=skipped, seconds=time.time() - t0,
                       best_dir=(out / "best") if best_step is not None else None, best_clip=best_clip, best_step=best_step,
                       curves=curves_png if curves_png.exists() else None, curves_note=curves_note, world=group.world, main=group.main)
