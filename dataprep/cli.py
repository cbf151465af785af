"""The `dataprep` command line: parse flags, call the library, print summaries.

Heavy libraries (torch, transformers, datasets) are imported inside the
commands, never at module level, so ``dataprep --help`` starts fast.
Exit status: 0 when a run completed (per-row errors are recorded, not fatal),
1 with ``--strict`` when any row failed, 2 for usage or configuration errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.engines import ConfigError

app = typer.Typer(
    name="dataprep",
    help="Data preparation for SoftREPA: caption images, rewrite captions into single-concept edits, "
    "build contrastive batches, export pairs.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
caption_app = typer.Typer(
    help="Caption images with a vision-language model (default LLaVA-1.5-13B) using prompts/caption.txt. "
    "Pick a source: div2k, folder or hf.",
    no_args_is_help=True,
)
app.add_typer(caption_app, name="caption")


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a configuration error (flag and fix are in the message) and exit."""
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


# ------------------------------------------------------------ shared flags
# Declared once as Annotated aliases so every model-running command has the
# same flags with the same help.

EngineOpt = Annotated[str, typer.Option("--engine", help="Backend: transformers (embedded, default), vllm (in-process, CUDA), openai (any OpenAI-compatible server).", rich_help_panel="Engine")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Model revision (branch, tag or commit) on the hub.", rich_help_panel="Engine")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel="Engine")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.", rich_help_panel="Engine")]
BatchOpt = Annotated[str, typer.Option("--batch-size", help="Requests per generate call: an integer, or auto (from free GPU memory; 8 on CPU).", rich_help_panel="Engine")]
QuantOpt = Annotated[Optional[str], typer.Option("--quantize", help="Load weights with bitsandbytes: 4bit (NF4, like the paper's 4-bit LLaVA) or 8bit. Needs the quant extra and a CUDA GPU.", rich_help_panel="Engine")]
TPOpt = Annotated[int, typer.Option("--tensor-parallel-size", help="vllm: GPUs to shard the model over.", rich_help_panel="Engine")]
GMUOpt = Annotated[float, typer.Option("--gpu-memory-utilization", help="vllm: fraction of GPU memory it may take.", rich_help_panel="Engine")]
BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help="openai: server URL, e.g. http://127.0.0.1:8000/v1.", rich_help_panel="Engine")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option("--api-key-env", help="openai: name of the environment variable holding the API key (the key itself is never logged).", rich_help_panel="Engine")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="openai: requests in flight at once.", rich_help_panel="Engine")]
TempOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.", rich_help_panel="Sampling")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling when --temperature > 0.", rich_help_panel="Sampling")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Generation budget per request; rows that hit it get finish_reason=length.", rich_help_panel="Sampling")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for sampling (part of the row key).", rich_help_panel="Sampling")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute rows that already exist (default: skip keys with a good row, retry failed ones).", rich_help_panel="Run")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 if any row failed (default: record per-row errors and exit 0).", rich_help_panel="Run")]
ShardOpt = Annotated[int, typer.Option("--rows-per-shard", help="Rows per Parquet shard; a killed run loses at most one shard.", rich_help_panel="Run")]


def engine_config(**kw) -> "object":
    from dataprep.engines import EngineConfig

    return EngineConfig(**kw)


# ------------------------------------------------------------ caption (issue 2)

PromptFileOpt = Annotated[str, typer.Option("--prompt-file", help="Caption prompt file; a bare name means the shipped prompts/ file.", rich_help_panel="Caption")]
CropOpt = Annotated[bool, typer.Option("--crop", help="Center-crop to a square instead of padding with the CLIP mean colour (LLaVA-1.5's default; a crop drops up to a third of a DIV2K frame).", rich_help_panel="Caption")]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", help="Images with more pixels are rejected as error rows (decompression-bomb guard).", rich_help_panel="Caption")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Decode processes (0 = decode in the main process).", rich_help_panel="Run")]
CaptionModelOpt = Annotated[str, typer.Option("--model", help="Vision-language model: hub id or local directory.", rich_help_panel="Engine")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run directory; captions go to OUT/captions/ as Parquet shards + manifest.json.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Caption at most N images.")]


def _caption(refs_fn, out: Path, model: str, engine: str, revision, device, dtype, batch_size, quantize, tensor_parallel_size, gpu_memory_utilization, base_url, api_key_env, concurrency, prompt_file, crop, max_pixels, temperature, top_p, max_new_tokens, seed, force, strict, rows_per_shard, workers) -> None:
    from rich.console import Console

    from dataprep.caption import CaptionOptions, run_caption
    from dataprep.stage import print_summary

    opts = CaptionOptions(prompt_file=prompt_file, crop=crop, max_pixels=max_pixels, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, force=force, rows_per_shard=rows_per_shard, workers=workers)
    cfg = engine_config(engine=engine, model=model, revision=revision, device=device, dtype=dtype, batch_size=batch_size, quantize=quantize, tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency)
    try:
        opts.validate()
        cfg.validate()
        refs = refs_fn()  # sources validate their paths before the model loads
        summary = run_caption(refs, out, cfg, opts)
    except ConfigError as exc:
        raise fail(str(exc))
    print_summary(summary, Console())
    if strict and summary.n_failed:
        raise typer.Exit(1)


@caption_app.command("div2k")
def caption_div2k(
    data: Annotated[Path, typer.Option("--data", help="Extracted DIV2K_train_HR/ (or DIV2K_valid_HR/) folder, or the official zip, read without extracting.")],
    out: OutOpt = Path("runs/div2k"),
    split: Annotated[str, typer.Option("--split", help="train (ids 0001-0800) or valid (0801-0900).")] = "train",
    ids: Annotated[Optional[str], typer.Option("--ids", help="Only these image numbers, e.g. 1-100 or 1,5,9-12.")] = None,
    limit: LimitOpt = None,
    model: CaptionModelOpt = "llava-hf/llava-1.5-13b-hf",
    engine: EngineOpt = "transformers",
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = "auto",
    quantize: QuantOpt = None,
    tensor_parallel_size: TPOpt = 1,
    gpu_memory_utilization: GMUOpt = 0.9,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 64,
    prompt_file: PromptFileOpt = "caption.txt",
    crop: CropOpt = False,
    max_pixels: MaxPixelsOpt = 64_000_000,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    strict: StrictOpt = False,
    rows_per_shard: ShardOpt = 256,
    workers: WorkersOpt = 2,
) -> None:
    """Caption DIV2K (ids div2k/0001..0800) with LLaVA-1.5 and "Describe the object and background in the image"."""
    from dataprep.sources import div2k

    _caption(lambda: div2k(data, split=split, ids=ids, limit=limit), out, model, engine, revision, device, dtype, batch_size, quantize, tensor_parallel_size, gpu_memory_utilization, base_url, api_key_env, concurrency, prompt_file, crop, max_pixels, temperature, top_p, max_new_tokens, seed, force, strict, rows_per_shard, workers)


@caption_app.command("folder")
def caption_folder(
    path: Annotated[Path, typer.Argument(help="Folder of images, searched recursively (png, jpg, webp, bmp, tiff).")],
    out: OutOpt = Path("runs/folder"),
    name: Annotated[Optional[str], typer.Option("--name", help="Id prefix (default: the folder's name); ids are NAME/relative/path.png.")] = None,
    limit: LimitOpt = None,
    model: CaptionModelOpt = "llava-hf/llava-1.5-13b-hf",
    engine: EngineOpt = "transformers",
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = "auto",
    quantize: QuantOpt = None,
    tensor_parallel_size: TPOpt = 1,
    gpu_memory_utilization: GMUOpt = 0.9,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 64,
    prompt_file: PromptFileOpt = "caption.txt",
    crop: CropOpt = False,
    max_pixels: MaxPixelsOpt = 64_000_000,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    strict: StrictOpt = False,
    rows_per_shard: ShardOpt = 256,
    workers: WorkersOpt = 2,
) -> None:
    """Caption every image under a folder."""
    from dataprep.sources import folder

    _caption(lambda: folder(path, name=name, limit=limit), out, model, engine, revision, device, dtype, batch_size, quantize, tensor_parallel_size, gpu_memory_utilization, base_url, api_key_env, concurrency, prompt_file, crop, max_pixels, temperature, top_p, max_new_tokens, seed, force, strict, rows_per_shard, workers)


@caption_app.command("hf")
def caption_hf(
    name_or_path: Annotated[str, typer.Argument(help="Hugging Face dataset: hub id, or a local Parquet file/folder, imagefolder or save_to_disk directory (these work offline).")],
    out: OutOpt = Path("runs/hf"),
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "train",
    image_column: Annotated[str, typer.Option("--image-column", help="Column holding the images.")] = "image",
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column with a stable id (default: row number).")] = None,
    limit: LimitOpt = None,
    model: CaptionModelOpt = "llava-hf/llava-1.5-13b-hf",
    engine: EngineOpt = "transformers",
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: BatchOpt = "auto",
    quantize: QuantOpt = None,
    tensor_parallel_size: TPOpt = 1,
    gpu_memory_utilization: GMUOpt = 0.9,
    base_url: BaseUrlOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    concurrency: ConcurrencyOpt = 64,
    prompt_file: PromptFileOpt = "caption.txt",
    crop: CropOpt = False,
    max_pixels: MaxPixelsOpt = 64_000_000,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    strict: StrictOpt = False,
    rows_per_shard: ShardOpt = 256,
    workers: WorkersOpt = 2,
) -> None:
    """Caption the images of a Hugging Face dataset (through `datasets`)."""
    from dataprep.sources import hf_dataset

    _caption(lambda: list(hf_dataset(name_or_path, split=split, image_column=image_column, id_column=id_column, limit=limit)), out, model, engine, revision, device, dtype, batch_size, quantize, tensor_parallel_size, gpu_memory_utilization, base_url, api_key_env, concurrency, prompt_file, crop, max_pixels, temperature, top_p, max_new_tokens, seed, force, strict, rows_per_shard, workers)


# ------------------------------------------------------------ rewrite, check (issue 3)


@app.command("check")
def check_cmd(
    path: Annotated[Path, typer.Argument(help="Pairs to check: JSONL, JSON (a list of objects, e.g. SoftREPA's prompts_editing.json), Parquet, or an edits folder (OUT/edits).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the per-row report here: .parquet or .jsonl (input columns carried through, in input order).")] = None,
    source_column: Annotated[Optional[str], typer.Option("--source-column", help="Source text column (default: source, else SoftREPA's prompt).")] = None,
    target_column: Annotated[Optional[str], typer.Option("--target-column", help="Target text column (default: target, else SoftREPA's tgt_prompt).")] = None,
    show: Annotated[int, typer.Option("--show", help="Print the first N failing rows (row number or --id-column, rules, replaced span).")] = 10,
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column naming each row in the failures printed (default: image_id or id if present).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any pair fails the rules or cannot be checked.")] = False,
) -> None:
    """Check (source, target) pairs against the single-concept rules of prompts/edit.txt; print counts per rule and the pass rate."""
    from rich.console import Console

    from dataprep.check import check_rows, pick_columns, print_check_summary, print_failures, read_records, write_report

    try:
        if out is not None and out.suffix.lower() not in (".parquet", ".jsonl", ".json"):
            raise ConfigError(f"unknown report type {out.suffix!r}", "--out", "end the path in .parquet or .jsonl")
        rows = read_records(path)
        src, tgt = pick_columns(rows, source_column, target_column)
        report, summary = check_rows(rows, src, tgt)
        if out is not None:
            write_report(report, out)
    except ConfigError as exc:
        raise fail(str(exc))
    console = Console()
    print_check_summary(summary, console, title=f"check: {path} ({src} -> {tgt})")
    if show > 0:
        id_col = id_column or next((c for c in ("image_id", "id", "img_path") if any(c in r for r in rows)), None)
        print_failures(report, show, console, id_col)
    if out is not None:
        console.print(f"report: {out}", highlight=False)
    if strict and summary.passed < summary.total:
        raise typer.Exit(1)


# ------------------------------------------------------------ batches, export, stats (issue 5)


# ------------------------------------------------------------ pipeline (issue 4)


# ------------------------------------------------------------ server, serve (issue 8)


# ------------------------------------------------------------ tiny models, demo


@app.command("tiny-models")
def tiny_models(
    out: Annotated[Path, typer.Argument(help="Directory to write into; one from_pretrained directory per model.")],
    no_diffusers: Annotated[bool, typer.Option("--no-diffusers", help="Only the text/vision models (llava, llama).")] = False,
) -> None:
    """Write tiny random checkpoints of every model the pipeline uses (LLaVA, Llama, SD pipelines) for offline tests and the demo."""
    from rich.console import Console

    from dataprep.tiny import write_all

    written = write_all(out, diffusers=not no_diffusers)
    console = Console()
    for name, path in written.items():
        console.print(f"{name:8s} {path}")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        raise SystemExit(_print_config_error(exc))


def _print_config_error(exc: ConfigError) -> int:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
    return 2
