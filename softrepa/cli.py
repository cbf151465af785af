"""The ``softrepa`` command line: train soft tokens, import official tokens, sample.

Commands only parse flags, call the library and print summaries; torch and
diffusers are imported inside them so ``softrepa --help`` starts fast.
Exit status: 0 on success, 2 for usage or configuration errors.
Any other failure prints one line and exits 1 (``--debug`` or DATAPREP_DEBUG=1
shows the traceback); see :mod:`dataprep.errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from softrepa.tiny import write_all as write_tiny_models  # torch and diffusers load inside the builders

app = typer.Typer(
    name="softrepa",
    help="SoftREPA: train soft text tokens with the contrastive score-matching loss on a frozen diffusion model, "
    "import the official tokens, sample with and without them.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console
    from rich.markup import escape

    # escape: shapes such as [layers, tokens, dim] are text, not rich markup
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _split_apply(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


# ------------------------------------------------------------ train


@app.command("train")
def train_cmd(
    preset: Annotated[str, typer.Option("--preset", help="Backbone preset: sd3, sdxl or sd1.5 (tokens, layers, loss weights, iterations per the paper's Table 3).")],
    batches: Annotated[Path, typer.Option("--batches", help="Folder of contrastive batch shards (output of `dataprep batches`, e.g. OUT/batches).")],
    model: Annotated[str, typer.Option("--model", help="Diffusers pipeline: hub id (e.g. stabilityai/stable-diffusion-3-medium-diffusers) or local folder.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: tokens/, checkpoints/, train_log.jsonl, train_config.json.")],
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps (default: Table 3, 30000 sd3/sdxl, 26000 sd1.5). Batch rows are cycled in shard order.")] = None,
    batch_run: Annotated[Optional[str], typer.Option("--batch-run", help="Which `dataprep batches` run to train on when --batches holds several (the id in part-<run>-NNNNN.parquet, e.g. sd3-s0-1a2b3c4d5e6f).")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Train on a batch run that did not finish (no completion record from `dataprep batches`); by default such a run is refused.")] = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save tokens + optimizer/scheduler/RNG state every N steps (and at the end).")] = 500,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out (same trajectory as an uninterrupted run).")] = False,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (paper: 1e-3).", rich_help_panel="Optimizer")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (paper: 1e-4).", rich_help_panel="Optimizer")] = 1e-4,
    restart_every: Annotated[int, typer.Option("--restart-every", help="CosineAnnealingWarmRestarts period T_0 in steps.", rich_help_panel="Optimizer")] = 5000,
    min_lr: Annotated[float, typer.Option("--min-lr", help="CosineAnnealingWarmRestarts eta_min.", rich_help_panel="Optimizer")] = 1e-5,
    n_tokens: Annotated[Optional[int], typer.Option("--n-tokens", help="Soft tokens per layer (default: 4 sd3/sd1.5, 8 sdxl).", rich_help_panel="Tokens")] = None,
    n_layers: Annotated[Optional[int], typer.Option("--n-layers", help="sd3: first N transformer blocks get tokens (default 5).", rich_help_panel="Tokens")] = None,
    apply: Annotated[Optional[str], typer.Option("--apply", help="UNet block groups that get tokens, comma-separated from down,mid,up (default: down for sd1.5, down,mid for sdxl).", rich_help_panel="Tokens")] = None,
    t_dependent: Annotated[Optional[bool], typer.Option("--t-dependent/--no-t-dependent", help="Add timestep-dependent tokens, Embedding(100, dim x layers) at t // 10 (default: on for sd3/sd1.5, off for sdxl).", rich_help_panel="Tokens")] = None,
    denoise_weight: Annotated[Optional[float], typer.Option("--denoise-weight", help="Weight of the positives' denoising error added to the loss (default: 0 sd3; 10 sd1.5/sdxl as the official scripts).", rich_help_panel="Loss")] = None,
    scale: Annotated[float, typer.Option("--scale", help="Logit scale in scale * exp(-E / temperature).", rich_help_panel="Loss")] = 4.0,
    temperature: Annotated[float, typer.Option("--temperature", help="Temperature in scale * exp(-E / temperature).", rich_help_panel="Loss")] = 0.07,
    min_t: Annotated[int, typer.Option("--min-t", help="Smallest training timestep (0..999).", rich_help_panel="Loss")] = 0,
    max_t: Annotated[int, typer.Option("--max-t", help="Timesteps are drawn from [min-t, max-t).", rich_help_panel="Loss")] = 1000,
    resolution: Annotated[str, typer.Option("--resolution", help="Training image size in pixels (shortest side resized, center crop), as the official training script (512 for all three backbones); 'native' = the model's own size (1024 sd3/sdxl, 512 sd1.5).", rich_help_panel="Run")] = "512",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16.", rich_help_panel="Run")] = "auto",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel="Run")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute the frozen denoiser's blocks during backward: much less activation memory (SD3 at 1024 px with a 4 x 4 grid), slower steps.", rich_help_panel="Run")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of token init, timesteps, noise and VAE samples.", rich_help_panel="Run")] = 0,
    shuffle: Annotated[bool, typer.Option("--shuffle/--no-shuffle", help="Visit the batch rows in a new seeded order every pass (as the official trainer reshuffles every epoch); --no-shuffle keeps shard order.", rich_help_panel="Run")] = True,
    accumulate: Annotated[int, typer.Option("--accumulate", help="Batch rows per process per optimizer step (gradients averaged). Under torchrun/accelerate launch a step trains processes x N rows.", rich_help_panel="Run")] = 1,
    best_by: Annotated[str, typer.Option("--best-by", help="clip: every --eval-every steps sample the held-out prompts with the tokens, CLIP-score them and keep the best tokens in OUT/best (as the official trainer); none: off.", rich_help_panel="Best checkpoint")] = "clip",
    eval_prompts: Annotated[Optional[Path], typer.Option("--eval-prompts", help="Held-out prompts, one per line. Default: the captions of --eval-holdout images taken out of training.", rich_help_panel="Best checkpoint")] = None,
    eval_holdout: Annotated[int, typer.Option("--eval-holdout", help="Images held out of training whose captions are the evaluation prompts (official: 50 prompts).", rich_help_panel="Best checkpoint")] = 50,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate (and checkpoint) every N steps and at the end (official: every 2500 iterations).", rich_help_panel="Best checkpoint")] = 2500,
    eval_steps: Annotated[Optional[int], typer.Option("--eval-steps", help="Sampling steps per evaluation image (default: the official sampler's 28 sd3, 30 sdxl/sd1.5).", rich_help_panel="Best checkpoint")] = None,
    eval_guidance: Annotated[Optional[float], typer.Option("--eval-guidance", help="Guidance scale of the evaluation samples (default: 4 sd3, 7 sdxl/sd1.5).", rich_help_panel="Best checkpoint")] = None,
    eval_size: Annotated[Optional[int], typer.Option("--eval-size", help="Evaluation image size (default: the model's native size, as the official sampler).", rich_help_panel="Best checkpoint")] = None,
    eval_batch_size: Annotated[int, typer.Option("--eval-batch-size", help="Prompts sampled together.", rich_help_panel="Best checkpoint")] = 4,
    eval_clip_model: Annotated[str, typer.Option("--eval-clip-model", help="CLIP that scores the evaluation samples (hub id or folder).", rich_help_panel="Best checkpoint")] = "openai/clip-vit-large-patch14",
) -> None:
    """Train soft tokens on contrastive batch shards with the frozen diffusion model; write OUT/tokens.

    Data parallel: torchrun --nproc-per-node N -m softrepa.cli train ... (or accelerate launch -m softrepa.cli train ...)."""
    from rich.console import Console
    from rich.markup import escape

    from softrepa.train import TrainConfig, train
    from dataprep.errors import ConfigError

    try:
        cfg = TrainConfig(
            preset=preset, batches=str(batches), batch_run=batch_run, allow_partial=allow_partial, model=model, out=str(out), steps=steps, checkpoint_every=checkpoint_every,
            resume=resume, lr=lr, weight_decay=weight_decay, restart_every=restart_every, min_lr=min_lr, n_tokens=n_tokens,
            n_layers=n_layers, apply=_split_apply(apply), t_dependent=t_dependent, denoise_weight=denoise_weight, scale=scale,
            temperature=temperature, min_t=min_t, max_t=max_t, resolution=resolution, precision=precision, device=device,
            gradient_checkpointing=gradient_checkpointing, seed=seed, shuffle=shuffle, accumulate=accumulate, best_by=best_by,
            eval_prompts=None if eval_prompts is None else str(eval_prompts), eval_holdout=eval_holdout, eval_every=eval_every, eval_steps=eval_steps,
            eval_guidance=eval_guidance, eval_size=eval_size, eval_batch_size=eval_batch_size, eval_clip_model=eval_clip_model,
        )
        result = train(cfg)
    except ConfigError as exc:
        raise fail(str(exc))
    if not result.main:  # data parallel: the first process reports
        return
    console = Console()
    console.print(
        f"[bold]trained[/] {result.steps} steps in {result.seconds:.1f}s: final loss {result.final_loss:.4f}, "
        f"mean accuracy {result.mean_accuracy:.3f}", highlight=False)
    if result.skipped:
        console.print(f"skipped batch rows by reason: {result.skipped}", highlight=False, markup=False)
    console.print(f"tokens: {result.tokens_dir}\nlog: {result.log_path}", highlight=False, markup=False)
    if result.best_dir is not None:
        console.print(f"best held-out CLIP {result.best_clip:.4f} at step {result.best_step}: {result.best_dir}", highlight=False, markup=False)
    if result.curves is not None:
        console.print(f"curves: {result.curves}", highlight=False, markup=False)
    elif result.curves_note:
        console.print(f"[yellow]note:[/] no training curves: {escape(result.curves_note)}", highlight=False)


# ------------------------------------------------------------ import-tokens


@app.command("import-tokens")
def import_tokens_cmd(
    src_dir: Annotated[Path, typer.Argument(help="Folder with the official dc_tokens.pth (and dc_t_tokens.pth), as released with the paper's code (one backbone's folder).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write tokens.safetensors + tokens.json.")],
    backbone: Annotated[str, typer.Option("--backbone", help="sd3, sdxl or sd1.5: which model the tokens were trained for.")],
    model: Annotated[Optional[str], typer.Option("--model", help="sd3 only: the SD3 pipeline (hub id or folder) whose context_embedder projects 4096-wide tokens (the current official trainer's layout) to the text width; exact, as the projection is linear.")] = None,
) -> None:
    """Convert official SoftREPA .pth token files (safe loading only: weights_only + an allow-list) to our format."""
    from softrepa.token_files import NeedsContextEmbedder, UnsafeTokenFile, import_official, load_context_embedder

    try:
        embedder = None
        if model is not None:
            if backbone != "sd3":
                raise fail("--model is only needed for sd3 tokens (their context_embedder); drop it for " + backbone)
            try:
                embedder = load_context_embedder(model)
            except (OSError, ValueError) as exc:
                raise fail(f"cannot load the SD3 transformer of {model}: {exc} (flag --model; fix: pass an SD3 pipeline folder or hub id)")
        module = import_official(src_dir, out_dir, backbone, embedder)
    except NeedsContextEmbedder as exc:
        raise fail(f"{exc} (flag --model)")
    except (FileNotFoundError, ValueError, UnsafeTokenFile) as exc:
        raise fail(str(exc))
    c = module.config
    t_shape = None if module.t_embedding is None else list(module.t_embedding.weight.shape)
    typer.echo(f"imported {backbone}: tokens {list(module.tokens.shape)}, t_embedding {t_shape}, "
               f"apply {list(c.apply) or '-'} -> {out_dir}")


@app.command("export-tokens")
def export_tokens_cmd(
    tokens_dir: Annotated[Path, typer.Argument(help="Our token folder (tokens.json + tokens.safetensors), e.g. RUN/tokens.")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write dc_tokens.pth (and dc_t_tokens.pth).")],
    format: Annotated[str, typer.Option("--format", help="official: the SoftREPA release's torch files (nn.Parameter dc_tokens, nn.Embedding dc_t_tokens), loadable by its sample.py / edit_sd3.py --load_dir.")] = "official",
) -> None:
    """Write soft tokens in the official SoftREPA file format (export then import is bit-identical)."""
    from softrepa.token_files import export_official, load_tokens

    if format != "official":
        raise fail(f"unknown format {format!r} (flag --format; fix: use --format official)", code=2)
    try:
        module = load_tokens(tokens_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise fail(f"{exc} (argument TOKENS_DIR; fix: pass a folder written by softrepa train or import-tokens)", code=2)
    written = export_official(module, out_dir)
    c = module.config
    flags = f"--n_dc_tokens {c.n_tokens}" + (f" --n_dc_layers {c.n_layers}" if c.backbone == "sd3" else "") + (" --use_dc_t" if c.t_dependent else "")
    typer.echo(f"exported {c.backbone}: " + ", ".join(f"{p.name}" for p in written) + f" -> {out_dir}\nofficial flags: {flags}")


# ------------------------------------------------------------ sample


@app.command("sample")
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
        raise fail(str(exc))
    typer.echo(f"without tokens: {res.base}\nwith tokens:    {res.with_tokens}\nside by side:   {res.side_by_side}")


# --- evaluate-edit ---


def _eval_float_list(value: str | None, flag: str) -> "tuple[float, ...] | None":
    from dataprep.errors import ConfigError

    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"not a comma-separated list of numbers: {value!r}", flag=flag, fix="e.g. 9,11,13") from None
    if not out:
        raise ConfigError("empty list", flag=flag, fix="e.g. 9,11,13")
    return out


@app.command("evaluate-edit")
def evaluate_edit_cmd(
    pairs: Annotated[Path, typer.Option("--pairs", help="A run directory (RUN/edits Parquet shards; passed, error-free edits only) or an official prompts_editing.json (img_path relative to the JSON).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: images/<setting>/<pair>.png, scores.parquet, summary.md, summary.csv, config.json, manifest. Rerunning reuses edited images already there.")],
    model: Annotated[str, typer.Option("--model", help="SD3 diffusers pipeline: hub id or local folder.")] = "stabilityai/stable-diffusion-3-medium-diffusers",
    tokens: Annotated[Optional[Path], typer.Option("--tokens", help="Soft tokens folder (softrepa train output, or the official tokens/sd3 with dc_tokens.pth); adds the method flowedit+tokens.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma list of flowedit, flowedit+tokens. Default: flowedit, plus flowedit+tokens with --tokens.", rich_help_panel="FlowEdit")] = None,
    tgt_cfg: Annotated[Optional[str], typer.Option("--tgt-cfg", help="Target guidance scales, comma list (e.g. 9,11,13); applies to every method. Default: the --rows table's, per method.", rich_help_panel="FlowEdit")] = None,
    rows: Annotated[str, typer.Option("--rows", help="Which paper table's rows to run: table5 (DIV2K: FlowEdit NMAX 33 at CFG 13.5/16.5/19.5, with tokens NMAX 30 at 9/11/13) or table6 (Cat2Dog: tokens also at 7).", rich_help_panel="FlowEdit")] = "table5",
    n_max: Annotated[Optional[int], typer.Option("--n-max", help="Edit over the last N of --steps steps; applies to every method. Default per method: 33 (flowedit), 30 (flowedit+tokens).", rich_help_panel="FlowEdit")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps of the flow-matching schedule.", rich_help_panel="FlowEdit")] = 50,
    n_min: Annotated[int, typer.Option("--n-min", help="Finish the last N steps with plain sampling of the target (paper: 0).", rich_help_panel="FlowEdit")] = 0,
    src_cfg: Annotated[float, typer.Option("--src-cfg", help="Source guidance scale.", rich_help_panel="FlowEdit")] = 3.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the per-step FlowEdit noise (same seed -> same edits).", rich_help_panel="FlowEdit")] = 0,
    size: Annotated[int, typer.Option("--size", help="Edit at SIZE x SIZE pixels (the official script uses 1024); 0 keeps each source's size.", rich_help_panel="FlowEdit")] = 1024,
    cfg_rule: Annotated[str, typer.Option("--guidance-rule", "--cfg-rule", help="Target-branch guidance. official: c + w(c - u), the SoftREPA editing script the paper's numbers come from (effective scale w + 1); flowedit: u + w(c - u), FlowEdit's own code. The source branch is u + w(c - u) either way.", rich_help_panel="FlowEdit")] = "official",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Edit only the first N pairs.", rich_help_panel="Run")] = None,
    passed_only: Annotated[bool, typer.Option("--passed-only", help="Edit only pairs that passed the rule checker. Default: every pair with a target, as the paper; the verdict is the column 'passed' of scores.parquet.", rich_help_panel="Run")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (editing and metrics).", rich_help_panel="Run")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.", rich_help_panel="Run")] = "auto",
    revision: Annotated[Optional[str], typer.Option("--revision", help="Revision of --model on the hub.", rich_help_panel="Run")] = None,
    metrics: Annotated[str, typer.Option("--metrics", help="Comma list of clip, pickscore, lpips, imagereward, hpsv2, fid. Missing optional packages are reported with their install command.", rich_help_panel="Metrics")] = "clip,pickscore,lpips,imagereward,hpsv2,fid",
    clip_model: Annotated[str, typer.Option("--clip-model", help="CLIP for the CLIP score (hub id or folder).", rich_help_panel="Metrics")] = "openai/clip-vit-large-patch14",
    pickscore_model: Annotated[str, typer.Option("--pickscore-model", help="PickScore CLIP (hub id or folder).", rich_help_panel="Metrics")] = "yuvalkirstain/PickScore_v1",
    pickscore_processor: Annotated[Optional[str], typer.Option("--pickscore-processor", help="Processor for --pickscore-model; default the LAION ViT-H/14 one PickScore was trained with; 'model' = the model's own.", rich_help_panel="Metrics")] = None,
    lpips_model: Annotated[str, typer.Option("--lpips-model", help="vgg (default, as SoftREPA eval.py), alex or squeeze (the lpips package; paper-comparable), or a transformers vision backbone id/folder (uncalibrated LPIPS form).", rich_help_panel="Metrics")] = "vgg",
    metric_batch_size: Annotated[int, typer.Option("--metric-batch-size", help="Images per metric forward pass.", rich_help_panel="Metrics")] = 8,
    tiny_metrics: Annotated[bool, typer.Option("--tiny-metrics", help="Offline demo: write tiny random CLIP and LPIPS networks under OUT/tiny-metrics and use them for clip, pickscore and lpips (scores are meaningless).", rich_help_panel="Metrics")] = False,
) -> None:
    """Edit caption/target pairs with FlowEdit on SD3 (with and without soft tokens) and score them (paper, Tables 5 and 6)."""
    from rich.console import Console
    from rich.markup import escape

    from dataprep.errors import ConfigError
    from softrepa.evaluate import EvalConfig, evaluate_edit
    from softrepa.metrics import MetricConfig

    console = Console()
    try:
        mcfg = MetricConfig(
            metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()), clip_model=clip_model, pickscore_model=pickscore_model,
            lpips_model=lpips_model, batch_size=metric_batch_size, device=device,
        )
        if pickscore_processor == "model":
            mcfg.pickscore_processor = None
        elif pickscore_processor is not None:
            mcfg.pickscore_processor = pickscore_processor
        if tiny_metrics:
            from softrepa.metrics import write_tiny_metric_models

            tiny = write_tiny_metric_models(out / "tiny-metrics")
            mcfg.clip_model = mcfg.pickscore_model = str(tiny["clip"])
            mcfg.pickscore_processor = None
            mcfg.lpips_model = str(tiny["lpips"])
        cfg = EvalConfig(
            pairs=str(pairs), model=model, out=str(out), tokens=str(tokens) if tokens else None,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
            tgt_cfgs=_eval_float_list(tgt_cfg, "--tgt-cfg"), n_max=n_max, steps=steps, n_min=n_min, src_cfg=src_cfg, seed=seed, size=size,
            cfg_rule=cfg_rule, limit=limit, device=device, dtype=dtype, revision=revision, metrics=mcfg, rows=rows,
            passed_only=passed_only,
        )
        res = evaluate_edit(cfg)
    except ConfigError as exc:
        raise fail(str(exc))
    # the Markdown table (= summary.md) reads at any terminal width and pastes into a paper draft
    typer.echo(res.markdown)
    console.print(f"pairs {res.n_pairs}; edited {res.n_edited}, reused {res.n_reused}, failed {res.n_failed} (pair x setting)", highlight=False, markup=False)
    console.print(f"scores: {res.scores_path}\nsummary: {res.summary_md} and {res.summary_csv}", highlight=False, markup=False)
    if (res.out_dir / "grids" / "index.html").exists():
        console.print(f"grids: {(res.out_dir / 'grids' / 'index.html').resolve().as_uri()} (and a PNG per pair beside it)", highlight=False, markup=False, soft_wrap=True)
    if res.leakage is not None and res.leakage.overlap:
        console.print(f"[bold yellow]warning, leakage:[/] {escape(res.leakage.message())}", highlight=False)


@app.command("recipe")
def recipe_cmd(
    coco_captions: Annotated[Path, typer.Option("--coco-captions", help="COCO annotations/captions_train2017.json (the official trainer's data).")],
    coco_images: Annotated[Path, typer.Option("--coco-images", help="COCO train2017/ image folder.")],
    pairs: Annotated[Path, typer.Option("--pairs", help="DIV2K caption/target pairs: a dataprep run directory (RUN/edits) or a prompts_editing.json.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: batches/, train/, eval/, paper_table.md.")] = Path("runs/paper"),
    model: Annotated[str, typer.Option("--model", help="SD3 diffusers pipeline (hub id or folder).")] = "stabilityai/stable-diffusion-3-medium-diffusers",
    hard_negatives: Annotated[Optional[Path], typer.Option("--hard-negatives", help="An edits store (RUN/edits) whose single-concept edits join the batches as hard negatives (optional; the official recipe has none).")] = None,
    rows: Annotated[str, typer.Option("--rows", help="table5 (DIV2K) or table6 (Cat2Dog rows).")] = "table5",
    train_steps: Annotated[Optional[int], typer.Option("--train-steps", help="Training steps (default: the trainer's Table 3 value).")] = None,
    options: Annotated[Optional[Path], typer.Option("--options", help='JSON file {"batch_options": {...}, "train_options": {...}, "eval_options": {...}} with BatchOptions / TrainConfig / EvalConfig fields (eval_options.metrics: MetricConfig fields).')] = None,
) -> None:
    """The paper's recipe in one command: COCO batches -> train SD3 tokens -> FlowEdit on DIV2K pairs, Table 5 with the paper's numbers beside ours."""
    import json

    from dataprep.errors import ConfigError

    extra: dict = {}
    if options is not None:
        try:
            extra = json.loads(options.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise fail(f"cannot read {options}: {exc} (flag --options; fix: pass a JSON object)")
        unknown = sorted(set(extra) - {"batch_options", "train_options", "eval_options"})
        if unknown:
            raise fail(f"unknown keys {unknown} in {options} (flag --options; fix: use batch_options, train_options, eval_options)")
    from flows.recipe import RecipeConfig, run_recipe

    train_options = dict(extra.get("train_options", {}))
    if train_steps is not None:
        train_options["steps"] = train_steps
    cfg = RecipeConfig(str(coco_captions), str(coco_images), str(pairs), str(out), model,
                       None if hard_negatives is None else str(hard_negatives), rows, dict(extra.get("batch_options", {})),
                       train_options, dict(extra.get("eval_options", {})))

    try:
        res = run_recipe(cfg, on_stage=lambda msg: typer.echo(f"== {msg}"))
    except ConfigError as exc:
        raise fail(str(exc))
    typer.echo(res.markdown)
    typer.echo(f"tokens: {res.train.tokens_dir}\nscores: {res.evaluation.scores_path}\ntable: {res.table_md}")


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
    from dataprep.errors import run_cli

    run_cli(app, "softrepa")


if __name__ == "__main__":
    main()
