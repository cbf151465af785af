"""Editing metrics (paper, Tables 5 and 6): text alignment, structure, preference, FID.

Per image (source, edited, target prompt):

- ``clip``: cosine similarity of CLIP image and text embeddings (edited image
  vs target prompt; the paper reports it unscaled, ~0.26). Any ``CLIPModel``
  by hub id or local path; default ``openai/clip-vit-large-patch14``.
- ``pickscore``: PickScore = ``exp(logit_scale) * cosine`` of the PickScore
  CLIP (``yuvalkirstain/PickScore_v1``; the paper's ~21.7). Needs only
  transformers.
- ``lpips``: LPIPS between source and edited image. ``alex``/``vgg``/``squeeze``
  use the ``lpips`` package (the paper-comparable, calibrated metric; default
  ``vgg``, the net of the only official LPIPS code, SoftREPA ``eval.py``:
  ``lpips.LPIPS(net='vgg')``); without the package LPIPS is reported as
  unavailable with its install hint, like the other optional metrics; any
  other value is a transformers vision backbone (id or path) on whose
  channel-normalised activations :func:`lpips_distance` computes the
  uncalibrated LPIPS form (no learned per-channel weights) -- useful offline,
  not comparable with published numbers.
- ``imagereward`` (package ``image-reward``), ``hpsv2`` (package ``hpsv2``):
  optional; a missing package is reported with its install hint.

Per setting: ``fid`` between the source and the edited image sets
(InceptionV3 pool features from ``pytorch-fid``; optional), with the Fréchet
distance itself in :func:`frechet_distance`.

Everything heavy is imported inside functions.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dataprep.errors import ConfigError
from dataprep.runtime import resolve_device
from softrepa.paper import COLUMNS, LOWER_IS_BETTER  # noqa: F401 - the paper's table layout, declared once there
from softrepa.tiny import build_clip_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

PER_IMAGE = ("clip", "pickscore", "lpips", "imagereward", "hpsv2")
PER_SET = ("fid",)
ALL_METRICS = PER_IMAGE + PER_SET
#: column order of the summary table, as in the paper (higher is better unless in LOWER_IS_BETTER)
TABLE_ORDER = COLUMNS
LPIPS_PACKAGE_NETS = ("alex", "vgg", "squeeze")

#: metric -> (python module to import, install hint)
OPTIONAL_PACKAGES = {
    "imagereward": ("ImageReward", "pip install image-reward"),
    "hpsv2": ("hpsv2", "pip install hpsv2"),
    "fid": ("pytorch_fid", "pip install pytorch-fid"),
}


@dataclass
class MetricConfig:
    """Which metrics to compute and the models behind them (ids or local paths)."""

    metrics: tuple[str, ...] = ALL_METRICS
    clip_model: str = "openai/clip-vit-large-patch14"
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # None: the model's own
    lpips_model: str = "vgg"  # SoftREPA eval.py: lpips.LPIPS(net='vgg')
    batch_size: int = 8
    device: str = "auto"

    def __post_init__(self) -> None:
        self.metrics = tuple(self.metrics)
        self.check_values()

    def check_values(self) -> None:
        """The checks that need only the values (run when the config is built)."""
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown}", flag="--metrics", fix=f"choose from {', '.join(ALL_METRICS)}")
        if self.batch_size < 1:
            raise ConfigError("metric batch size must be >= 1", flag="--metric-batch-size", fix="e.g. 8")

    def validate(self) -> "MetricConfig":
        """The value checks plus the model folders given as local paths: they must exist when the run starts."""
        self.check_values()
        for flag, value, wanted in (
            ("--clip-model", self.clip_model, "clip"),
            ("--pickscore-model", self.pickscore_model, "pickscore"),
            ("--pickscore-processor", self.pickscore_processor, "pickscore"),
            ("--lpips-model", self.lpips_model, "lpips"),
        ):
            if wanted in self.metrics and value and _looks_local(value) and not Path(value).exists():
                raise ConfigError(f"{value} does not exist", flag=flag, fix="pass an existing folder or a hub id")
        return self


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).exists()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


LPIPS_HINT = "pip install lpips, or --lpips-model <transformers vision backbone> for the uncalibrated form"


def missing_metrics(metrics: Sequence[str], lpips_model: str | None = None) -> dict[str, str]:
    """Requested optional metrics whose package is not installed -> install hint.

    ``lpips`` counts when ``lpips_model`` is one of the package's nets and the
    ``lpips`` package is missing (other values need only transformers).
    """
    out = {m: hint for m, (module, hint) in OPTIONAL_PACKAGES.items() if m in metrics and not _has(module)}
    if "lpips" in metrics and lpips_model in LPIPS_PACKAGE_NETS and not _has("lpips"):
        out["lpips"] = LPIPS_HINT
    return out


# ------------------------------------------------------------------ pure pieces


def pil_to_tensor(images: Sequence["Image"]) -> "torch.Tensor":
    """PIL images of one size -> [B, 3, H, W] float in [0, 1]."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def normalize_channels(feat: "torch.Tensor", eps: float = 1e-10) -> "torch.Tensor":
    """Unit-normalise each spatial position's channel vector (LPIPS, Zhang et al. 2018, eq. 1)."""
    import torch

    return feat / (torch.sqrt((feat * feat).sum(dim=1, keepdim=True)) + eps)


def lpips_distance(feats_x: Sequence["torch.Tensor"], feats_y: Sequence["torch.Tensor"], weights: Sequence["torch.Tensor"] | None = None) -> "torch.Tensor":
    """LPIPS form over feature maps: sum_l mean_hw || w_l * (n(f_l(x)) - n(f_l(y))) ||^2.

    feats_*: per layer [B, C_l, H_l, W_l]; weights: per layer [C_l] (None = 1,
    the uncalibrated form). Returns [B]; identical inputs give exactly 0.
    """
    total = None
    for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
        d = (normalize_channels(fx) - normalize_channels(fy)) ** 2  # [B, C, H, W]
        if weights is not None:
            d = d * weights[i].view(1, -1, 1, 1)
        layer = d.sum(dim=1).mean(dim=(1, 2))  # [B]
        total = layer if total is None else total + layer
    if total is None:
        raise ValueError("no feature maps")
    return total


def frechet_distance(feats_a: "torch.Tensor", feats_b: "torch.Tensor") -> float:
    """Fréchet distance between Gaussians fitted to [N, D] and [M, D] features.

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), in
    float64 via symmetric eigendecompositions (no scipy). Needs N, M >= 2.
    """
    import torch

    a = feats_a.detach().to(torch.float64).cpu()
    b = feats_b.detach().to(torch.float64).cpu()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 images per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * tr_sqrt)


# ------------------------------------------------------------------ model-backed scorers


class ClipScorer:
    """CLIP-family image-text score. ``scaled=False``: cosine (CLIP score); True: PickScore."""

    def __init__(self, model: str, processor: str | None = None, scaled: bool = False, device: str = "auto"):
        from transformers import AutoProcessor, CLIPModel

        self.device = resolve_device(device)
        self.model = CLIPModel.from_pretrained(model).to(self.device).eval().requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(processor or model)
        self.scaled = scaled

    def __call__(self, images: Sequence["Image"], prompts: Sequence[str]) -> list[float]:
        """Score image i against prompt i; returns len(images) floats."""
        import torch

        tok = self.processor.tokenizer
        inputs = self.processor(
            text=list(prompts), images=[im.convert("RGB") for im in images], return_tensors="pt",
            padding=True, truncation=True, max_length=min(tok.model_max_length, self.model.config.text_config.max_position_embeddings),
        ).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # [B, D]
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # [B, D]
        cos = (img * txt).sum(-1)
        if self.scaled:
            cos = self.model.logit_scale.float().exp() * cos
        return cos.cpu().tolist()


class FeatureNet:
    """A transformers vision backbone as a feature pyramid for the LPIPS form.

    Uses every hidden state; [B, N, D] token states become [B, D, N, 1] maps.
    Inputs are normalised with the backbone's image-processor mean/std
    (ImageNet's when it has none).
    """

    def __init__(self, model: str, device: str = "auto"):
        import torch
        from transformers import AutoModel

        self.device = resolve_device(device)
        self.model = AutoModel.from_pretrained(model).to(self.device).eval().requires_grad_(False)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(model)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # no processor saved with the backbone: ImageNet statistics
        self.mean = torch.tensor(mean).view(1, 3, 1, 1).to(self.device)
        self.std = torch.tensor(std).view(1, 3, 1, 1).to(self.device)

    def __call__(self, x01: "torch.Tensor") -> list["torch.Tensor"]:
        import torch

        with torch.no_grad():
            out = self.model(pixel_values=((x01.to(self.device) - self.mean) / self.std), output_hidden_states=True)
        maps = []
        for h in out.hidden_states:
            maps.append(h.float() if h.dim() == 4 else h.float().transpose(1, 2).unsqueeze(-1))
        return maps


class LpipsScorer:
    """LPIPS(source, edited): the lpips package for alex/vgg/squeeze, else the uncalibrated form."""

    def __init__(self, model: str = "alex", device: str = "auto"):
        self.device = resolve_device(device)
        self.calibrated = model in LPIPS_PACKAGE_NETS
        if self.calibrated:
            import lpips

            self.net = lpips.LPIPS(net=model, verbose=False).to(self.device).eval()
        else:
            self.features = FeatureNet(model, device=self.device)

    def __call__(self, sources: Sequence["Image"], edits: Sequence["Image"]) -> list[float]:
        if len({im.size for im in [*sources, *edits]}) > 1:  # --size 0: every pair has its own size
            return [v for s, e in zip(sources, edits) for v in self._batch([s], [e])]
        return self._batch(sources, edits)

    def _batch(self, sources: Sequence["Image"], edits: Sequence["Image"]) -> list[float]:
        import torch

        x, y = pil_to_tensor(sources), pil_to_tensor(edits)
        if x.shape != y.shape:
            raise ValueError(f"LPIPS needs same-size images, got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.calibrated:
            with torch.no_grad():
                d = self.net(x.to(self.device) * 2 - 1, y.to(self.device) * 2 - 1)  # lpips wants [-1, 1]
            return d.flatten().cpu().tolist()
        return lpips_distance(self.features(x), self.features(y)).cpu().tolist()


class ImageRewardScorer:
    """ImageReward-v1.0 (THUDM). Takes image *paths*: every released version of
    the package opens files itself; only newer ones also accept PIL images."""

    def __init__(self, device: str = "auto"):
        import ImageReward

        self.model = ImageReward.load("ImageReward-v1.0", device=resolve_device(device))

    def __call__(self, paths: Sequence[str], prompts: Sequence[str]) -> list[float]:
        import torch

        with torch.no_grad():
            return [float(self.model.score(p, str(path))) for path, p in zip(paths, prompts)]  # a single path -> a float


class HPSv2Scorer:
    """HPS v2.1. Takes image paths (see :class:`ImageRewardScorer`)."""

    def __init__(self, device: str = "auto"):
        import hpsv2

        self.hpsv2 = hpsv2

    def __call__(self, paths: Sequence[str], prompts: Sequence[str]) -> list[float]:
        out = []
        for path, p in zip(paths, prompts):
            s = self.hpsv2.score([str(path)], p, hps_version="v2.1")
            out.append(float(s[0] if isinstance(s, (list, tuple)) else s))
        return out


#: per-image metrics whose scorer reads image files rather than PIL images
TAKES_PATHS = ("imagereward", "hpsv2")


class InceptionFeatures:
    """2048-d InceptionV3 pool features (pytorch-fid's FID network)."""

    def __init__(self, device: str = "auto"):
        from pytorch_fid.inception import InceptionV3

        self.device = resolve_device(device)
        self.net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(self.device).eval()

    def __call__(self, images: Sequence["Image"]) -> "torch.Tensor":
        import torch

        if len({im.size for im in images}) > 1:  # mixed sizes cannot stack: one at a time
            return torch.cat([self([im]) for im in images])
        with torch.no_grad():
            feats = self.net(pil_to_tensor(images).to(self.device))[0]  # [B, 2048, 1, 1]; resizes to 299 itself
        return feats.flatten(1).cpu()


@dataclass
class Scorers:
    """Loaded metric models plus what could not be loaded (metric -> reason, with the fix)."""

    per_image: dict[str, Any] = field(default_factory=dict)
    fid: Any = None
    unavailable: dict[str, str] = field(default_factory=dict)


def load_scorers(cfg: MetricConfig) -> Scorers:
    """Load every requested metric model. Missing optional packages are recorded, not raised.

    A core metric (clip, pickscore, lpips) whose model cannot be loaded raises
    ConfigError naming its flag; an optional one that fails to load is
    recorded in ``unavailable`` with the error.
    """
    cfg.validate()
    s = Scorers(unavailable={m: f"not installed ({hint})" for m, hint in missing_metrics(cfg.metrics, cfg.lpips_model).items()})
    core = {
        "clip": ("--clip-model", lambda: ClipScorer(cfg.clip_model, device=cfg.device)),
        "pickscore": ("--pickscore-model", lambda: ClipScorer(cfg.pickscore_model, cfg.pickscore_processor, scaled=True, device=cfg.device)),
        "lpips": ("--lpips-model", lambda: LpipsScorer(cfg.lpips_model, device=cfg.device)),
    }
    for name, (flag, build) in core.items():
        if name in cfg.metrics and name not in s.unavailable:
            try:
                s.per_image[name] = build()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load the {name} model: {exc}", flag=flag, fix="pass a hub id or a local folder the loader can read") from exc
    optional = {"imagereward": ImageRewardScorer, "hpsv2": HPSv2Scorer}
    for name, cls in optional.items():
        if name in cfg.metrics and name not in s.unavailable:
            try:
                s.per_image[name] = cls(device=cfg.device)
            except Exception as exc:  # noqa: BLE001 -- third-party loaders raise anything; record and go on
                s.unavailable[name] = f"failed to load: {type(exc).__name__}: {exc}"
    if "fid" in cfg.metrics and "fid" not in s.unavailable:
        try:
            s.fid = InceptionFeatures(device=cfg.device)
        except Exception as exc:  # noqa: BLE001
            s.unavailable["fid"] = f"failed to load: {type(exc).__name__}: {exc}"
    return s


# ------------------------------------------------------------------ tiny random metric models (tests, demo)


def write_tiny_metric_models(root: Path | str) -> dict[str, Path]:
    """Write ``root/clip`` (a tiny random ``CLIPModel`` + processor) and ``root/lpips``
    (a tiny random ``ResNetModel`` feature network); returns name -> folder.

    Both are built from config, saved with ``save_pretrained`` and load back
    through the same ``from_pretrained`` path as the real models (no network).
    The tiny CLIP also serves as ``--pickscore-model``. Existing folders are reused.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ResNetConfig, ResNetModel

    root = Path(root)
    out = {"clip": root / "clip", "lpips": root / "lpips"}
    if not (out["clip"] / "config.json").exists():
        torch.manual_seed(0)
        tok = build_clip_tokenizer()
        n = len(tok)
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=n,
                    bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1, max_position_embeddings=77)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=30, patch_size=6)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out["clip"])
        proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}), tokenizer=tok)
        proc.save_pretrained(out["clip"])
    if not (out["lpips"] / "config.json").exists():
        torch.manual_seed(0)
        cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
        ResNetModel(cfg).save_pretrained(out["lpips"])
    return out
