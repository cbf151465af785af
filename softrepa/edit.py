"""FlowEdit on Stable Diffusion 3, with or without soft tokens (paper, Tables 5 and 6).

FlowEdit (Kulikov et al., 2024) edits an image without inverting it. The
edited latent ``z_edit`` starts at the source latent ``x_src`` and follows the
*difference* of two flow-matching velocities: at each step a fresh noise
sample puts the source on its forward trajectory, the edit is carried along by
the same offset, and the edited latent moves by ``dt * (v_tgt - v_src)``::

    z_src_t = (1 - t) x_src + t noise           # forward (noising) path of the source
    z_tgt_t = z_src_t + (z_edit - x_src)        # the edit, shifted onto the same noise level
    z_edit += (t_next - t) * (v(z_tgt_t | target) - v(z_src_t | source))

Only the last ``n_max`` of ``steps`` steps edit (the earliest, noisiest ones
are skipped, which is what keeps structure); below ``n_min`` remaining steps
the result is finished by plain Euler sampling of the target prompt. Both
velocities use classifier-free guidance with their own scale.

The core, :func:`flowedit`, is a pure function over latents and a velocity
callable, so its algebra is testable without a model. :class:`SD3FlowEditor`
binds it to a loaded ``StableDiffusion3Pipeline`` (prompt encoding, VAE with
the pipeline's shift/scaling factors, scheduler sigmas) and to soft tokens
through ``softrepa.tokens.wrap_model``.

The pure core needs only torch; the SD3 binding loads its pipeline with
:func:`softrepa.pipelines.load_pipeline`, the loader the trainer and the
sampler use too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from dataprep.errors import ConfigError
from softrepa.backbone import T5_MAX_LENGTH
from softrepa.pipelines import load_pipeline
from softrepa.tokens import wrap_model

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL.Image import Image

#: Target-branch guidance rules. ``official``: ``c + w (c - u)``, the SoftREPA
#: editing script (``sampler.py``, ``SD3EulerFE.sample``: ``pred_v + tar_cfg_scale
#: * (pred_v - pred_vn)``), which the official README runs for both its FlowEdit
#: and its FlowEdit + tokens examples, so the paper's Tables 5/6 were made with
#: it (effective scale ``w + 1``). ``flowedit``: ``u + w (c - u)``, FlowEdit's own
#: code (``FlowEdit_utils.py``, ``calc_v_sd3``). The source branch is
#: ``u + w (c - u)`` in both scripts.
CFG_RULES = ("official", "flowedit")
#: earlier names of the same rules, still accepted
CFG_RULE_ALIASES = {"softrepa-official": "official", "standard": "flowedit"}

#: ``velocity(z_src, z_tgt, sigma) -> (v_src, v_tgt)``, both guided, shaped like
#: the latents. ``z_src`` is None in the plain-sampling phase; then only the
#: target branch is evaluated and ``v_src`` is returned as None.
Velocity = Callable[["torch.Tensor | None", "torch.Tensor", "torch.Tensor"], "tuple[torch.Tensor | None, torch.Tensor]"]


@dataclass(frozen=True)
class EditConfig:
    """FlowEdit settings. Defaults are the paper's vanilla FlowEdit on SD3.

    With soft tokens the paper uses ``n_max=30`` and ``tgt_cfg`` 9-13
    (Tables 5 and 6); vanilla uses ``n_max=33`` and ``tgt_cfg=13.5``.

    ``cfg_rule`` (flag ``--guidance-rule``): how the *target* branch is
    guided. ``official`` (default) is the SoftREPA editing script's
    ``c + w (c - u)``, an effective scale of ``w + 1``: the paper's numbers
    were made with it. ``flowedit`` is FlowEdit's ``u + w (c - u)``. The source
    branch always uses ``u + w (c - u)`` (both scripts). See :data:`CFG_RULES`.
    ``size``: the source is resized to ``size x size`` (the official script
    uses 1024); 0 keeps its own size, rounded down to what the model accepts.
    """

    # SoftREPA README's edit_sd3.py example (--NFE 50 --n_start 33 --src_cfg_scale 3.5
    # --tar_cfg_scale 13.5 --img_size 1024) = FlowEdit's SD3_exp.yaml (T_steps 50,
    # n_max 33, n_min 0, n_avg 1, src 3.5, tar 13.5)
    steps: int = 50
    n_max: int = 33
    n_min: int = 0
    src_cfg: float = 3.5
    tgt_cfg: float = 13.5
    n_avg: int = 1
    seed: int = 0
    size: int = 1024
    cfg_rule: str = "official"  # sampler.py SD3EulerFE.sample (see CFG_RULES)

    def __post_init__(self) -> None:
        self.validate()  # an EditConfig that exists is valid

    def validate(self) -> "EditConfig":
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}", flag="--steps", fix="use e.g. --steps 50")
        if not 0 <= self.n_max <= self.steps:
            raise ConfigError(f"n_max must be in [0, steps={self.steps}], got {self.n_max}", flag="--n-max", fix="e.g. --n-max 33 (vanilla) or 30 (with tokens)")
        if not 0 <= self.n_min <= self.n_max:
            raise ConfigError(f"n_min must be in [0, n_max={self.n_max}], got {self.n_min}", flag="--n-min", fix="use --n-min 0 (the paper's setting)")
        if self.n_avg < 1:
            raise ConfigError(f"n_avg must be >= 1, got {self.n_avg}", flag="--n-avg", fix="use --n-avg 1")
        if self.size < 0:
            raise ConfigError(f"size must be >= 0, got {self.size}", flag="--size", fix="use --size 1024, or 0 to keep the source size")
        for name, flag, value in (("source guidance", "--src-cfg", self.src_cfg), ("target guidance", "--tgt-cfg", self.tgt_cfg)):
            # nan passed float parsing and edited every pixel to black; a negative scale guides away from the prompt
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}", flag=flag, fix="e.g. --src-cfg 3.5 --tgt-cfg 13.5 (the paper's FlowEdit row)")
        if CFG_RULE_ALIASES.get(self.cfg_rule, self.cfg_rule) not in CFG_RULES:
            raise ConfigError(f"unknown guidance rule {self.cfg_rule!r}", flag="--guidance-rule", fix=f"one of {', '.join(CFG_RULES)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ pure core


def guide(uncond: "torch.Tensor", cond: "torch.Tensor", scale: float, rule: str = "flowedit") -> "torch.Tensor":
    """Classifier-free guidance: ``flowedit`` ``u + w (c - u)``, ``official`` ``c + w (c - u)``.

    See :data:`CFG_RULES` for where each rule comes from.
    """
    rule = CFG_RULE_ALIASES.get(rule, rule)
    if rule == "flowedit":
        return uncond + scale * (cond - uncond)
    if rule == "official":
        return cond + scale * (cond - uncond)
    raise ValueError(f"unknown guidance rule {rule!r}")


def flowedit(
    x_src: "torch.Tensor",
    velocity: Velocity,
    sigmas: "torch.Tensor",
    *,
    n_max: int,
    n_min: int = 0,
    n_avg: int = 1,
    generator: "Optional[torch.Generator]" = None,
) -> "torch.Tensor":
    """Edit a latent with FlowEdit; returns the edited latent (same shape/dtype as ``x_src``).

    x_src:    [B, C, H, W] clean source latent (already shifted/scaled for the model).
    sigmas:   [steps + 1] descending noise levels ending at 0 (``scheduler.sigmas``).
    n_max:    how many of the last steps edit; 0 returns ``x_src`` unchanged.
    n_min:    the last ``n_min`` steps are plain target sampling (SDEdit-style).
    n_avg:    noise samples averaged per step (FlowEdit's n_avg; paper: 1).
    generator: source of the per-step noise (CPU generator -> same edit on any device).

    If the velocity callable returns identical ``v_src`` and ``v_tgt`` (same
    prompt, same guidance, same inputs) the result is exactly ``x_src``.
    """
    import torch

    steps = len(sigmas) - 1
    if not 0 <= n_min <= n_max <= steps:
        raise ValueError(f"need 0 <= n_min ({n_min}) <= n_max ({n_max}) <= steps ({steps})")
    x0 = x_src.to(torch.float32)
    sig = sigmas.to(torch.float32).cpu()

    def noise_like() -> torch.Tensor:
        gen_device = generator.device if generator is not None else "cpu"
        return torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x0.device)

    z_edit = x0.clone()
    x_tgt: torch.Tensor | None = None  # set once the plain-sampling phase begins
    for i in range(steps):
        remaining = steps - i
        if remaining > n_max:
            continue  # early, noisy steps are skipped: this is what preserves structure
        t, t_next = sig[i].item(), sig[i + 1].item()
        sigma = sig[i].to(x0.device)
        if remaining > n_min:
            dv = torch.zeros_like(x0)
            for _ in range(n_avg):
                z_src = (1.0 - t) * x0 + t * noise_like()
                # offset first: z_edit - x0 is exactly 0 until the edit moves, so
                # identical prompts give identical inputs (and v_tgt - v_src == 0)
                z_tgt = z_src + (z_edit - x0)
                v_src, v_tgt = velocity(z_src, z_tgt, sigma)
                dv += (v_tgt.to(torch.float32) - v_src.to(torch.float32)) / n_avg
            z_edit = z_edit + (t_next - t) * dv
        else:
            if x_tgt is None:
                x_src_t = (1.0 - t) * x0 + t * noise_like()
                x_tgt = x_src_t + (z_edit - x0)
            _, v_tgt = velocity(None, x_tgt, sigma)
            x_tgt = x_tgt + (t_next - t) * v_tgt.to(torch.float32)
    out = z_edit if x_tgt is None else x_tgt
    return out.to(x_src.dtype)


# ------------------------------------------------------------------ SD3 binding


def load_sd3(model: str, device: str = "auto", dtype: str = "auto", revision: str | None = None) -> Any:
    """Load a ``StableDiffusion3Pipeline`` by hub id or local path, frozen, on ``device``
    (:func:`softrepa.pipelines.load_pipeline`; ``--device``/``--dtype`` in the dataprep vocabulary)."""
    pipe = load_pipeline(model, "sd3", device, dtype, revision)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SD3FlowEditor:
    """FlowEdit bound to one SD3 pipeline; soft tokens optional.

    ``tokens`` (a ``softrepa.tokens.SoftTokens``) wraps the transformer via
    ``softrepa.tokens.wrap_model``; the same tokens act on the source and the
    target branch, as in the SoftREPA editing script. The base transformer is
    shared, so one editor serves both methods: ``use_tokens`` switches the
    wrapper on or off before every forward pass.
    """

    def __init__(self, pipe: Any, tokens: Any = None):
        self.pipe = pipe
        self.base = pipe.transformer
        self.with_tokens = None
        if tokens is not None:
            self.with_tokens = wrap_model(self.base, tokens.to(self.device))
        self._uncond: tuple[Any, Any] | None = None
        self._prompt_cache: dict[tuple[str, ...], tuple[Any, Any]] = {}

    @property
    def device(self) -> "torch.device":
        return self.pipe.transformer.device

    @property
    def dtype(self) -> "torch.dtype":
        return self.pipe.transformer.dtype

    @property
    def multiple(self) -> int:
        """Pixel sizes must be multiples of this (VAE downsampling x patch size)."""
        return int(self.pipe.vae_scale_factor) * int(self.base.config.patch_size)

    # -- images <-> latents

    def target_size(self, width: int, height: int, size: int) -> tuple[int, int]:
        m = self.multiple
        if size:
            side = max(m, size // m * m)
            return side, side
        return max(m, width // m * m), max(m, height // m * m)

    def encode_image(self, image: "Image", size: int) -> "torch.Tensor":
        """PIL image -> [1, C, h, w] model latent ``(mode - shift) * scaling``.

        The posterior mode (not a sample) keeps the source latent
        deterministic, so ``n_max = 0`` reproduces it exactly.
        """
        import torch

        w, h = self.target_size(*image.size, size)
        pixels = self.pipe.image_processor.preprocess(image.convert("RGB"), height=h, width=w)  # [1, 3, h, w] in [-1, 1]
        vae = self.pipe.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (posterior.mode() - shift) * vae.config.scaling_factor

    def decode(self, latent: "torch.Tensor") -> list["Image"]:
        import torch

        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latent.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        with torch.no_grad():
            pixels = vae.decode(z, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    # -- prompts

    def encode_prompt(self, prompts: list[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """prompts -> (embeds [B, L, D], pooled [B, P]) via the pipeline's three text encoders.

        Cached for the last few prompt lists: the evaluator edits one pair under
        several settings. DIV2K captions exceed CLIP's 77 tokens; SD3 truncates
        them for the CLIP encoders while T5 keeps
        :data:`softrepa.backbone.T5_MAX_LENGTH` (512, the official sampler's
        length, the same as in training), so the per-call truncation warning
        is silenced here.
        """
        import torch
        from diffusers.utils import logging as dlogging

        key = tuple(prompts)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            with torch.no_grad():
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
                    max_sequence_length=T5_MAX_LENGTH,
                )
        finally:
            dlogging.set_verbosity(level)
        if len(self._prompt_cache) >= 8:
            self._prompt_cache.pop(next(iter(self._prompt_cache)))
        self._prompt_cache[key] = (embeds, pooled)
        return embeds, pooled

    def uncond(self, batch: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        if self._uncond is None:
            self._uncond = self.encode_prompt([""])  # the empty prompt, as diffusers and FlowEdit use
        e, p = self._uncond
        return e.expand(batch, *e.shape[1:]), p.expand(batch, *p.shape[1:])

    # -- velocity

    def velocity_fn(self, src_prompts: list[str], tgt_prompts: list[str], cfg: EditConfig, use_tokens: bool) -> Velocity:
        """The guided (v_src, v_tgt) callable for :func:`flowedit`.

        Source and target are evaluated in two separate forward passes of
        batch [uncond, cond]: identical inputs then give bit-identical
        velocities (the ``v_tgt - v_src == 0`` property), and on a GPU one
        batch of 2 at 1024 px already fills the device.
        """
        import torch

        if use_tokens and self.with_tokens is None:
            raise ConfigError("soft tokens requested but none loaded", flag="--tokens", fix="pass --tokens DIR (a folder written by softrepa train)")
        # the token wrapper hooks the *base* module, so vanilla calls must switch
        # it off explicitly rather than just calling the base
        wrapper = self.with_tokens
        model = wrapper if wrapper is not None else self.base
        n = len(src_prompts)
        src = self.encode_prompt(src_prompts)
        tgt = self.encode_prompt(tgt_prompts)
        un_e, un_p = self.uncond(n)
        scale = float(self.pipe.scheduler.config.num_train_timesteps)
        dtype = self.dtype

        def branch(z: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor], w: float, rule: str) -> torch.Tensor:
            hidden = torch.cat([z, z]).to(dtype)  # [2B, C, h, w]
            timestep = (sigma * scale).to(self.device, dtype=torch.float32).expand(hidden.shape[0])
            previous = wrapper.enabled if wrapper is not None else None
            try:
                if wrapper is not None:
                    wrapper.enabled = use_tokens
                with torch.no_grad():
                    out = model(
                        hidden_states=hidden,
                        timestep=timestep,
                        encoder_hidden_states=torch.cat([un_e, cond[0]]),
                        pooled_projections=torch.cat([un_p, cond[1]]),
                        return_dict=False,
                    )[0]
            finally:
                if wrapper is not None:
                    wrapper.enabled = previous
            v_uncond, v_cond = out.float().chunk(2)
            return guide(v_uncond, v_cond, w, rule)

        def velocity(z_src: torch.Tensor | None, z_tgt: torch.Tensor, sigma: torch.Tensor):
            v_tgt = branch(z_tgt, sigma, tgt, cfg.tgt_cfg, cfg.cfg_rule)
            v_src = None if z_src is None else branch(z_src, sigma, src, cfg.src_cfg, "flowedit")
            return v_src, v_tgt

        return velocity

    def sigmas(self, steps: int) -> "torch.Tensor":
        """[steps + 1] noise levels from the pipeline's own scheduler (shift included)."""
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps, device="cpu")
        return scheduler.sigmas.clone()

    # -- editing

    def edit_latent(self, x_src: "torch.Tensor", src_prompt: str, tgt_prompt: str, cfg: EditConfig, use_tokens: bool = False) -> "torch.Tensor":
        """[1, C, h, w] source latent -> edited latent (see :func:`flowedit`)."""
        import torch

        cfg.validate()
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        velocity = self.velocity_fn([src_prompt], [tgt_prompt], cfg, use_tokens)
        return flowedit(x_src, velocity, self.sigmas(cfg.steps), n_max=cfg.n_max, n_min=cfg.n_min, n_avg=cfg.n_avg, generator=generator)

    def edit(self, image: "Image", src_prompt: str, tgt_prompt: str, cfg: EditConfig, use_tokens: bool = False) -> "Image":
        """Source image -> edited image (at the model size chosen by ``cfg.size``)."""
        x_src = self.encode_image(image, cfg.size)
        return self.decode(self.edit_latent(x_src, src_prompt, tgt_prompt, cfg, use_tokens))[0]
