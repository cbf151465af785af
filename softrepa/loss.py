"""Contrastive score-matching loss (SoftREPA, section 3; official ``train.py``).

For a grid of ``B`` images x ``P`` prompts denoised at one timestep with one
noise, ``E[i, j]`` is the mean squared error of the model's prediction for
image ``i`` conditioned on prompt ``j`` (velocity for SD3's flow matching,
noise for SD1.5/SDXL). A lower error means the prompt explains the image
better, so the logits are a decreasing function of it:

    logits = scale * exp(-E / temperature)                 # [B, P]
    loss   = CE(logits, positive_index) + denoise_weight * mean_i E[i, pos_i]

Everything here is a pure function of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_SCALE = 4.0
DEFAULT_TEMPERATURE = 0.07


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    contrastive: torch.Tensor  # scalar, the cross-entropy part
    denoise: torch.Tensor  # scalar, mean error of the positives
    accuracy: float  # fraction of images whose positive has the lowest error


def error_matrix(pred: torch.Tensor, target: torch.Tensor, n_images: int, n_prompts: int) -> torch.Tensor:
    """Per-pair MSE, prompt-major layout -> ``E`` ``[B, P]``.

    ``pred`` and ``target`` are ``[P * B, C, H, W]`` with row ``j * B + i`` =
    image ``i`` under prompt ``j`` (the trainer's layout). ``target`` may also
    be ``[B, C, H, W]`` (it does not depend on the prompt) and is broadcast.
    """
    pred = pred.float().reshape(n_prompts, n_images, *pred.shape[1:])  # [P, B, C, H, W]
    target = target.float()
    if target.shape[0] == n_prompts * n_images:
        target = target.reshape(n_prompts, n_images, *target.shape[1:])
    err = (pred - target).pow(2).flatten(2).mean(-1)  # [P, B]
    return err.transpose(0, 1)  # [B, P]


def contrastive_logits(errors: torch.Tensor, scale: float = DEFAULT_SCALE, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """``scale * exp(-E / temperature)``, ``[B, P]``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return scale * torch.exp(-errors / temperature)


def retrieval_accuracy(errors: torch.Tensor, positive_index: torch.Tensor) -> float:
    """How often the positive prompt has the lowest error in its image's row."""
    return (errors.argmin(dim=1) == positive_index.to(errors.device)).float().mean().item()


def softrepa_loss(
    errors: torch.Tensor,
    positive_index: torch.Tensor,
    scale: float = DEFAULT_SCALE,
    temperature: float = DEFAULT_TEMPERATURE,
    denoise_weight: float = 0.0,
) -> LossOutput:
    """Contrastive score-matching loss on an error matrix.

    errors: ``[B, P]`` (float); positive_index: ``[B]`` long, the column of
    each image's own prompt. ``denoise_weight`` adds the plain denoising loss
    of the positives (0 for SD3; the official SD1.5/SDXL runs add it).
    """
    if errors.ndim != 2:
        raise ValueError(f"errors must be [B, P], got {list(errors.shape)}")
    positive_index = positive_index.to(errors.device).long()
    if positive_index.shape != (errors.shape[0],):
        raise ValueError(f"positive_index must be [{errors.shape[0]}], got {list(positive_index.shape)}")
    logits = contrastive_logits(errors.float(), scale, temperature)
    ce = F.cross_entropy(logits, positive_index)
    rows = torch.arange(errors.shape[0], device=errors.device)
    denoise = errors[rows, positive_index].float().mean()
    loss = ce + denoise_weight * denoise if denoise_weight else ce
    return LossOutput(loss=loss, contrastive=ce.detach(), denoise=denoise.detach(),
                      accuracy=retrieval_accuracy(errors.detach(), positive_index))
