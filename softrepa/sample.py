"""Side-by-side samples: the same prompt and seed with and without soft tokens.

The tokens are installed on the pipeline's own denoiser with
:func:`softrepa.tokens.wrap_model` (hooks), so the unmodified diffusers
pipeline runs them; toggling ``wrapper.enabled`` switches them off for the
baseline image. Everything else (scheduler, noise, guidance) is identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from softrepa.backbone import T5_MAX_LENGTH
from softrepa.pipelines import load_pipeline
from softrepa.tokens import load_tokens, wrap_model

# Inference settings of the official sampler (train.py sample_cfg)
DEFAULT_STEPS = {"sd3": 28, "sdxl": 30, "sd1.5": 30}
DEFAULT_GUIDANCE = {"sd3": 4.0, "sdxl": 7.0, "sd1.5": 7.0}


@dataclass
class SampleResult:
    base: Path  # without tokens
    with_tokens: Path
    side_by_side: Path  # [base | with tokens]


def sample_pair(model: str, tokens_dir: str | Path, prompt: str, out: str | Path, seed: int = 0,
                steps: int | None = None, guidance: float | None = None, device: str = "auto",
                height: int | None = None, width: int | None = None) -> SampleResult:
    """Generate ``prompt`` twice with generator seed ``seed``: tokens off, tokens on.

    Writes ``out/base.png``, ``out/tokens.png`` and ``out/side_by_side.png``.
    """
    import torch
    from PIL import Image

    tokens = load_tokens(tokens_dir)
    backbone = tokens.config.backbone
    pipe = load_pipeline(model, backbone, device, "auto")
    dev = pipe.device
    denoiser = pipe.transformer if backbone == "sd3" else pipe.unet
    wrapper = wrap_model(denoiser, tokens.to(dev))
    kwargs = dict(prompt=prompt, num_inference_steps=steps or DEFAULT_STEPS[backbone],
                  guidance_scale=DEFAULT_GUIDANCE[backbone] if guidance is None else guidance,
                  height=height, width=width)
    if backbone == "sd3":
        kwargs["max_sequence_length"] = T5_MAX_LENGTH  # the official sampler's T5 length (as in training)
    images = []
    try:
        for enabled in (False, True):
            wrapper.enabled = enabled
            gen = torch.Generator(device="cpu").manual_seed(seed)
            with torch.no_grad():
                images.append(pipe(**kwargs, generator=gen).images[0])
    finally:
        wrapper.remove()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = images
    sbs = Image.new("RGB", (base.width + tok.width, max(base.height, tok.height)), "white")
    sbs.paste(base, (0, 0))
    sbs.paste(tok, (base.width, 0))
    paths = SampleResult(out / "base.png", out / "tokens.png", out / "side_by_side.png")
    base.save(paths.base)
    tok.save(paths.with_tokens)
    sbs.save(paths.side_by_side)
    return paths
