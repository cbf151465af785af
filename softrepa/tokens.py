"""Soft text tokens and one adapter per backbone (SD3 MM-DiT, SD1.5/SDXL UNet).

The method (paper, appendix B and Algorithm 1; official code ``transformer.py``)
is peft-style prompt tuning on a frozen denoiser:

- :class:`TokenConfig`: what to learn (backbone, tokens, layers, width,
  timestep dependence, UNet block groups), with the paper's presets.
- :class:`SoftTokens`: an ``nn.Module`` that owns ONLY the learnable tensors:
  ``tokens`` ``[n_layers, n_tokens, dim]`` and, if ``t_dependent``,
  ``t_embedding`` = ``nn.Embedding(100, n_layers * dim)`` indexed by ``t // 10``
  (``t`` the 0..999 training timestep), whose row is split into ``n_layers``
  chunks of ``dim`` and added to every token of that layer.
- :func:`wrap_model`: installs the tokens on a diffusers denoiser with forward
  hooks, so no diffusers ``forward`` is copied:

  * SD3 (``SD3Transformer2DModel``): before transformer block ``k < n_layers``
    the layer-``k`` tokens are prepended to the text stream (width
    ``caption_projection_dim``, i.e. after ``context_embedder``); after block
    ``k`` the first ``n_tokens`` text positions are dropped again, so block
    ``k+1`` never sees layer ``k``'s tokens (Algorithm 1, lines 6-13).
  * UNet (``UNet2DConditionModel``): the tokens (``n_layers == 1``) are inserted
    right after the BOS position of the cross-attention context
    ``[bos, s_1..s_n, text_1..]`` for the cross-attention blocks of the chosen
    groups (``down``, ``mid``, ``up``); the other blocks see the plain context.

Hooks are live while the wrapper is ``enabled``: a diffusers pipeline holding
the *base* model then also runs with tokens (handy for sampling and FlowEdit);
``wrapper.enabled = False`` or ``wrapper.remove()`` restores the base exactly.

:func:`save_tokens` / :func:`load_tokens` store a token set in our format
(``tokens.safetensors`` + ``tokens.json``, see :mod:`softrepa.token_files`,
which also reads and writes the official ``.pth`` files).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataprep.store import atomic_file, atomic_write_text

BACKBONES = ("sd3", "sdxl", "sd1.5")
UNET_GROUPS = ("down", "mid", "up")
N_TIME_BUCKETS = 100  # t // 10 for t in 0..999 (official code)

# Our token file format (see :mod:`softrepa.token_files` for the official .pth files)
FORMAT = "softrepa-tokens"
VERSION = 1
TENSORS_FILE = "tokens.safetensors"
CONFIG_FILE = "tokens.json"


@dataclass
class TokenConfig:
    """What to learn. ``dim`` is the width of the stream the tokens join:
    SD3 ``caption_projection_dim`` (1536 for SD3-medium), UNet
    ``cross_attention_dim`` (768 SD1.5, 2048 SDXL)."""

    backbone: str
    n_tokens: int
    n_layers: int
    dim: int
    t_dependent: bool
    apply: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.apply = tuple(self.apply)
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.n_tokens < 1 or self.n_layers < 1 or self.dim < 1:
            raise ValueError(f"n_tokens, n_layers and dim must be >= 1, got {self.n_tokens}, {self.n_layers}, {self.dim}")
        if self.backbone == "sd3":
            if self.apply:
                raise ValueError("apply (UNet block groups) does not apply to sd3; use n_layers")
        else:
            if self.n_layers != 1:
                raise ValueError(f"UNet backbones share one token set across blocks: n_layers must be 1, got {self.n_layers}")
            bad = [g for g in self.apply if g not in UNET_GROUPS]
            if bad or not self.apply:
                raise ValueError(f"apply must be a non-empty subset of {UNET_GROUPS}, got {self.apply}")

    @classmethod
    def preset(cls, backbone: str, model: Any) -> "TokenConfig":
        """The paper's defaults (appendix B), with ``dim`` read from ``model``
        (the denoiser, or its ``config``):

        - sd3: 4 tokens x first 5 blocks, t-dependent (fewer blocks on a
          smaller model: ``min(5, num_layers)``);
        - sd1.5: 4 tokens on the down blocks, t-dependent (the official
          ``tokens/sd1.5`` files carry ``dc_t_tokens``);
        - sdxl: 8 tokens on down + mid blocks, no t-dependence.
        """
        config = getattr(model, "config", model)
        if backbone == "sd3":
            n_blocks = int(config.num_layers)
            return cls("sd3", n_tokens=4, n_layers=min(5, n_blocks), dim=int(config.caption_projection_dim), t_dependent=True)
        if backbone == "sd1.5":
            return cls("sd1.5", n_tokens=4, n_layers=1, dim=int(config.cross_attention_dim), t_dependent=True, apply=("down",))
        if backbone == "sdxl":
            return cls("sdxl", n_tokens=8, n_layers=1, dim=int(config.cross_attention_dim), t_dependent=False, apply=("down", "mid"))
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["apply"] = list(self.apply)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenConfig":
        return cls(**{k: (tuple(v) if k == "apply" else v) for k, v in d.items() if k in cls.__dataclass_fields__})


def timestep_index(timestep: torch.Tensor | float | int) -> torch.Tensor:
    """0..999 timestep(s) -> bucket ids ``t // 10`` in 0..99, shape ``[B]`` (or ``[1]``).

    Sampler timesteps are floats (SD3: sigma * 1000) and may reach 1000; they
    are clamped to 999 first (the official code subtracts 1 when t >= 1000).
    """
    t = torch.as_tensor(timestep)
    t = t.reshape(-1).floor().long().clamp(0, 999)
    return t // 10


class SoftTokens(nn.Module):
    """The learnable tensors, nothing else.

    ``tokens``: ``[n_layers, n_tokens, dim]``; ``t_embedding`` (if
    ``config.t_dependent``): ``nn.Embedding(100, n_layers * dim)``. Both start
    at N(0, 0.02) (Table 3 for SD3/SDXL; SD1.5 is re-initialised by the
    trainer from the empty-prompt embedding).
    """

    def __init__(self, config: TokenConfig):
        super().__init__()
        self.config = config
        c = config
        self.tokens = nn.Parameter(torch.empty(c.n_layers, c.n_tokens, c.dim))
        nn.init.normal_(self.tokens, mean=0.0, std=0.02)
        self.t_embedding: nn.Embedding | None = None
        if c.t_dependent:
            self.t_embedding = nn.Embedding(N_TIME_BUCKETS, c.n_layers * c.dim)
            nn.init.normal_(self.t_embedding.weight, mean=0.0, std=0.02)

    def layer_tokens(self, timestep: torch.Tensor | float | int | None, batch: int) -> list[torch.Tensor]:
        """Per layer the tokens to insert, each ``[batch, n_tokens, dim]``.

        ``timestep`` (scalar, ``[1]`` or ``[batch]``) is needed only when
        ``t_dependent``.
        """
        c = self.config
        base = self.tokens.unsqueeze(1).expand(-1, batch, -1, -1)  # [L, B, N, D]
        if self.t_embedding is None:
            return list(base.unbind(0))
        if timestep is None:
            raise ValueError("t-dependent soft tokens need the timestep")
        idx = timestep_index(timestep).to(self.tokens.device)  # [B] or [1]
        temb = self.t_embedding(idx).reshape(-1, c.n_layers, c.dim)  # [B|1, L, D]
        temb = temb.expand(batch, -1, -1).permute(1, 0, 2).unsqueeze(2)  # [L, B, 1, D]
        return list((base + temb).unbind(0))


def _replace_arg(args: tuple, kwargs: dict, name: str, position: int, fn) -> tuple[tuple, dict]:
    """Apply ``fn`` to argument ``name`` whether it came by keyword or position."""
    if name in kwargs:
        kwargs = dict(kwargs)
        kwargs[name] = fn(kwargs[name])
    elif len(args) > position:
        args = tuple(fn(a) if i == position else a for i, a in enumerate(args))
    return args, kwargs


class _TokenWrapper(nn.Module):
    """Shared machinery: owns ``base`` (frozen) and ``tokens``; hooks do the work.

    Attribute access falls through to the base model (``config``, ``dtype``,
    ``device``...), so code written for the base keeps working on the wrapper.
    """

    def __init__(self, base: nn.Module, tokens: SoftTokens | None):
        super().__init__()
        self.base = base
        self.tokens = tokens
        self.enabled = True
        self._handles: list[Any] = []
        self._layer_tokens: list[torch.Tensor] | None = None
        self._signature = inspect.signature(base.forward)
        # callers that introspect (inspect.signature(model.forward), as diffusers
        # pipelines do) see exactly the base model's arguments
        self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), base.forward)
        if tokens is not None:
            # two live token sets on one base would both insert: refuse instead
            if getattr(base, "_softrepa_wrapped", False):
                raise ValueError("this model already carries soft tokens; call .remove() on its wrapper first")
            self._handles.append(base.register_forward_pre_hook(self._capture, with_kwargs=True))
            self._install()
            base._softrepa_wrapped = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    @property
    def active(self) -> bool:
        return self.enabled and self.tokens is not None

    def remove(self) -> None:
        """Detach every hook: the base model is back to its own behaviour."""
        for h in self._handles:
            h.remove()
        if self._handles:
            self.base._softrepa_wrapped = False
        self._handles.clear()
        self.tokens = None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Base forward pre-hook: compute this call's per-layer tokens from its timestep."""
        if not self.active:
            self._layer_tokens = None
            return None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        batch = bound[self._sample_arg].shape[0]
        self._layer_tokens = self.tokens.layer_tokens(bound.get("timestep"), batch)
        return None

    def _install(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # the hooks installed on the base do the insertion; arguments as the base's
        return self.base(*args, **kwargs)


class SD3WithTokens(_TokenWrapper):
    """SD3 MM-DiT with per-block soft tokens (Algorithm 1). See module doc."""

    _sample_arg = "hidden_states"

    def _install(self) -> None:
        blocks = self.base.transformer_blocks
        n = self.tokens.config.n_layers
        if n > len(blocks):
            raise ValueError(f"n_layers={n} but the model has {len(blocks)} transformer blocks")
        for k in range(n):
            self._handles.append(blocks[k].register_forward_pre_hook(self._prepend(k), with_kwargs=True))
            self._handles.append(blocks[k].register_forward_hook(self._drop))

    def _prepend(self, k: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if not self.active or self._layer_tokens is None:
                return None
            tok = self._layer_tokens[k]

            def cat(ehs: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, N+S, D]
                return torch.cat([tok.to(ehs.dtype), ehs], dim=1)

            # blocks are called by keyword, or positionally under gradient checkpointing
            return _replace_arg(args, kwargs, "encoder_hidden_states", 1, cat)

        return hook

    def _drop(self, module: nn.Module, args: tuple, output: Any):
        if not self.active or self._layer_tokens is None:
            return None
        ehs, hs = output
        if ehs is None:  # a context_pre_only (last) block returns no text stream
            return output
        return ehs[:, self.tokens.config.n_tokens :], hs  # [B, N+S, D] -> [B, S, D]


class UNetWithTokens(_TokenWrapper):
    """SD1.5 / SDXL UNet with soft tokens after BOS in chosen block groups."""

    _sample_arg = "sample"

    def _install(self) -> None:
        groups = {
            "down": list(self.base.down_blocks),
            "mid": [self.base.mid_block] if self.base.mid_block is not None else [],
            "up": list(self.base.up_blocks),
        }
        n_hooked = 0
        for g in self.tokens.config.apply:
            for block in groups[g]:
                if getattr(block, "has_cross_attention", False):
                    self._handles.append(block.register_forward_pre_hook(self._insert, with_kwargs=True))
                    n_hooked += 1
        if n_hooked == 0:
            raise ValueError(f"no cross-attention block in groups {self.tokens.config.apply}")

    def _insert(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.active or self._layer_tokens is None:
            return None
        tok = self._layer_tokens[0]  # [B, N, D]
        n = tok.shape[1]

        def after_bos(ehs: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, 1+N+S-1, D]
            return torch.cat([ehs[:, :1], tok.to(ehs.dtype), ehs[:, 1:]], dim=1)

        def widen_mask(m: torch.Tensor | None) -> torch.Tensor | None:
            # UNet turns encoder_attention_mask into an additive bias [B, 1, S]
            # before the blocks: the tokens are always attended (bias 0)
            if m is None:
                return None
            pad = torch.zeros(*m.shape[:-1], n, dtype=m.dtype, device=m.device)
            return torch.cat([m[..., :1], pad, m[..., 1:]], dim=-1)

        # mid_block gets (sample, emb, encoder_hidden_states=...); down/up blocks keywords only
        args, kwargs = _replace_arg(args, kwargs, "encoder_hidden_states", 2, after_bos)
        if kwargs.get("encoder_attention_mask") is not None:
            kwargs = dict(kwargs, encoder_attention_mask=widen_mask(kwargs["encoder_attention_mask"]))
        return args, kwargs


def wrap_model(model: nn.Module, tokens: SoftTokens | None) -> _TokenWrapper:
    """Wrap a diffusers ``SD3Transformer2DModel`` or ``UNet2DConditionModel``.

    The result's ``forward`` takes exactly the base model's arguments and
    returns its output type. ``tokens=None`` or ``wrapper.enabled = False``
    gives the base model's output bit for bit. The base is not frozen here
    (the trainer freezes it and asserts it); the tokens must already be on
    the base's device.
    """
    name = type(model).__name__
    if hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder"):
        if tokens is not None and tokens.config.backbone != "sd3":
            raise ValueError(f"{tokens.config.backbone} tokens cannot go into {name}")
        cls = SD3WithTokens
    elif hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        if tokens is not None and tokens.config.backbone == "sd3":
            raise ValueError(f"sd3 tokens cannot go into {name}")
        cls = UNetWithTokens
    else:
        raise TypeError(f"wrap_model supports SD3Transformer2DModel and UNet2DConditionModel, got {name}")
    if tokens is not None:
        expected = int(model.config.caption_projection_dim if cls is SD3WithTokens else model.config.cross_attention_dim)
        if tokens.config.dim != expected:
            raise ValueError(f"token dim {tokens.config.dim} does not match the model's {expected}")
    return cls(model, tokens)


def save_tokens(tokens: SoftTokens, out_dir: Path | str, extra: dict[str, Any] | None = None) -> Path:
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
    with atomic_file(out_dir / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_tokens(directory: Path | str) -> SoftTokens:
    """Rebuild :class:`~softrepa.tokens.SoftTokens` from a saved directory (CPU, fp32)."""
    from safetensors.torch import load_file

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
