"""Token files: the official ``.pth`` files in and out, beside our safetensors + JSON format.

Our format (written and read by :func:`softrepa.tokens.save_tokens` /
:func:`~softrepa.tokens.load_tokens`, re-exported here), one directory per token set:

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
Shapes of the released files: sd3 ``dc_tokens`` [5, 4, 1536] + ``dc_t_tokens``
Embedding(100, 7680); sd1.5 ``dc_tokens`` [4, 768] + Embedding(100, 768);
sdxl ``dc_tokens`` [4, 2048] (no t-dependence).

Both directions: :func:`read_official` / :func:`import_official` read them,
:func:`export_official` writes the same types and shapes, so tokens trained
here load into the official ``SD3Transformer2DModel_DC`` / UNet wrappers
(``edit_sd3.py`` assigns ``torch.load(...)`` to ``denoiser.dc_tokens``) and an
export followed by an import gives the same tensors bit for bit.

The current official trainer (``transformer.py``) creates SD3 ``dc_tokens``
4096 wide, i.e. *before* ``context_embedder`` (T5 width), and projects them
in every forward pass (``if dc1.shape[-1] == 4096: dc1 =
context_embedder(dc1)``), before adding the t-embedding. Our tokens live
after ``context_embedder``; the projection is linear, so importing such a
file with the model's ``context_embedder`` is exact: ``W x + b`` computed
once instead of in every step.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataprep.store import atomic_file

# our format lives with the module it stores; re-exported here for the importers of token files
from softrepa.tokens import BACKBONES, CONFIG_FILE, FORMAT, N_TIME_BUCKETS, TENSORS_FILE, VERSION, SoftTokens, TokenConfig, load_tokens, save_tokens  # noqa: F401

if TYPE_CHECKING:
    import torch

# The official UNet wrapper defaults (train.py/run_train.sh): which block
# groups a .pth was trained for is not stored in the file, so it comes from here.
OFFICIAL_UNET_APPLY = {"sd1.5": ("down",), "sdxl": ("down", "mid")}


class UnsafeTokenFile(pickle.UnpicklingError):
    """A token file whose pickle holds more than tensors, parameters and ``nn.Embedding``."""


def _safe_load(path: Path) -> Any:
    """``torch.load`` with weights only and an allow-list of ``nn.Embedding``.

    A pickle naming any other global is refused with :class:`UnsafeTokenFile`.
    torch's own message goes on to suggest loading with ``weights_only=False``,
    which would run whatever the file holds, so only the offending global is
    kept from it.
    """
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


class NeedsContextEmbedder(ValueError):
    """SD3 tokens wider than the text stream: they need the model's ``context_embedder``."""


def project_tokens(tokens: "torch.Tensor", context_embedder: "torch.nn.Module") -> "torch.Tensor":
    """``[L, N, joint_attention_dim]`` -> ``[L, N, caption_projection_dim]`` through
    the model's ``context_embedder`` (a ``Linear``), in float64 then back to float32,
    exactly what the official forward applies to 4096-wide tokens every step."""
    import torch

    weight = context_embedder.weight.detach().to("cpu", torch.float64)  # [D_out, D_in]
    bias = context_embedder.bias
    out = tokens.to(torch.float64) @ weight.T
    if bias is not None:
        out = out + bias.detach().to("cpu", torch.float64)
    return out.to(torch.float32)


def read_official(src_dir: Path | str, backbone: str, context_embedder: "torch.nn.Module | None" = None) -> SoftTokens:
    """Read ``dc_tokens.pth`` (+ ``dc_t_tokens.pth`` if present) from ``src_dir``.

    sd3: ``dc_tokens`` ``[L, N, D]``, ``dc_t_tokens`` ``[100, L*D]`` chunked per
    layer along the last axis (as the official forward does). UNet:
    ``dc_tokens`` ``[N, D]`` -> ``[1, N, D]``, ``dc_t_tokens`` ``[100, D]``.

    sd3 tokens whose width is ``context_embedder``'s input width (4096 on
    SD3-medium) are projected through it (see module doc); without
    ``context_embedder`` they raise :class:`NeedsContextEmbedder`. The
    t-embedding is added after the projection in the official forward, so it
    is kept as is.
    """
    import torch

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
        if context_embedder is not None:
            d_in, d_out = int(context_embedder.in_features), int(context_embedder.out_features)
            if dim == d_in and dim != d_out:
                tokens = project_tokens(tokens, context_embedder)
                dim = d_out
            elif dim != d_out:
                raise ValueError(f"{tok_path}: token width {dim} is neither the model's text width {d_out} nor its context_embedder input {d_in}")
        elif dim == 4096:
            raise NeedsContextEmbedder(
                f"{tok_path}: tokens of width 4096 are pre-context_embedder (the official trainer's layout); "
                "pass the SD3 model (--model) so they can be projected through its context_embedder")
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


def import_official(src_dir: Path | str, out_dir: Path | str, backbone: str, context_embedder: "torch.nn.Module | None" = None) -> SoftTokens:
    """Convert an official token folder to our format; returns the module.

    ``context_embedder``: the SD3 transformer's, needed for 4096-wide tokens.
    """
    module = read_official(src_dir, backbone, context_embedder)
    extra = {"imported_from": str(Path(src_dir).resolve()), "source": "official SoftREPA .pth"}
    if context_embedder is not None and backbone == "sd3":
        extra["projected_through_context_embedder"] = True
    save_tokens(module, out_dir, extra=extra)
    return module


def load_context_embedder(model: str | Path, revision: str | None = None) -> "torch.nn.Module":
    """The ``context_embedder`` of an SD3 pipeline folder / hub id (its transformer only is loaded)."""
    import torch
    from diffusers import SD3Transformer2DModel

    path = Path(model)
    kwargs: dict[str, Any] = {"torch_dtype": torch.float32}
    if revision:
        kwargs["revision"] = revision
    if (path / "config.json").exists():  # a transformer folder
        transformer = SD3Transformer2DModel.from_pretrained(str(path), **kwargs)
    else:
        transformer = SD3Transformer2DModel.from_pretrained(str(model), subfolder="transformer", **kwargs)
    return transformer.context_embedder.requires_grad_(False)


OFFICIAL_FILES = ("dc_tokens.pth", "dc_t_tokens.pth")


def export_official(tokens: SoftTokens | Path | str, out_dir: Path | str) -> list[Path]:
    """Write ``dc_tokens.pth`` (+ ``dc_t_tokens.pth`` when t-dependent) as the official code saves them.

    ``dc_tokens``: ``torch.save(nn.Parameter)``, sd3 ``[L, N, D]`` (after
    ``context_embedder``, like the released ``tokens/sd3``), UNet ``[N, D]``.
    ``dc_t_tokens``: ``torch.save(nn.Embedding(100, L * D))``. Tensors stay
    float32, so :func:`read_official` gives back exactly the saved values.
    Files are written to temp names and renamed. Returns the paths written.
    """
    import torch

    module = load_tokens(tokens) if isinstance(tokens, (str, Path)) else tokens
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = module.tokens.detach().to("cpu", torch.float32).clone()
    if module.config.backbone != "sd3":
        t = t[0]  # UNet files hold one token set [N, D]
    objects: list[tuple[str, Any]] = [("dc_tokens.pth", torch.nn.Parameter(t.contiguous(), requires_grad=True))]
    if module.t_embedding is not None:
        weight = module.t_embedding.weight.detach().to("cpu", torch.float32)
        emb = torch.nn.Embedding(N_TIME_BUCKETS, weight.shape[1])
        with torch.no_grad():
            emb.weight.copy_(weight)
        objects.append(("dc_t_tokens.pth", emb))
    written = []
    for name, obj in objects:
        with atomic_file(out / name) as tmp:
            torch.save(obj, tmp)
        written.append(out / name)
    stale = out / "dc_t_tokens.pth"
    if module.t_embedding is None and stale.exists():
        stale.unlink()  # an old t-embedding beside new t-independent tokens would be loaded with them
    return written
