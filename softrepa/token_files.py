"""Token files: our safetensors + JSON format, and import of the official ``.pth``.

Our format, one directory per token set:

- ``tokens.safetensors``: ``tokens`` ``[n_layers, n_tokens, dim]`` (fp32) and,
  when t-dependent, ``t_embedding`` ``[100, n_layers * dim]``;
- ``tokens.json``: ``{"format": "softrepa-tokens", "version": 1, "config":
  TokenConfig, "shapes": {...}, ...extra}`` -- enough to rebuild the module
  without the model.

The official code saves ``torch.save(nn.Parameter)`` (``dc_tokens.pth``) and
``torch.save(nn.Embedding)`` (``dc_t_tokens.pth``): Python pickles. They are
read here only with ``torch.load(weights_only=True)`` plus an explicit
allow-list of exactly ``nn.Embedding`` (parameters and tensors are already on
torch's weights-only list); anything else in the pickle fails the load.
Shapes (shared/README.md): sd3 ``dc_tokens`` [5, 4, 1536] + ``dc_t_tokens``
Embedding(100, 7680); sd1.5 ``dc_tokens`` [4, 768] + Embedding(100, 768);
sdxl ``dc_tokens`` [4, 2048] (no t-dependence).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from softrepa.tokens import SoftTokens

FORMAT = "softrepa-tokens"
VERSION = 1
TENSORS_FILE = "tokens.safetensors"
CONFIG_FILE = "tokens.json"

# The official UNet wrapper defaults (train.py/run_train.sh): which block
# groups a .pth was trained for is not stored in the file, so it comes from here.
OFFICIAL_UNET_APPLY = {"sd1.5": ("down",), "sdxl": ("down", "mid")}


def save_tokens(tokens: "SoftTokens", out_dir: Path | str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``tokens.safetensors`` and ``tokens.json`` into ``out_dir`` (created).

    Both files are written to temp names and renamed, JSON last, so a reader
    that finds ``tokens.json`` also finds the tensors it describes.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"tokens": tokens.tokens.detach().float().cpu().contiguous()}
    if tokens.t_embedding is not None:
        tensors["t_embedding"] = tokens.t_embedding.weight.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": tokens.config.to_dict(),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        **(extra or {}),
    }
    tmp = out_dir / f".{TENSORS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    os.replace(tmp, out_dir / TENSORS_FILE)
    tmp = out_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / CONFIG_FILE)
    return out_dir


def load_tokens(directory: Path | str) -> "SoftTokens":
    """Rebuild :class:`~softrepa.tokens.SoftTokens` from a saved directory (CPU, fp32)."""
    import torch
    from safetensors.torch import load_file

    from softrepa.tokens import SoftTokens, TokenConfig

    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: not a token directory (expected {CONFIG_FILE} + {TENSORS_FILE})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{cfg_path}: version {meta['version']} is newer than this code reads ({VERSION})")
    config = TokenConfig.from_dict(meta["config"])
    tensors = load_file(str(directory / TENSORS_FILE))
    module = SoftTokens(config)
    with torch.no_grad():
        if tuple(tensors["tokens"].shape) != tuple(module.tokens.shape):
            raise ValueError(f"tokens shape {tuple(tensors['tokens'].shape)} != config's {tuple(module.tokens.shape)}")
        module.tokens.copy_(tensors["tokens"])
        if module.t_embedding is not None:
            if "t_embedding" not in tensors:
                raise ValueError(f"{directory}: config is t-dependent but {TENSORS_FILE} has no t_embedding")
            module.t_embedding.weight.copy_(tensors["t_embedding"])
    return module


class UnsafeTokenFile(pickle.UnpicklingError):
    """A token file whose pickle holds more than tensors, parameters and ``nn.Embedding``."""


def _safe_load(path: Path) -> Any:
    """``torch.load`` with weights only and an allow-list of ``nn.Embedding``.

    A pickle naming any other global is refused with :class:`UnsafeTokenFile`.
    torch's own message goes on to suggest loading with ``weights_only=False``,
    which would run whatever the file holds, so only the offending global is
    kept from it.
    """
    import re

    import torch

    try:
        with torch.serialization.safe_globals([torch.nn.Embedding]):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it names {found.group(1)}, which is not a tensor, parameter or nn.Embedding" if found else "its pickle holds objects other than tensors"
        raise UnsafeTokenFile(f"{path}: refused for safety: {what}. Token files are only read as plain tensors; "
                              f"re-save the tokens as a tensor or nn.Embedding from trusted code") from None


def _as_tensor(obj: Any, what: str):
    import torch

    if isinstance(obj, torch.nn.Embedding):
        return obj.weight.detach()
    if isinstance(obj, torch.Tensor):  # nn.Parameter is a Tensor
        return obj.detach()
    if isinstance(obj, dict) and len(obj) == 1:  # a state_dict of one tensor
        return _as_tensor(next(iter(obj.values())), what)
    raise ValueError(f"{what}: expected a tensor, parameter or nn.Embedding, got {type(obj).__name__}")


def read_official(src_dir: Path | str, backbone: str) -> "SoftTokens":
    """Read ``dc_tokens.pth`` (+ ``dc_t_tokens.pth`` if present) from ``src_dir``.

    sd3: ``dc_tokens`` ``[L, N, D]``, ``dc_t_tokens`` ``[100, L*D]`` chunked per
    layer along the last axis (as the official forward does). UNet:
    ``dc_tokens`` ``[N, D]`` -> ``[1, N, D]``, ``dc_t_tokens`` ``[100, D]``.
    """
    import torch

    from softrepa.tokens import BACKBONES, N_TIME_BUCKETS, SoftTokens, TokenConfig

    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    src_dir = Path(src_dir)
    tok_path = src_dir / "dc_tokens.pth"
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path} not found")
    tokens = _as_tensor(_safe_load(tok_path), str(tok_path)).float()
    t_path = src_dir / "dc_t_tokens.pth"
    t_emb = _as_tensor(_safe_load(t_path), str(t_path)).float() if t_path.exists() else None

    if backbone == "sd3":
        if tokens.ndim != 3:
            raise ValueError(f"{tok_path}: sd3 dc_tokens must be [layers, tokens, dim], got {list(tokens.shape)}")
        n_layers, n_tokens, dim = tokens.shape
        if dim == 4096:  # the official class can hold pre-context_embedder tokens; ours live after it
            raise ValueError(f"{tok_path}: tokens of width 4096 (before context_embedder) are not supported")
        config = TokenConfig("sd3", n_tokens=n_tokens, n_layers=n_layers, dim=dim, t_dependent=t_emb is not None)
    else:
        if tokens.ndim != 2:
            raise ValueError(f"{tok_path}: {backbone} dc_tokens must be [tokens, dim], got {list(tokens.shape)}")
        n_tokens, dim = tokens.shape
        tokens = tokens.unsqueeze(0)
        config = TokenConfig(backbone, n_tokens=n_tokens, n_layers=1, dim=dim, t_dependent=t_emb is not None,
                             apply=OFFICIAL_UNET_APPLY[backbone])
    if t_emb is not None and tuple(t_emb.shape) != (N_TIME_BUCKETS, config.n_layers * config.dim):
        raise ValueError(f"{t_path}: expected [{N_TIME_BUCKETS}, {config.n_layers * config.dim}], got {list(t_emb.shape)}")
    module = SoftTokens(config)
    with torch.no_grad():
        module.tokens.copy_(tokens)
        if t_emb is not None:
            module.t_embedding.weight.copy_(t_emb)
    return module


def import_official(src_dir: Path | str, out_dir: Path | str, backbone: str) -> "SoftTokens":
    """Convert an official token folder to our format; returns the module."""
    module = read_official(src_dir, backbone)
    save_tokens(module, out_dir, extra={"imported_from": str(Path(src_dir).resolve()), "source": "official SoftREPA .pth"})
    return module
