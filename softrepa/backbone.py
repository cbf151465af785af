"""What the trainer needs from a frozen diffusers pipeline, per backbone.

Loading and freezing the pipeline (:func:`load_parts`), encoding each distinct
prompt once (:class:`PromptCache`), VAE-encoding images, and the grid forward
pass that gives the error matrix ``E`` ``[B, P]`` (:func:`grid_errors`):
SD3 flow matching (velocity target) and SD1.5/SDXL DDPM (noise or velocity
target). The training loop itself lives in :mod:`softrepa.train`; the
pipeline is loaded by :func:`softrepa.pipelines.load_pipeline`, the loader
sampling and editing use too. torch is imported at the top: nothing here
runs without it, and the command line imports this module only inside the
commands that train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dataprep.errors import ConfigError
from softrepa.loss import error_matrix
from softrepa.pipelines import load_pipeline


#: SD3's T5 prompt length, in training and editing alike: the official sampler
#: (SoftREPA ``sampler.py``, ``StableDiffusion3Base.encode_prompt``) pads and
#: truncates T5 to 512 tokens after 77 CLIP tokens, and the released tokens were
#: trained and evaluated with that text stream (diffusers' default is 256).
T5_MAX_LENGTH = 512


@dataclass
class Parts:
    """What one step needs from a diffusers pipeline (all frozen)."""

    backbone: str
    pipe: Any
    denoiser: torch.nn.Module  # base SD3Transformer2DModel / UNet2DConditionModel
    vae: torch.nn.Module
    scheduler: Any
    resolution: int
    device: torch.device
    dtype: torch.dtype  # weights of the frozen parts


def load_parts(model: str, backbone: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, resolution: int | None = None) -> Parts:
    """Load the pipeline from ``model`` (id or path) with :func:`softrepa.pipelines.load_pipeline`, frozen.

    ``device`` and ``dtype`` are already resolved (the trainer decides them).
    The VAE stays in fp32 (SDXL's VAE overflows in fp16; it is only run once
    per image). Raises :class:`ConfigError` when the pipeline is not of the
    preset's family.
    """
    pipe = load_pipeline(model, backbone, device, dtype)
    device = torch.device(device)
    denoiser = pipe.transformer if backbone == "sd3" else pipe.unet
    pipe.vae.to(dtype=torch.float32)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    res = resolution or int(denoiser.config.sample_size) * vae_factor
    return Parts(backbone, pipe, denoiser, pipe.vae, pipe.scheduler, res, device, dtype)


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [P, S, D] text stream (SD3: CLIP+T5 joint; UNet: CLIP hidden states)
    pooled: torch.Tensor | None  # [P, D_pool] (SD3, SDXL) or None (SD1.5)


class PromptCache:
    """Encodes each distinct prompt once per run; CPU cache keyed by text."""

    def __init__(self, parts: Parts):
        self.parts = parts
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.encoded = 0

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        p, dev = self.parts.pipe, self.parts.device
        if self.parts.backbone == "sd3":
            emb, _, pooled, _ = p.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                                do_classifier_free_guidance=False, max_sequence_length=T5_MAX_LENGTH)
        elif self.parts.backbone == "sdxl":
            emb, _, pooled, _ = p.encode_prompt(prompt=prompts, device=dev, do_classifier_free_guidance=False)
        else:
            emb, _ = p.encode_prompt(prompts, dev, 1, False)
            pooled = None
        self.encoded += len(prompts)
        return [(emb[i].cpu(), None if pooled is None else pooled[i].cpu()) for i in range(len(prompts))]

    def __call__(self, prompts: list[str]) -> PromptEmbeds:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            self._cache.update(zip(todo, self._encode(todo)))
        dev = self.parts.device
        emb = torch.stack([self._cache[p][0] for p in prompts]).to(dev)
        pooled = None if self._cache[prompts[0]][1] is None else torch.stack([self._cache[p][1] for p in prompts]).to(dev)
        return PromptEmbeds(emb, pooled)


def load_image(uri: str, resolution: int) -> torch.Tensor:
    """Open a local path or fsspec URL (``zip://m::/f.zip``) -> ``[3, R, R]`` in [-1, 1].

    Shortest side resized to ``resolution`` (bicubic), then center-cropped, as
    the official training transform does.
    """
    import fsspec
    import numpy as np
    from PIL import Image

    with fsspec.open(uri, "rb") as fh:
        img = Image.open(fh)
        img.load()
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0  # [R, R, 3]
    return arr.permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_images(parts: Parts, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[B, 3, R, R]`` in [-1, 1] -> normalised latents ``[B, C, R/f, R/f]`` (fp32).

    Posterior samples use ``generator`` (CPU) so they are part of the
    checkpointed trajectory.
    """
    vae = parts.vae
    dist = vae.encode(pixels.to(parts.device, torch.float32)).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator).to(parts.device)
    z = dist.mean + dist.std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def noisy_and_target(parts: Parts, latents: torch.Tensor, noise: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_t, target)``, both ``[B, C, h, w]``; ``noise`` broadcasts from ``[1, C, h, w]``."""
    noise = noise.expand_as(latents)
    if parts.backbone == "sd3":
        sigma = t / 1000.0  # official: sigma = t / num_train_timesteps
        return (1 - sigma) * latents + sigma * noise, noise - latents
    # DDPM forward process from the scheduler's own alphas_cumprod, NOT
    # scheduler.add_noise: SDXL ships an EulerDiscreteScheduler whose add_noise
    # is the k-diffusion x + sigma * n (it expects scale_model_input before the
    # UNet), which is not the input the UNet was trained on at timestep t. The
    # official code swaps in a DDIMScheduler for the same reason.
    abar = parts.scheduler.alphas_cumprod[t].to(device=latents.device, dtype=torch.float32)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    zt = a * latents + s * noise
    kind = parts.scheduler.config.prediction_type
    if kind == "epsilon":
        return zt, noise
    if kind == "v_prediction":
        return zt, a * noise - s * latents
    raise ConfigError(f"prediction_type {kind!r} is not supported", "--model")


def predict_grid(parts: Parts, model: torch.nn.Module, zt: torch.Tensor, prompts: PromptEmbeds, t: int) -> torch.Tensor:
    """Run ``model`` on every (image, prompt) pair -> ``[P * B, C, h, w]``, row ``j * B + i``."""
    n_img, n_prm = zt.shape[0], prompts.embeds.shape[0]
    x = zt.repeat(n_prm, 1, 1, 1)  # [P*B, C, h, w]
    emb = prompts.embeds.repeat_interleave(n_img, dim=0)  # [P*B, S, D]
    n = x.shape[0]
    if parts.backbone == "sd3":
        timestep = torch.full((n,), float(t), device=x.device)
        pooled = prompts.pooled.repeat_interleave(n_img, dim=0)
        return model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=timestep, return_dict=False)[0]
    timestep = torch.full((n,), t, dtype=torch.long, device=x.device)
    added = None
    if parts.backbone == "sdxl":
        r = parts.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=emb.dtype, device=x.device).repeat(n, 1)
        added = {"text_embeds": prompts.pooled.repeat_interleave(n_img, dim=0), "time_ids": time_ids}
    return model(x, timestep, encoder_hidden_states=emb, added_cond_kwargs=added, return_dict=False)[0]


def grid_errors(parts: Parts, model: torch.nn.Module, latents: torch.Tensor, prompts: PromptEmbeds, t: int, noise: torch.Tensor) -> torch.Tensor:
    """Error matrix ``E`` ``[B, P]``: MSE of image i's prediction under prompt j."""
    zt, target = noisy_and_target(parts, latents, noise, t)
    pred = predict_grid(parts, model, zt.to(parts.dtype), prompts, t)
    return error_matrix(pred, target, latents.shape[0], prompts.embeds.shape[0])
