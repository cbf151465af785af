"""One training step's pieces: the token config, token init, the optimiser, and loss + backward.

The loss itself is :func:`softrepa.loss.softrepa_loss` (pure, tested bit for
bit); here it is wrapped with autocast and the optional fp16 grad scaler.
:func:`training_precision` is the trainer's one precision decision, in the
``--device``/``--dtype`` vocabulary of :mod:`dataprep.runtime`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from dataprep.errors import ConfigError
from dataprep.runtime import resolve_device, resolve_dtype
from softrepa.backbone import Parts, PromptCache, PromptEmbeds, grid_errors
from softrepa.loss import DEFAULT_SCALE, DEFAULT_TEMPERATURE, LossOutput, softrepa_loss
from softrepa.tokens import SoftTokens, TokenConfig


def training_precision(dtype: str, device: str) -> tuple[torch.device, torch.dtype, torch.dtype | None]:
    """``(device, weight dtype, autocast dtype or None)`` for ``--dtype`` on ``--device``.

    The dtype comes from :func:`dataprep.runtime.resolve_dtype` (``auto``:
    bfloat16 on CUDA, or float16 where bf16 is not supported; float32
    elsewhere). Training keeps a float32 run free of autocast; a half dtype
    means frozen weights in that dtype under autocast (float16 with a grad
    scaler), which the trainer supports on CUDA only.
    """
    dev = torch.device(resolve_device(device))
    weights = resolve_dtype(dtype, str(dev))
    if weights == torch.float32:
        return dev, weights, None
    if dev.type != "cuda":
        raise ConfigError(f"{dtype} autocast needs a CUDA device, got {dev}", "--dtype", "use --dtype float32 (or auto) off CUDA")
    return dev, weights, weights


def token_config(cfg: Any, denoiser: torch.nn.Module) -> TokenConfig:
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


def make_optimizer(tokens: SoftTokens, cfg: Any):
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
    ctx = torch.autocast(parts.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with ctx:
        errors = grid_errors(parts, model, latents, prompts, t, noise)
    out = softrepa_loss(errors.float(), positive_index, scale, temperature, denoise_weight)
    (scaler.scale(out.loss) if scaler is not None else out.loss).backward()
    return out
