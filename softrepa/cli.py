"""The ``softrepa`` command line: train soft tokens, import official tokens, sample.

Commands only parse flags, call the library and print summaries; the flags
of a config dataclass (TrainConfig, EvalConfig, MetricConfig) are derived
from its fields (:func:`dataprep.runtime.config_command`), which are
imported, with torch, only when their command runs or shows its --help.
Exit status: 0 on success, 2 for usage or configuration errors
(:class:`dataprep.errors.ConfigError`, naming the flag and the fix).
Any other failure prints one line and exits 1 (``--debug`` or DATAPREP_DEBUG=1
shows the traceback); see :mod:`dataprep.errors`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.errors import ConfigError, run_cli
from dataprep.runtime import Flags, config_command, print_summary, typer_app
from softrepa.paper import SD3_MODEL
from softrepa.tiny import write_all as write_tiny_models  # torch and diffusers load inside the builders
from softrepa.metrics import write_tiny_metric_models

app = typer_app(
    "softrepa",
    "SoftREPA: train soft text tokens with the contrastive score-matching loss on a frozen diffusion model, "
    "import the official tokens, sample with and without them.",
    # `softrepa recipe` belongs to flows (it wires dataprep's batches to training and
    # evaluation; softrepa imports nothing of flows): flows names it in this
    # entry-point group (pyproject.toml) and the app finds it there
    plugins="softrepa.commands",
)


def comma_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def float_list(flag: str):
    """A parser of a comma list of numbers for ``flag``."""

    def parse(value: str) -> tuple[float, ...]:
        try:
            out = tuple(float(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"not a comma-separated list of numbers: {value!r}", flag=flag, fix="e.g. 9,11,13") from None
        if not out:
            raise ConfigError("empty list", flag=flag, fix="e.g. 9,11,13")
        return out

    return parse


def writable_folder(path: Path, flag: str) -> None:
    """ConfigError unless ``path`` is a folder or can become one (a file there is a typo, not a crash)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a folder", flag, "pass a folder (created if missing)")


# ------------------------------------------------------------ train


# What each TrainConfig field means on the command line (its default is the field's).
TRAIN_HELP = {
    "preset": "Backbone preset: sd3, sdxl or sd1.5 (tokens, layers, loss weights, iterations per the paper's Table 3).",
    "batches": "Folder of contrastive batch shards (output of `dataprep batches`, e.g. OUT/batches).",
    "model": "Diffusers pipeline: hub id (e.g. stabilityai/stable-diffusion-3-medium-diffusers) or local folder.",
    "out": "Run folder: tokens/, checkpoints/, train_log.jsonl, train_config.json.",
    "steps": "Optimizer steps (default: Table 3, 30000 sd3/sdxl, 26000 sd1.5). Batch rows are cycled in shard order.",
    "batch_run": "Which `dataprep batches` run to train on when --batches holds several (the id in part-<run>-NNNNN.parquet, e.g. sd3-s0-1a2b3c4d5e6f).",
    "allow_partial": "Train on a batch run that did not finish (no completion record from `dataprep batches`); by default such a run is refused.",
    "checkpoint_every": "Save tokens + optimizer/scheduler/RNG state every N steps (and at the end).",
    "resume": "Continue from the newest checkpoint in --out (same trajectory as an uninterrupted run).",
    "lr": "AdamW learning rate (paper: 1e-3).",
    "weight_decay": "AdamW weight decay (paper: 1e-4).",
    "restart_every": "CosineAnnealingWarmRestarts period T_0 in steps.",
    "min_lr": "CosineAnnealingWarmRestarts eta_min.",
    "n_tokens": "Soft tokens per layer (default: 4 sd3/sd1.5, 8 sdxl).",
    "n_layers": "sd3: first N transformer blocks get tokens (default 5).",
    "apply": "UNet block groups that get tokens, comma-separated from down,mid,up (default: down for sd1.5, down,mid for sdxl).",
    "t_dependent": "Add timestep-dependent tokens, Embedding(100, dim x layers) at t // 10 (default: on for sd3/sd1.5, off for sdxl).",
    "denoise_weight": "Weight of the positives' denoising error added to the loss (default: 0 sd3; 10 sd1.5/sdxl as the official scripts).",
    "scale": "Logit scale in scale * exp(-E / temperature).",
    "temperature": "Temperature in scale * exp(-E / temperature).",
    "min_t": "Smallest training timestep (0..999).",
    "max_t": "Timesteps are drawn from [min-t, max-t).",
    "resolution": "Training image size in pixels (shortest side resized, center crop), as the official training script (512 for all three backbones); 'native' = the model's own size (1024 sd3/sdxl, 512 sd1.5).",
    "dtype": "auto (bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16, float16.",
    "device": "auto, cpu, cuda or cuda:N.",
    "gradient_checkpointing": "Recompute the frozen denoiser's blocks during backward: much less activation memory (SD3 at 1024 px with a 4 x 4 grid), slower steps.",
    "seed": "Seed of token init, timesteps, noise and VAE samples.",
    "shuffle": "Visit the batch rows in a new seeded order every pass (as the official trainer reshuffles every epoch); --no-shuffle keeps shard order.",
    "accumulate": "Batch rows per process per optimizer step (gradients averaged). Under torchrun/accelerate launch a step trains processes x N rows.",
    "best_by": "clip: every --eval-every steps sample the held-out prompts with the tokens, CLIP-score them and keep the best tokens in OUT/best (as the official trainer); none: off.",
    "eval_prompts": "Held-out prompts, one per line. Default: the captions of --eval-holdout images taken out of training.",
    "eval_holdout": "Images held out of training whose captions are the evaluation prompts (official: 50 prompts).",
    "eval_every": "Evaluate (and checkpoint) every N steps and at the end (official: every 2500 iterations).",
    "eval_steps": "Sampling steps per evaluation image (default: the official sampler's 28 sd3, 30 sdxl/sd1.5).",
    "eval_guidance": "Guidance scale of the evaluation samples (default: 4 sd3, 7 sdxl/sd1.5).",
    "eval_size": "Evaluation image size (default: the model's native size, as the official sampler).",
    "eval_batch_size": "Prompts sampled together.",
    "eval_clip_model": "CLIP that scores the evaluation samples (hub id or folder).",
}
TRAIN_PANELS = {
    **dict.fromkeys(("lr", "weight_decay", "restart_every", "min_lr"), "Optimizer"),
    **dict.fromkeys(("n_tokens", "n_layers", "apply", "t_dependent"), "Tokens"),
    **dict.fromkeys(("denoise_weight", "scale", "temperature", "min_t", "max_t"), "Loss"),
    **dict.fromkeys(("resolution", "dtype", "device", "gradient_checkpointing", "seed", "shuffle", "accumulate"), "Run"),
    **{name: "Best checkpoint" for name in TRAIN_HELP if name == "best_by" or name.startswith("eval_")},
}
TRAIN = Flags(
    "softrepa.train:TrainConfig",
    helps=TRAIN_HELP,
    panels=TRAIN_PANELS,
    names={"t_dependent": "--t-dependent/--no-t-dependent", "shuffle": "--shuffle/--no-shuffle"},
    exclude=("precision",),  # the earlier name of dtype: the hidden --precision below
    parse={"batches": (Path, str), "out": (Path, str), "eval_prompts": (Optional[Path], str), "apply": (Optional[str], comma_list), "resolution": (str, str)},
)


@config_command(app, "train", cfg=TRAIN)
def train_cmd(
    precision: Annotated[Optional[str], typer.Option("--precision", hidden=True, help="Deprecated: --dtype (fp32, bf16, fp16 are float32, bfloat16, float16).")] = None,
    cfg=None,
) -> None:
    """Train soft tokens on contrastive batch shards with the frozen diffusion model; write OUT/tokens.

    Data parallel: torchrun --nproc-per-node N -m softrepa.cli train ... (or accelerate launch -m softrepa.cli train ...)."""
    from rich.console import Console
    from rich.markup import escape

    from softrepa.train import train

    if precision is not None:  # TrainConfig maps the earlier vocabulary (bf16 -> bfloat16)
        cfg = replace(cfg, precision=precision)
    result = train(cfg)
    if not result.main:  # data parallel: the first process reports
        return
    console = Console()
    console.print(
        f"[bold]trained[/] {result.steps} steps in {result.seconds:.1f}s: final loss {result.final_loss:.4f}, "
        f"mean accuracy {result.mean_accuracy:.3f}", highlight=False)
    if result.summary is not None:  # the table every stage prints (done, skipped, failed by reason, rate)
        print_summary(result.summary, console)
    console.print(f"tokens: {result.tokens_dir}\nlog: {result.log_path}", highlight=False, markup=False)
    if result.best_dir is not None:
        console.print(f"best held-out CLIP {result.best_clip:.4f} at step {result.best_step}: {result.best_dir}", highlight=False, markup=False)
    if result.curves is not None:
        console.print(f"curves: {result.curves}", highlight=False, markup=False)
    elif result.curves_note:
        console.print(f"[yellow]note:[/] no training curves: {escape(result.curves_note)}", highlight=False)


# ------------------------------------------------------------ import-tokens


@config_command(app, "import-tokens")
def import_tokens_cmd(
    src_dir: Annotated[Path, typer.Argument(help="Folder with the official dc_tokens.pth (and dc_t_tokens.pth), as released with the paper's code (one backbone's folder).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write tokens.safetensors + tokens.json.")],
    backbone: Annotated[str, typer.Option("--backbone", help="sd3, sdxl or sd1.5: which model the tokens were trained for.")],
    model: Annotated[Optional[str], typer.Option("--model", help="sd3 only: the SD3 pipeline (hub id or folder) whose context_embedder projects 4096-wide tokens (the current official trainer's layout) to the text width; exact, as the projection is linear.")] = None,
) -> None:
    """Convert official SoftREPA .pth token files (safe loading only: weights_only + an allow-list) to our format."""
    from softrepa.token_files import NeedsContextEmbedder, UnsafeTokenFile, import_official, load_context_embedder

    writable_folder(out_dir, "OUT_DIR")
    embedder = None
    if model is not None:
        if backbone != "sd3":
            raise ConfigError(f"--model is only needed for sd3 tokens (their context_embedder), not {backbone}", "--model", "drop it")
        try:
            embedder = load_context_embedder(model)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the SD3 transformer of {model}: {exc}", "--model", "pass an SD3 pipeline folder or hub id") from exc
    try:
        module = import_official(src_dir, out_dir, backbone, embedder)
    except NeedsContextEmbedder as exc:
        raise ConfigError(str(exc), "--model") from exc
    except (FileNotFoundError, ValueError, UnsafeTokenFile) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from exc
    c = module.config
    t_shape = None if module.t_embedding is None else list(module.t_embedding.weight.shape)
    typer.echo(f"imported {backbone}: tokens {list(module.tokens.shape)}, t_embedding {t_shape}, "
               f"apply {list(c.apply) or '-'} -> {out_dir}")


@config_command(app, "export-tokens")
def export_tokens_cmd(
    tokens_dir: Annotated[Path, typer.Argument(help="Our token folder (tokens.json + tokens.safetensors), e.g. RUN/tokens.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write dc_tokens.pth (and dc_t_tokens.pth).")],
    format: Annotated[str, typer.Option("--format", help="official: the SoftREPA release's torch files (nn.Parameter dc_tokens, nn.Embedding dc_t_tokens), loadable by its sample.py / edit_sd3.py --load_dir.")] = "official",
) -> None:
    """Write soft tokens in the official SoftREPA file format (export then import is bit-identical)."""
    from softrepa.token_files import export_official, load_tokens

    if format != "official":
        raise ConfigError(f"unknown format {format!r}", "--format", "use --format official")
    writable_folder(out_dir, "OUT_DIR")
    try:
        module = load_tokens(tokens_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConfigError(str(exc), "TOKENS_DIR", "pass a folder written by softrepa train or import-tokens") from exc
    written = export_official(module, out_dir)
    c = module.config
    flags = f"--n_dc_tokens {c.n_tokens}" + (f" --n_dc_layers {c.n_layers}" if c.backbone == "sd3" else "") + (" --use_dc_t" if c.t_dependent else "")
    typer.echo(f"exported {c.backbone}: " + ", ".join(f"{p.name}" for p in written) + f" -> {out_dir}\nofficial flags: {flags}")


# ------------------------------------------------------------ sample


@config_command(app, "sample")
def sample_cmd(
    model: Annotated[str, typer.Option("--model", help="Diffusers pipeline (hub id or folder) the tokens were trained for.")],
    tokens: Annotated[Path, typer.Option("--tokens", help="Token folder (tokens.json + tokens.safetensors), e.g. RUN/tokens.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text prompt.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for base.png, tokens.png, side_by_side.png.")] = Path("samples"),
    seed: Annotated[int, typer.Option("--seed", help="Generator seed, the same for both images.")] = 0,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Inference steps (default: 28 sd3, 30 sdxl/sd1.5).")] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale (default: 4 sd3, 7 sdxl/sd1.5).")] = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Image height and width (default: the model's).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Generate the prompt with and without soft tokens (same seed) and save them side by side."""
    from softrepa.sample import sample_pair

    try:
        res = sample_pair(model, tokens, prompt, out, seed=seed, steps=steps, guidance=guidance, device=device, height=size, width=size)
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from exc
    typer.echo(f"without tokens: {res.base}\nwith tokens:    {res.with_tokens}\nside by side:   {res.side_by_side}")


# --- evaluate-edit ---


EVAL_HELP = {
    "pairs": "A run directory (RUN/edits Parquet shards; passed, error-free edits only) or an official prompts_editing.json (img_path relative to the JSON).",
    "out": "Output folder: images/<setting>/<pair>.png, scores.parquet, summary.md, summary.csv, config.json, manifest. Rerunning reuses edited images already there.",
    "model": "SD3 diffusers pipeline: hub id or local folder.",
    "tokens": "Soft tokens folder (softrepa train output, or the official tokens/sd3 with dc_tokens.pth); adds the method flowedit+tokens.",
    "methods": "Comma list of flowedit, flowedit+tokens. Default: flowedit, plus flowedit+tokens with --tokens.",
    "tgt_cfgs": "Target guidance scales, comma list (e.g. 9,11,13); applies to every method. Default: the --rows table's, per method.",
    "rows": "Which paper table's rows to run: table5 (DIV2K: FlowEdit NMAX 33 at CFG 13.5/16.5/19.5, with tokens NMAX 30 at 9/11/13) or table6 (Cat2Dog: tokens also at 7).",
    "n_max": "Edit over the last N of --steps steps; applies to every method. Default per method: 33 (flowedit), 30 (flowedit+tokens).",
    "steps": "Sampling steps of the flow-matching schedule.",
    "n_min": "Finish the last N steps with plain sampling of the target (paper: 0).",
    "src_cfg": "Source guidance scale.",
    "seed": "Seed of the per-step FlowEdit noise (same seed -> same edits).",
    "size": "Edit at SIZE x SIZE pixels (the official script uses 1024); 0 keeps each source's size.",
    "cfg_rule": "Target-branch guidance. official: c + w(c - u), the SoftREPA editing script the paper's numbers come from (effective scale w + 1); flowedit: u + w(c - u), FlowEdit's own code. The source branch is u + w(c - u) either way.",
    "limit": "Edit only the first N pairs.",
    "passed_only": "Edit only pairs that passed the rule checker. Default: every pair with a target, as the paper; the verdict is the column 'passed' of scores.parquet.",
    "device": "auto, cpu, cuda, cuda:N or mps (editing and metrics).",
    "dtype": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.",
    "revision": "Revision of --model on the hub.",
}
EVAL = Flags(
    "softrepa.evaluate:EvalConfig",
    helps=EVAL_HELP,
    panels={**dict.fromkeys(("methods", "tgt_cfgs", "rows", "n_max", "steps", "n_min", "src_cfg", "seed", "size", "cfg_rule"), "FlowEdit"),
            **dict.fromkeys(("limit", "passed_only", "device", "dtype", "revision"), "Run")},
    names={"tgt_cfgs": "--tgt-cfg", "cfg_rule": ("--guidance-rule", "--cfg-rule")},
    defaults={"model": SD3_MODEL},
    parse={"pairs": (Path, str), "out": (Path, str), "tokens": (Optional[Path], str), "methods": (Optional[str], comma_list), "tgt_cfgs": (Optional[str], float_list("--tgt-cfg"))},
)
METRICS = Flags(
    "softrepa.metrics:MetricConfig",
    helps={
        "metrics": "Comma list of clip, pickscore, lpips, imagereward, hpsv2, fid. Missing optional packages are reported with their install command.",
        "clip_model": "CLIP for the CLIP score (hub id or folder).",
        "pickscore_model": "PickScore CLIP (hub id or folder).",
        "pickscore_processor": "Processor for --pickscore-model: the LAION ViT-H/14 one PickScore was trained with; 'model' = the model's own.",
        "lpips_model": "vgg (default, as SoftREPA eval.py), alex or squeeze (the lpips package; paper-comparable), or a transformers vision backbone id/folder (uncalibrated LPIPS form).",
        "batch_size": "Images per metric forward pass.",
    },
    names={"batch_size": "--metric-batch-size"},
    panel="Metrics",
    parse={"metrics": (str, comma_list), "pickscore_processor": (Optional[str], lambda v: None if v == "model" else v)},
)


@config_command(app, "evaluate-edit", cfg=EVAL, metrics=METRICS)
def evaluate_edit_cmd(
    tiny_metrics: Annotated[bool, typer.Option("--tiny-metrics", help="Offline demo: write tiny random CLIP and LPIPS networks under OUT/tiny-metrics and use them for clip, pickscore and lpips (scores are meaningless).", rich_help_panel="Metrics")] = False,
    cfg=None,
    metrics=None,
) -> None:
    """Edit caption/target pairs with FlowEdit on SD3 (with and without soft tokens) and score them (paper, Tables 5 and 6)."""
    from rich.console import Console
    from rich.markup import escape

    from softrepa.evaluate import evaluate_edit

    console = Console()
    cfg = replace(cfg, metrics=replace(metrics, device=cfg.device))  # metrics run where the edits run
    cfg.validate()  # every argument, before the tiny metric models are written
    if tiny_metrics:
        tiny = write_tiny_metric_models(Path(cfg.out) / "tiny-metrics")
        cfg = replace(cfg, metrics=replace(cfg.metrics, clip_model=str(tiny["clip"]), pickscore_model=str(tiny["clip"]), pickscore_processor=None, lpips_model=str(tiny["lpips"])))
    res = evaluate_edit(cfg)
    # the Markdown table (= summary.md) reads at any terminal width and pastes into a paper draft
    typer.echo(res.markdown)
    console.print(f"pairs {res.n_pairs}; edited {res.n_edited}, reused {res.n_reused}, failed {res.n_failed} (pair x setting)", highlight=False, markup=False)
    if res.summary is not None:
        print_summary(res.summary, console)
    console.print(f"scores: {res.scores_path}\nsummary: {res.summary_md} and {res.summary_csv}", highlight=False, markup=False)
    if (res.out_dir / "grids" / "index.html").exists():
        console.print(f"grids: {(res.out_dir / 'grids' / 'index.html').resolve().as_uri()} (and a PNG per pair beside it)", highlight=False, markup=False, soft_wrap=True)
    if res.leakage is not None and res.leakage.overlap:
        console.print(f"[bold yellow]warning, leakage:[/] {escape(res.leakage.message())}", highlight=False)


# ------------------------------------------------------------ tiny models, demo


@app.command("tiny-models")
def tiny_models_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write into; one from_pretrained directory per pipeline (the folder `dataprep tiny-models` writes into too).")],
) -> None:
    """Write tiny random SD3, SDXL and SD1.5 pipelines and official-format token files (official-tokens/<backbone>) for offline tests and the demo."""
    for name, path in write_tiny_models(out).items():
        typer.echo(f"{name:15s} {path}")


def main() -> None:
    """Entry point: exit 0 / 1 / 2 as :mod:`dataprep.errors` describes; --debug shows tracebacks."""
    run_cli(app, "softrepa")


if __name__ == "__main__":
    main()
