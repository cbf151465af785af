"""The one way softrepa loads a Stable Diffusion pipeline: training, sampling and editing alike.

:func:`load_pipeline` picks the diffusers class of the backbone, loads the
weights in the requested dtype, freezes every component (no weight of the
base model ever trains; soft tokens are separate modules) and moves it to the
device. ``device`` and ``dtype`` take the project's one vocabulary
(:mod:`dataprep.runtime`: ``auto|cpu|cuda|cuda:N|mps`` and
``auto|float32|bfloat16|float16``) or an already resolved torch device /
dtype. A folder or id that is not a pipeline of that backbone is a
:class:`~dataprep.errors.ConfigError` naming ``--model``.

torch and diffusers are imported inside the function, so importing this
module stays cheap.
"""

from __future__ import annotations

from typing import Any

from dataprep.errors import ConfigError
from dataprep.runtime import resolve_device, resolve_dtype

#: backbone -> diffusers pipeline class name
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "sdxl": "StableDiffusionXLPipeline", "sd1.5": "StableDiffusionPipeline"}


def load_pipeline(model: str, backbone: str, device: Any = "auto", dtype: Any = "auto", revision: str | None = None) -> Any:
    """Load ``model`` (hub id or local folder) as the ``backbone``'s pipeline, frozen, on ``device``."""
    import diffusers
    import torch

    if backbone not in PIPELINES:
        raise ConfigError(f"unknown backbone {backbone!r}", "--preset", f"use one of {', '.join(PIPELINES)}")
    dev = resolve_device(str(device))
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    cls = getattr(diffusers, PIPELINES[backbone])
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}
    if revision:
        kwargs["revision"] = revision
    if backbone == "sd1.5":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot load {model} as a {cls.__name__}: {e}", "--model",
                          f"give a {backbone} diffusers pipeline (hub id or local folder with model_index.json), or the preset it was made for") from e
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.requires_grad_(False)
            comp.eval()
    return pipe.to(dev)
