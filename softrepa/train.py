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
same trajectory as an uninterrupted one. A resume that would change the
trajectory's shape is refused: another number of rows per step
(``--accumulate`` x processes) or another ``--resolution``.

Modules: this one holds :class:`TrainConfig` and :func:`train`;
:mod:`softrepa.train_data` reads the rows and orders them,
:mod:`softrepa.train_step` is one step (and the precision decision),
:mod:`softrepa.train_loop` the loop and its report, :mod:`softrepa.checkpoints`
what a run leaves on disk.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Callable

from dataprep.errors import ConfigError
from dataprep.runtime import DTYPES, at_least, check_device, check_dtype
from softrepa import distributed
from softrepa.checkpoints import LEGACY_PRECISION, load_checkpoint, read_train_config
from softrepa.loss import DEFAULT_SCALE, DEFAULT_TEMPERATURE
from softrepa.tokens import BACKBONES, UNET_GROUPS
from softrepa.train_data import RowStream, batch_order, batch_runs, check_row, read_batch_rows
from softrepa.train_loop import TrainResult, run_training
from softrepa.train_step import assert_only_tokens_train, loss_backward, make_optimizer, token_config, train_step, training_precision

# Table 3: iterations per backbone. Denoising-loss weight: 0 for SD3 (paper,
# appendix B); the official SD1.5/SDXL runs (run_train.sh) use --dweight 10.
PRESET_STEPS = {"sd3": 30_000, "sdxl": 30_000, "sd1.5": 26_000}
PRESET_DENOISE_WEIGHT = {"sd3": 0.0, "sdxl": 10.0, "sd1.5": 10.0}
# The official trainer trains every backbone at 512 px (train.py --img_size 512).
DEFAULT_RESOLUTION = 512
BEST_BY = ("clip", "none")
# Official trainer: --num_eval 50 validation captions, CLIP ViT-L/14 score.
DEFAULT_EVAL_HOLDOUT = 50
DEFAULT_EVAL_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_EVAL_EVERY = 2_500  # official --num_iter: validation every 2500 iterations

# The pieces of a run live in their own modules (data, step, loop, checkpoints);
# their public names stay importable from here, where callers found them.
__all__ = [
    "TrainConfig", "TrainResult", "train", "parse_resolution", "read_train_config", "load_checkpoint", "LEGACY_PRECISION",
    "RowStream", "batch_order", "batch_runs", "check_row", "read_batch_rows",
    "assert_only_tokens_train", "loss_backward", "make_optimizer", "token_config", "train_step", "training_precision",
    "PRESET_STEPS", "PRESET_DENOISE_WEIGHT", "DEFAULT_RESOLUTION", "BEST_BY", "DEFAULT_EVAL_HOLDOUT", "DEFAULT_EVAL_CLIP", "DEFAULT_EVAL_EVERY",
]


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
    """Every field maps one-to-one to a ``softrepa train`` flag. ``None`` = preset default.

    Built, it is valid (peft's ``PromptTuningConfig`` is the model):
    ``__post_init__`` checks every value and raises :class:`ConfigError`
    naming the flag and the fix. :meth:`validate` adds what depends on the
    file system (the batches folder, a local model folder, the prompts
    file), checked again when the run starts, because a recipe builds its
    config before the batches exist.

    ``precision`` (``auto|fp32|bf16|fp16``) is the earlier name of ``dtype``:
    still accepted as a keyword, and read from old ``train_config.json``
    files (:func:`softrepa.checkpoints.read_train_config`), so a run started before the rename
    resumes.
    """

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
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 elsewhere (dataprep.runtime.resolve_dtype)
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
    precision: InitVar[str | None] = None  # the earlier name of dtype (bf16/fp16/fp32); not a field

    def __post_init__(self, precision: str | None = None) -> None:
        if precision is not None:
            if precision not in LEGACY_PRECISION:
                raise ConfigError(f"unknown precision {precision!r}", "--precision", f"use --dtype {'|'.join(DTYPES)}")
            if self.dtype not in ("auto", LEGACY_PRECISION[precision]):
                raise ConfigError(f"precision {precision!r} and dtype {self.dtype!r} disagree", "--dtype", "give only --dtype")
            self.dtype = LEGACY_PRECISION[precision]
        if self.apply is not None:
            self.apply = tuple(self.apply)
        self.check_values()

    def check_values(self) -> None:
        """Every check that needs only the values (run by ``__post_init__``)."""
        if self.preset not in BACKBONES:
            raise ConfigError(f"unknown preset {self.preset!r}", "--preset", f"use one of {', '.join(BACKBONES)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}", "--steps", "omit --steps for the paper's Table 3 value")
        at_least(self.checkpoint_every, 1, "--checkpoint-every", "e.g. --checkpoint-every 500")
        if not 0 <= self.min_t < self.max_t <= 1000:
            raise ConfigError(f"need 0 <= min_t < max_t <= 1000, got {self.min_t}, {self.max_t}", "--min-t/--max-t", "e.g. --min-t 0 --max-t 1000")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}", "--temperature", f"e.g. --temperature {DEFAULT_TEMPERATURE}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", "--lr", "e.g. --lr 1e-3")
        at_least(self.weight_decay, 0, "--weight-decay", "e.g. --weight-decay 1e-4")
        at_least(self.min_lr, 0, "--min-lr", "e.g. --min-lr 1e-5")
        at_least(self.restart_every, 1, "--restart-every", "e.g. --restart-every 5000")
        for name in ("n_tokens", "n_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag[2:]} must be >= 1, got {value}", flag, f"omit {flag} for the preset's value")
        check_dtype(self.dtype)
        check_device(self.device)
        if self.apply is not None:
            bad = [g for g in self.apply if g not in UNET_GROUPS]
            if bad or (self.preset == "sd3" and self.apply):
                raise ConfigError(f"bad --apply {self.apply}", "--apply", f"UNet presets take a subset of {UNET_GROUPS}; sd3 uses --n-layers")
        if self.preset != "sd3" and self.n_layers not in (None, 1):
            raise ConfigError("UNet presets use one token set", "--n-layers", "use --apply to choose block groups")
        self.resolution = parse_resolution(self.resolution)
        if self.resolution != "native" and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"resolution must be a positive multiple of 8, got {self.resolution}", "--resolution", "e.g. --resolution 512 or native")
        if self.accumulate < 1:
            raise ConfigError(f"accumulate must be >= 1, got {self.accumulate}", "--accumulate", "e.g. --accumulate 1")
        if self.best_by not in BEST_BY:
            raise ConfigError(f"unknown --best-by {self.best_by!r}", "--best-by", f"use one of {', '.join(BEST_BY)}")
        if self.best_by != "none":
            if self.eval_prompts is None and self.eval_holdout < 1:
                raise ConfigError(f"eval-holdout must be >= 1, got {self.eval_holdout}", "--eval-holdout", "or pass --eval-prompts FILE, or --best-by none")
            if self.eval_every < 1:
                raise ConfigError(f"eval-every must be >= 1, got {self.eval_every}", "--eval-every", f"e.g. --eval-every {DEFAULT_EVAL_EVERY}")
            if self.eval_steps is not None and self.eval_steps < 1:
                raise ConfigError(f"eval-steps must be >= 1, got {self.eval_steps}", "--eval-steps", "omit it for the official sampler's steps")
            if self.eval_batch_size < 1:
                raise ConfigError(f"eval-batch-size must be >= 1, got {self.eval_batch_size}", "--eval-batch-size", "e.g. --eval-batch-size 4")
            if self.eval_size is not None and (self.eval_size < 8 or self.eval_size % 8):
                raise ConfigError(f"eval-size must be a positive multiple of 8, got {self.eval_size}", "--eval-size", "omit it for the model's native size")

    def validate(self) -> None:
        """The value checks plus the file system: what must exist when the run starts."""
        self.check_values()
        if not Path(self.batches).is_dir():
            raise ConfigError(f"batches folder {self.batches} does not exist", "--batches", "point it at the output of `dataprep batches`")
        if self.best_by != "none" and self.eval_prompts is not None and not Path(self.eval_prompts).is_file():
            raise ConfigError(f"eval prompts file {self.eval_prompts} does not exist", "--eval-prompts", "one prompt per line")
        local = Path(self.model)
        if (local.exists() or self.model.startswith((".", "/"))) and not (local / "model_index.json").exists():
            raise ConfigError(f"{self.model} is not a diffusers pipeline folder (no model_index.json)", "--model", "give a diffusers pipeline folder or hub id")

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
    ``best_by="none"``), ``curves.png`` (when matplotlib is installed) and
    ``_manifest.json`` (:class:`dataprep.store.Manifest`, as every stage
    writes; the result's ``summary`` is the stage summary to print with
    :func:`dataprep.runtime.print_summary`). ``cfg.resume`` continues from the newest checkpoint with the
    same trajectory. Under ``torchrun``/``accelerate launch`` every process
    calls this; see the module docstring for how they share the work.
    """
    group = distributed.from_env(cfg.device)
    try:
        return run_training(cfg, group, on_step)
    finally:
        group.close()
