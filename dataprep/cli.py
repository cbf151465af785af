"""The `dataprep` command line: parse flags, call the library, print summaries.

Heavy libraries (torch, transformers, datasets) are imported inside the
commands, never at module level, so ``dataprep --help`` starts fast.
Exit status: 0 when a run completed (per-row errors are recorded, not fatal),
1 with ``--strict`` when any row failed, 2 for usage or configuration errors.
Any other failure prints one line and exits 1 (``--debug`` or DATAPREP_DEBUG=1
shows the traceback); see :mod:`dataprep.errors`.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.errors import ConfigError

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


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="On a failure, show the full traceback instead of one line (also DATAPREP_DEBUG=1). Accepted anywhere on the command line.")] = False,
) -> None:
    # `main` takes --debug off the command line before typer parses it (so it
    # works after a subcommand too); this declaration puts it in --help.
    del debug


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a configuration error (flag and fix are in the message) and exit."""
    from rich.console import Console
    from rich.markup import escape

    # escape: an install hint like softrepa-dataprep[vllm] is not rich markup
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
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
BaseUrlOpt = Annotated[Optional[list[str]], typer.Option("--base-url", help="openai: server URL, e.g. http://127.0.0.1:8000/v1. Repeat it (or give a comma list) for a fleet: each request goes to the least-loaded server, and a server that drops connections is set aside while the others take its work.", rich_help_panel="Engine")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option("--api-key-env", help="openai: name of the environment variable holding the API key (the key itself is never logged).", rich_help_panel="Engine")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="openai: requests in flight at once.", rich_help_panel="Engine")]
TempOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.", rich_help_panel="Sampling")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling when --temperature > 0.", rich_help_panel="Sampling")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", help="Generation budget per request; rows that hit it get finish_reason=length.", rich_help_panel="Sampling")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for sampling (part of the row key).", rich_help_panel="Sampling")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute rows that already exist (default: skip keys with a good row, retry failed ones).", rich_help_panel="Run")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 if any row failed (default: record per-row errors and exit 0).", rich_help_panel="Run")]
ShardOpt = Annotated[int, typer.Option("--rows-per-shard", help="Rows per Parquet shard; a killed run loses at most one shard.", rich_help_panel="Run")]


MaxRetriesOpt = Annotated[int, typer.Option("--max-retries", help="openai: retries per request on 429, 5xx, timeouts and dropped connections (exponential backoff).", rich_help_panel="Engine")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="openai: seconds per request attempt, a total deadline (connect, upload and the whole answer, also from a server that trickles bytes).", rich_help_panel="Engine")]
MaxInflightOpt = Annotated[Optional[int], typer.Option("--max-inflight", help="openai: requests whose payload (the encoded image) exists at once; bounds memory on large images. Default: --concurrency.", rich_help_panel="Engine")]

# Flag groups shared by several commands: name -> (annotated type, default).
# `with_flags` appends a group to a command's signature and hands the values
# to the command as one dict, so each flag is declared once for every command.
ENGINE_FLAGS = {
    "engine": (EngineOpt, "transformers"),
    "device": (DeviceOpt, "auto"),
    "dtype": (DtypeOpt, "auto"),
    "batch_size": (BatchOpt, "auto"),
    "quantize": (QuantOpt, None),
    "tensor_parallel_size": (TPOpt, 1),
    "gpu_memory_utilization": (GMUOpt, 0.9),
    "base_url": (BaseUrlOpt, None),
    "api_key_env": (ApiKeyEnvOpt, None),
    "concurrency": (ConcurrencyOpt, 64),
    "max_retries": (MaxRetriesOpt, 5),
    "timeout_s": (TimeoutOpt, 120.0),
    "max_inflight": (MaxInflightOpt, None),
}


# Where the model runs (dataprep.executors): this process, or engine replicas on a Ray cluster.
ExecutorOpt = Annotated[str, typer.Option("--executor", help="local (this process, default) or ray (Ray Data: decoding in CPU tasks, --replicas engine actors; needs the ray extra).", rich_help_panel="Executor")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="ray: cluster to join: HOST:PORT of `ray start --head`, or auto (the cluster this machine belongs to); default: start a local Ray.", rich_help_panel="Executor")]
ReplicasOpt = Annotated[int, typer.Option("--replicas", help="ray: engine replicas (actors), each loading the model once.", rich_help_panel="Executor")]
GpusPerReplicaOpt = Annotated[Optional[float], typer.Option("--gpus-per-replica", help="ray: GPUs per replica (default: the tensor-parallel size for vllm, 1 for transformers when the cluster has GPUs, 0 for openai).", rich_help_panel="Executor")]
CpusPerReplicaOpt = Annotated[float, typer.Option("--cpus-per-replica", help="ray: CPUs each replica reserves (and its torch threads on CPU).", rich_help_panel="Executor")]
EXECUTOR_FLAGS = {
    "executor": (ExecutorOpt, "local"),
    "ray_address": (RayAddressOpt, None),
    "replicas": (ReplicasOpt, 1),
    "gpus_per_replica": (GpusPerReplicaOpt, None),
    "cpus_per_replica": (CpusPerReplicaOpt, 1.0),
}


def executor_config(**kw) -> "object":
    from dataprep.executors import ExecutorConfig

    return ExecutorConfig(**kw)


def with_flags(**groups: dict[str, tuple[object, object]]):
    """Append shared flag groups to a typer command; each group arrives as one dict kwarg."""
    import functools
    import inspect

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)  # typer needs real annotations, not strings
        own = [p for p in sig.parameters.values() if p.name not in groups]
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
            for flags in groups.values()
            for name, (annotation, default) in flags.items()
        ]

        @functools.wraps(fn)
        def command(**kwargs):
            for group, flags in groups.items():
                kwargs[group] = {name: kwargs.pop(name) for name in flags}
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=own + extra)
        return command

    return decorate


def engine_config(**kw) -> "object":
    from dataprep.engines import EngineConfig, split_base_urls

    if isinstance(kw.get("base_url"), (list, tuple)):  # --base-url repeated: one comma list in the config
        kw["base_url"] = ",".join(split_base_urls(kw["base_url"])) or None
    return EngineConfig(**kw)


# ------------------------------------------------------------ caption

PromptFileOpt = Annotated[str, typer.Option("--prompt-file", help="Caption prompt file; a bare name means the shipped prompts/ file.", rich_help_panel="Caption")]
CropOpt = Annotated[bool, typer.Option("--crop", help="Center-crop to a square instead of padding with the CLIP mean colour (LLaVA-1.5's default; a crop drops up to a third of a DIV2K frame).", rich_help_panel="Caption")]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", help="Images with more pixels are rejected as error rows (decompression-bomb guard).", rich_help_panel="Caption")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Decode processes (0 = decode in the main process).", rich_help_panel="Run")]
CaptionModelOpt = Annotated[str, typer.Option("--model", help="Vision-language model: hub id or local directory.", rich_help_panel="Engine")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run directory; captions go to OUT/captions/ as Parquet shards + _manifest.json.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Caption at most N images.")]

CAPTION_FLAGS = {
    "prompt_file": (PromptFileOpt, "caption.txt"),
    "crop": (CropOpt, False),
    "max_pixels": (MaxPixelsOpt, 64_000_000),
    "temperature": (TempOpt, 0.0),
    "top_p": (TopPOpt, 1.0),
    "max_new_tokens": (MaxNewOpt, 256),
    "seed": (SeedOpt, 0),
    "force": (ForceOpt, False),
    "strict": (StrictOpt, False),
    "rows_per_shard": (ShardOpt, 256),
    "workers": (WorkersOpt, 2),
    "max_bytes": (Annotated[int, typer.Option("--max-bytes", help="Files larger than this many bytes become too_large error rows, decided from the file size without reading it (default 256 MiB).", rich_help_panel="Caption")], 256 * 1024 * 1024),
    "wait_lock": (Annotated[bool, typer.Option("--wait-lock", help="If another run is writing OUT/captions, wait for it to finish (default: stop at once, exit 2, naming it).", rich_help_panel="Run")], False),
    "min_side": (Annotated[int, typer.Option("--min-side", help="Image check: flag 'small' when the shorter side is below this many pixels (0 = off). Stored in image_flags; not part of the row key.", rich_help_panel="Image checks")], 128),
    "blank_std": (Annotated[float, typer.Option("--blank-std", help="Image check: flag 'blank' when the grey-level standard deviation (0-255) is below this (0 = off).", rich_help_panel="Image checks")], 4.0),
    "max_aspect": (Annotated[float, typer.Option("--max-aspect", help="Image check: flag 'aspect' when long side / short side exceeds this.", rich_help_panel="Image checks")], 4.0),
}


def _caption(refs_fn, out: Path, model: str, revision: Optional[str], engine_kw: dict, caption_kw: dict, executor_kw: Optional[dict] = None) -> None:
    from rich.console import Console

    from dataprep.caption import CaptionOptions, run_caption
    from dataprep.runtime import print_summary

    strict = caption_kw.pop("strict")
    opts = CaptionOptions(**caption_kw)
    cfg = engine_config(model=model, revision=revision, **engine_kw)
    try:
        opts.validate()
        cfg.validate()
        executor = executor_config(**(executor_kw or {}))
        refs = refs_fn()  # sources validate their paths before the model loads
        summary = run_caption(refs, out, cfg, opts, executor=executor)
    except ConfigError as exc:
        raise fail(str(exc))
    print_summary(summary, Console())
    if strict and summary.n_failed:
        raise typer.Exit(1)


@caption_app.command("div2k")
@with_flags(engine_kw=ENGINE_FLAGS, caption_kw=CAPTION_FLAGS, executor_kw=EXECUTOR_FLAGS)
def caption_div2k(
    data: Annotated[Path, typer.Option("--data", help="Extracted DIV2K_train_HR/ (or DIV2K_valid_HR/) folder, or the official zip, read without extracting.")],
    out: OutOpt = Path("runs/div2k"),
    split: Annotated[str, typer.Option("--split", help="train (ids 0001-0800) or valid (0801-0900).")] = "train",
    ids: Annotated[Optional[str], typer.Option("--ids", help="Only these image numbers, e.g. 1-100 or 1,5,9-12.")] = None,
    limit: LimitOpt = None,
    model: CaptionModelOpt = "llava-hf/llava-1.5-13b-hf",
    revision: RevisionOpt = None,
    engine_kw: dict = None,
    caption_kw: dict = None,
    executor_kw: dict = None,
) -> None:
    """Caption DIV2K (ids div2k/0001..0800) with LLaVA-1.5 and "Describe the object and background in the image"."""
    from dataprep.sources import div2k

    _caption(lambda: div2k(data, split=split, ids=ids, limit=limit), out, model, revision, engine_kw, caption_kw, executor_kw)


@caption_app.command("folder")
@with_flags(engine_kw=ENGINE_FLAGS, caption_kw=CAPTION_FLAGS, executor_kw=EXECUTOR_FLAGS)
def caption_folder(
    path: Annotated[Path, typer.Argument(help="Folder of images, searched recursively (png, jpg, webp, bmp, tiff).")],
    out: OutOpt = Path("runs/folder"),
    name: Annotated[Optional[str], typer.Option("--name", help="Id prefix (default: the folder's name); ids are NAME/relative/path.png.")] = None,
    limit: LimitOpt = None,
    model: CaptionModelOpt = "llava-hf/llava-1.5-13b-hf",
    revision: RevisionOpt = None,
    engine_kw: dict = None,
    caption_kw: dict = None,
    executor_kw: dict = None,
) -> None:
    """Caption every image under a folder."""
    from dataprep.sources import folder

    _caption(lambda: folder(path, name=name, limit=limit), out, model, revision, engine_kw, caption_kw, executor_kw)


@caption_app.command("hf")
@with_flags(engine_kw=ENGINE_FLAGS, caption_kw=CAPTION_FLAGS, executor_kw=EXECUTOR_FLAGS)
def caption_hf(
    name_or_path: Annotated[str, typer.Argument(help="Hugging Face dataset: hub id, or a local Parquet file/folder, imagefolder or save_to_disk directory (these work offline).")],
    out: OutOpt = Path("runs/hf"),
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "train",
    image_column: Annotated[str, typer.Option("--image-column", help="Column holding the images.")] = "image",
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column with a stable id (default: row number).")] = None,
    limit: LimitOpt = None,
    model: CaptionModelOpt = "llava-hf/llava-1.5-13b-hf",
    revision: RevisionOpt = None,
    engine_kw: dict = None,
    caption_kw: dict = None,
    executor_kw: dict = None,
) -> None:
    """Caption the images of a Hugging Face dataset (through `datasets`)."""
    from dataprep.sources import hf_dataset

    _caption(lambda: list(hf_dataset(name_or_path, split=split, image_column=image_column, id_column=id_column, limit=limit)), out, model, revision, engine_kw, caption_kw, executor_kw)


# ------------------------------------------------------------ rewrite, check


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
    from dataprep import diversity

    div = diversity.from_rows(report).summary()
    if div["replacements"]:
        console.print(diversity.render(div))
    if show > 0:
        id_col = id_column or next((c for c in ("image_id", "id", "img_path") if any(c in r for r in rows)), None)
        print_failures(report, show, console, id_col)
    if out is not None:
        console.print(f"report: {out}", highlight=False, markup=False)
    if strict and summary.passed < summary.total:
        raise typer.Exit(1)


@app.command("rewrite")
@with_flags(engine_kw=ENGINE_FLAGS, executor_kw=EXECUTOR_FLAGS)
def rewrite_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory; edits go to OUT/edits/ as Parquet shards + manifest.")] = Path("runs/div2k"),
    captions: Annotated[Optional[Path], typer.Option("--captions", help="Caption store to rewrite (default: OUT/captions).", rich_help_panel="Input")] = None,
    input_file: Annotated[Optional[Path], typer.Option("--input", help="Rewrite the texts of a JSONL, JSON or Parquet file instead of a caption store.", rich_help_panel="Input")] = None,
    text_column: Annotated[str, typer.Option("--text-column", help="With --input: the column holding the captions.", rich_help_panel="Input")] = "caption",
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="With --input: the column with a stable id (default: image_id or id, else the row number).", rich_help_panel="Input")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Rewrite at most N captions.", rich_help_panel="Input")] = None,
    rules: Annotated[str, typer.Option("--rules", help="Rewriting instruction (system message); a bare name means the shipped prompts/ file.", rich_help_panel="Rewrite")] = "edit.txt",
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Generations per caption until one passes the rule checker; the last is kept (passed=false) if none does.", rich_help_panel="Rewrite")] = 3,
    retry_temperature: Annotated[float, typer.Option("--retry-temperature", help="Sampling temperature of retries (attempt k uses seed --seed + k - 1).", rich_help_panel="Sampling")] = 0.7,
    model: Annotated[str, typer.Option("--model", help="Instruction model: hub id or local directory.", rich_help_panel="Engine")] = "meta-llama/Llama-3.1-8B-Instruct",
    revision: RevisionOpt = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Attempt 1: 0 = greedy (default); > 0 samples.", rich_help_panel="Sampling")] = 0.0,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewOpt = 512,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any row failed or any kept rewrite breaks the rules (default: record and exit 0).", rich_help_panel="Run")] = False,
    rows_per_shard: ShardOpt = 256,
    wait_lock: Annotated[bool, typer.Option("--wait-lock", help="If another run is writing OUT/edits, wait for it to finish (default: stop at once, exit 2, naming it).", rich_help_panel="Run")] = False,
    max_target_share: Annotated[Optional[float], typer.Option("--max-target-share", help="Diversity steering: retry a passing rewrite whose target concept is already more than this share of the passing edits (e.g. 0.05); kept with a note if it stays over.", rich_help_panel="Rewrite")] = None,
    share_min_edits: Annotated[int, typer.Option("--share-min-edits", help="With --max-target-share: judge the share only once this many passing edits are counted.", rich_help_panel="Rewrite")] = 20,
    engine_kw: dict = None,
    executor_kw: dict = None,
) -> None:
    """Rewrite captions into single-concept edits with Llama-3.1-8B-Instruct and prompts/edit.txt; every output is rule-checked and retried."""
    from rich.console import Console

    from dataprep.rewrite import KEPT_FAILING, RewriteOptions, inputs_from_captions, inputs_from_file, run_rewrite
    from dataprep.runtime import print_summary

    opts = RewriteOptions(rules_file=rules, max_attempts=max_attempts, temperature=temperature, retry_temperature=retry_temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, force=force, rows_per_shard=rows_per_shard, max_target_share=max_target_share, share_min_edits=share_min_edits, wait_lock=wait_lock)
    cfg = engine_config(model=model, revision=revision, **engine_kw)
    try:
        if captions is not None and input_file is not None:
            raise ConfigError("--captions and --input both given", "--input", "pass one of them")
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit {limit} is less than 1", "--limit", "use a positive number, or leave it out")
        opts.validate()
        cfg.validate()
        executor = executor_config(**(executor_kw or {}))
        if input_file is not None:
            texts = inputs_from_file(input_file, text_column, id_column)
        else:
            texts = inputs_from_captions(captions if captions is not None else out / "captions")
        summary = run_rewrite(texts[:limit] if limit else texts, out, cfg, opts, executor=executor)
    except ConfigError as exc:
        raise fail(str(exc))
    print_summary(summary, Console())
    if strict and (summary.n_failed or summary.extra.get(KEPT_FAILING, 0)):
        raise typer.Exit(1)


# ------------------------------------------------------------ batches, export, stats


def _progress(label: str):
    """A rich progress bar and the ``progress(done, total)`` callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


@app.command("batches")
def batches_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the batch shards, e.g. OUT/batches (part-<run>-<n>.parquet + _run-<run>.json + the manifest).")],
    captions: Annotated[Optional[Path], typer.Option("--captions", help="Caption store of a `dataprep caption` run (OUT/captions); the newest good caption per image is used.", rich_help_panel="Input")] = None,
    edits: Annotated[Optional[Path], typer.Option("--edits", help="Edit store of a `dataprep rewrite` run (OUT/edits): passing edits become hard negatives.", rich_help_panel="Input")] = None,
    coco_captions: Annotated[Optional[Path], typer.Option("--coco-captions", help="COCO captions_train2017.json instead of --captions: five captions per image, one positive per epoch (rotating).", rich_help_panel="Input")] = None,
    coco_images: Annotated[Optional[Path], typer.Option("--coco-images", help="COCO image folder (train2017/) for --coco-captions.", rich_help_panel="Input")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Grid of paper Table 3: sd3 = 4 images x 4 prompts (4 pos, 12 neg), sdxl = 1 x 16 (1, 15), sd1.5 = 4 x 8 (4, 28); or custom with --images/--prompts.", rich_help_panel="Grid")] = "sd3",
    images: Annotated[Optional[int], typer.Option("--images", help="Images per batch (overrides the preset's).", rich_help_panel="Grid")] = None,
    prompts: Annotated[Optional[int], typer.Option("--prompts", help="Prompts per batch, positives included (overrides the preset's); must be >= --images.", rich_help_panel="Grid")] = None,
    hard_negatives: Annotated[Optional[int], typer.Option("--hard-negatives", help="At most K edits (hard negatives) per batch; default as many as fit: min(images, prompts - images).", rich_help_panel="Grid")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the images; each image once per epoch, reshuffled each epoch.", rich_help_panel="Run")] = 1,
    drop_last: Annotated[bool, typer.Option("--drop-last/--keep-last", help="Drop the last partial batch of an epoch (fixed grid shape, default) or keep it with fewer images.", rich_help_panel="Run")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Shuffle and negative-sampling seed; same inputs + seed give byte-identical shards.", rich_help_panel="Run")] = 0,
    rows_per_shard: Annotated[int, typer.Option("--rows-per-shard", help="Batches per Parquet shard (memory holds at most this many beyond the caption index).", rich_help_panel="Run")] = 1024,
    drop_image_flags: Annotated[Optional[str], typer.Option("--drop-image-flags", help="Leave out images whose caption row has any of these image checks, comma-separated: small,blank,aspect (see `dataprep caption ... --min-side/--blank-std/--max-aspect`).", rich_help_panel="Input")] = None,
    require_judge: Annotated[bool, typer.Option("--require-judge", help="Use only edits the judge graded good as hard negatives (run `dataprep judge` first).", rich_help_panel="Quality")] = False,
    judge: Annotated[Optional[Path], typer.Option("--judge", help="Judge store for --require-judge (default: judge/ beside --edits).", rich_help_panel="Quality")] = None,
    dedup: Annotated[str, typer.Option("--dedup", help="Duplicate clusters of `dataprep dedup`: separate (never two members of a cluster in one batch; default, when records exist), keep-one (one image per cluster), off.", rich_help_panel="Quality")] = "separate",
    dedup_dir: Annotated[Optional[Path], typer.Option("--dedup-dir", help="Dedup records (default: dedup/ beside --captions; with --coco-captions, beside --out).", rich_help_panel="Quality")] = None,
) -> None:
    """Build contrastive image x prompt batches (positives, hard negatives from passing edits, negatives) as Parquet shards."""
    from rich.console import Console

    from dataprep.batches import BatchOptions, build_batches, build_coco_batches, print_batch_summary
    from dataprep.imagecheck import parse_flags

    console = Console()
    try:
        opts = BatchOptions(preset=preset, images=images, prompts=prompts, hard_negatives=hard_negatives, epochs=epochs, drop_last=drop_last, seed=seed, rows_per_shard=rows_per_shard, drop_image_flags=tuple(sorted(parse_flags(drop_image_flags))), require_judge=require_judge, dedup=dedup)
        opts.validate()
        if (captions is None) == (coco_captions is None):
            raise ConfigError("pass exactly one caption source", "--captions / --coco-captions", "give --captions OUT/captions, or --coco-captions FILE with --coco-images DIR")
        if coco_captions is not None and coco_images is None:
            raise ConfigError("--coco-captions needs the image folder", "--coco-images", "pass the train2017/ folder")
        for flag, given in (("--dedup-dir", dedup_dir), ("--judge", judge)):
            if given is not None and not given.is_dir():  # named explicitly: silently ignoring it would hide a typo
                raise ConfigError(f"{given} is not a folder", flag, "pass the folder that `dataprep dedup` / `dataprep judge` wrote (RUN/dedup, RUN/judge), or leave it out")
        bar, update = _progress("batches")
        with bar:
            if captions is not None:
                s = build_batches(captions, out, opts, edits_dir=edits, progress=update, judge_dir=judge, dedup_dir=dedup_dir)
            else:
                s = build_coco_batches(coco_captions, coco_images, out, opts, edits_dir=edits, progress=update, judge_dir=judge, dedup_dir=dedup_dir)
    except ConfigError as exc:
        raise fail(str(exc))
    print_batch_summary(s, console)


export_app = typer.Typer(help="Export a run's caption/edit pairs: SoftREPA prompts_editing.json, PIE-Bench mapping_file.json, or a Hugging Face dataset. Only passing edits unless --include-failed.", no_args_is_help=True)
app.add_typer(export_app, name="export")

ExportOutArg = Annotated[Path, typer.Argument(help="Folder to write the export into (created).")]
ExportRunOpt = Annotated[Path, typer.Option("--run", help="Run directory holding edits/ (and captions/ for image paths), i.e. the OUT of `dataprep rewrite`.")]
IncludeFailedOpt = Annotated[bool, typer.Option("--include-failed", help="Also export edits that failed the rule checker (an image's passing edit still wins).")]
LinkOpt = Annotated[bool, typer.Option("--link", help="Symlink local image files instead of copying them (zip members are always copied).")]


def _export(name: str, out: Path, run: Path, **kw):
    """Run dataprep.export.export_<name> with a progress bar and print its one-line summary."""
    from rich.console import Console

    from dataprep import export

    try:
        bar, update = _progress("images")
        with bar:
            s = getattr(export, f"export_{name}")(run, out, progress=update, **kw)
    except ConfigError as exc:
        raise fail(str(exc))
    skipped = ", ".join(f"{k} {v}" for k, v in s.skipped.items()) or "none"
    Console().print(f"export {s.kind}: {s.pairs} pairs -> {s.out}  (skipped: {skipped})", highlight=False)
    return s


@export_app.command("softrepa")
def export_softrepa_cmd(out: ExportOutArg, run: ExportRunOpt, include_failed: IncludeFailedOpt = False, link: LinkOpt = False) -> None:
    """Write OUT/prompts_editing.json (prompt, img_path, tgt_prompt: the official SoftREPA editing format) with the images beside it."""
    _export("softrepa", out, run, include_failed=include_failed, link=link)


@export_app.command("piebench")
def export_piebench_cmd(out: ExportOutArg, run: ExportRunOpt, include_failed: IncludeFailedOpt = False, link: LinkOpt = False) -> None:
    """Write a PIE-Bench style OUT/mapping_file.json (changed spans in [ ], from the rule checker) and OUT/annotation_images/."""
    _export("piebench", out, run, include_failed=include_failed, link=link)


@export_app.command("hf")
def export_hf_cmd(
    out: ExportOutArg,
    run: ExportRunOpt,
    include_failed: IncludeFailedOpt = False,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Also push to this hub dataset repo (user/name); needs a token with write access (huggingface-cli login).")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the hub repo private.")] = False,
    license: Annotated[str, typer.Option("--license", help="license field of the dataset card (a hub license id, e.g. cc-by-4.0; default other: the images keep their source's license).")] = "other",
) -> None:
    """Save a `datasets` dataset (image, pair, provenance columns) with save_to_disk and a dataset card README.md; optionally push it.

    A failed push prints why in one line and exits 1; the local export is kept and listed in RUN/exports.json.
    """
    s = _export("hf", out, run, include_failed=include_failed, push_to_hub=push_to_hub, private=private, license=license)
    if s.push is not None:
        if s.push["ok"]:
            print(f"pushed to {s.push['url']}{' (private)' if private else ''}")
        else:
            from rich.console import Console
            from rich.markup import escape

            # soft_wrap: one line however narrow the terminal, so logs and grep see it whole
            msg = f"push to {s.push['repo']} failed: {s.push['error']} (the local export is kept at {s.out} and listed in {run / 'exports.json'})"
            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(msg)}", highlight=False)
            raise typer.Exit(1)


@app.command("stats")
def stats_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (OUT of the stages: captions/, edits/, batches/, exports.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON instead of a table.")] = False,
) -> None:
    """One table of what a run directory holds: captions, edits (pass rate, violations by rule), batches, exports."""
    import json

    from rich.console import Console

    from dataprep import stats

    if not run_dir.is_dir():
        raise fail(f"run directory not found: {run_dir} (argument RUN_DIR). Fix: pass the --out folder of a run")
    from dataprep.store import check_run_shards

    try:
        check_run_shards(run_dir, "RUN_DIR")
    except ConfigError as exc:
        raise fail(str(exc))
    s = stats.collect(run_dir)
    if as_json:
        print(json.dumps(s, indent=2, default=str))
    else:
        Console().print(stats.render(s))


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory (OUT of the stages: captions/, edits/, optionally judge/ and dedup/).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default RUN_DIR/report): index.html, assets/, data/, thumbs/. Opens from disk, no server.")] = None,
    page_size: Annotated[int, typer.Option("--page-size", help="Cards per page.")] = 48,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Cards per data file (data/chunk-NNNN.js); the page loads only the chunks it shows.")] = 500,
    thumb_size: Annotated[int, typer.Option("--thumb-size", help="Longest side of the JPEG thumbnails, in pixels.")] = 256,
    thumbs: Annotated[bool, typer.Option("--thumbs/--no-thumbs", help="Write thumbnails (existing ones are reused).")] = True,
    workers: Annotated[int, typer.Option("--workers", help="Thumbnail processes (0 = this process).")] = 0,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N images (by id).")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="Page title (default: the run folder's name).")] = None,
) -> None:
    """Write a static HTML report of a run: a card per image (thumbnail, caption, target with the changed spans
    highlighted, verdict, violations, provenance), filters by rule / verdict / judge / duplicates, text search."""
    from rich.console import Console

    from dataprep.report import ReportOptions, build_report

    try:
        opts = ReportOptions(page_size=page_size, chunk_size=chunk_size, thumb_size=thumb_size, thumbs=thumbs, workers=workers, limit=limit, title=title)
        bar, update = _progress("thumbnails")
        with bar:
            s = build_report(run_dir, out or run_dir / "report", opts, progress=update)
    except ConfigError as exc:
        raise fail(str(exc))
    errs = f", {s.thumb_errors} without thumbnail" if s.thumb_errors else ""
    Console().print(f"report: {s.cards} images in {s.chunks} data chunks, {s.thumbs} thumbnails{errs}\n  open {s.index.resolve().as_uri()}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------ judge, dedup


@app.command("judge")
@with_flags(engine_kw=ENGINE_FLAGS)
def judge_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory: reads OUT/edits, writes OUT/judge/ (Parquet shards + manifest).")] = Path("runs/div2k"),
    edits: Annotated[Optional[Path], typer.Option("--edits", help="Edit store to grade (default: OUT/edits).", rich_help_panel="Input")] = None,
    all_edits: Annotated[bool, typer.Option("--all", help="Also grade pairs the rule checker failed (stats then shows the full checker x judge table).", rich_help_panel="Input")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Grade at most N pairs.", rich_help_panel="Input")] = None,
    prompt_file: Annotated[str, typer.Option("--prompt-file", help="Judge instruction (system message); a bare name means the shipped prompts/ file.", rich_help_panel="Judge")] = "judge.txt",
    guided: Annotated[bool, typer.Option("--guided/--no-guided", help="Constrain decoding to the JSON schema where the engine can (vllm structured outputs, OpenAI response_format); turn off for a server that rejects response_format. Answers are always parsed and retried.", rich_help_panel="Judge")] = True,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Answers per pair until one parses; then an error row (retried by the next run).", rich_help_panel="Judge")] = 3,
    retry_temperature: Annotated[float, typer.Option("--retry-temperature", help="Sampling temperature of retries (attempt k uses seed --seed + k - 1).", rich_help_panel="Sampling")] = 0.7,
    model: Annotated[str, typer.Option("--model", help="Instruction model: hub id or local directory (a larger judge than the rewriter grades better).", rich_help_panel="Engine")] = "meta-llama/Llama-3.1-8B-Instruct",
    revision: RevisionOpt = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Attempt 1: 0 = greedy (default).", rich_help_panel="Sampling")] = 0.0,
    max_new_tokens: MaxNewOpt = 384,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    strict: StrictOpt = False,
    rows_per_shard: ShardOpt = 256,
    engine_kw: dict = None,
) -> None:
    """Grade passing edit pairs on rules 1, 2 and 7 of prompts/edit.txt with an instruction model (JSON verdicts with reasons)."""
    from rich.console import Console

    from dataprep.judge import JudgeOptions, inputs_from_edits, run_judge
    from dataprep.runtime import print_summary

    opts = JudgeOptions(prompt_file=prompt_file, all_edits=all_edits, guided=guided, max_attempts=max_attempts, temperature=temperature, retry_temperature=retry_temperature, max_new_tokens=max_new_tokens, seed=seed, force=force, rows_per_shard=rows_per_shard)
    cfg = engine_config(model=model, revision=revision, **engine_kw)
    try:
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit {limit} is less than 1", "--limit", "use a positive number, or leave it out")
        opts.validate()
        cfg.validate()
        items, left = inputs_from_edits(edits if edits is not None else out / "edits", all_edits)
        summary = run_judge(items[:limit] if limit else items, out, cfg, opts, left_out=left)
    except ConfigError as exc:
        raise fail(str(exc))
    print_summary(summary, Console())
    if strict and summary.n_failed:
        raise typer.Exit(1)


@app.command("dedup")
def dedup_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory: reads RUN/captions (images and captions), writes RUN/dedup/.")],
    captions: Annotated[Optional[Path], typer.Option("--captions", help="Caption store (default: RUN/captions).")] = None,
    coco_captions: Annotated[Optional[Path], typer.Option("--coco-captions", help="COCO captions_train2017.json instead of a caption store (every caption of an image is an item).")] = None,
    coco_images: Annotated[Optional[Path], typer.Option("--coco-images", help="COCO image folder (train2017/) for --coco-captions.")] = None,
    images: Annotated[bool, typer.Option("--images/--no-images", help="Cluster exact (sha256) and near-duplicate (perceptual hash) images.")] = True,
    caption_texts: Annotated[bool, typer.Option("--texts/--no-texts", help="Cluster near-duplicate caption texts (MinHash LSH).")] = True,
    image_distance: Annotated[int, typer.Option("--image-distance", help="Max Hamming distance (bits of a 64-bit phash) for two images to count as one.")] = 8,
    caption_threshold: Annotated[float, typer.Option("--caption-threshold", help="Min estimated Jaccard similarity (word shingles) for two captions to count as one.")] = 0.85,
    num_perm: Annotated[int, typer.Option("--num-perm", help="MinHash permutations per caption (memory: 4 bytes each).")] = 128,
    shingle: Annotated[int, typer.Option("--shingle", help="Words per shingle.")] = 3,
    workers: Annotated[int, typer.Option("--workers", help="Hashing processes for images and caption signatures (0 = in this process).")] = 2,
) -> None:
    """Find duplicate images and near-duplicate captions; record clusters that `batches` keeps apart (or thins with --dedup keep-one)."""
    from rich.console import Console
    from rich.table import Table

    from dataprep.dedup import DedupOptions, run_dedup

    opts = DedupOptions(images=images, captions=caption_texts, image_distance=image_distance, caption_threshold=caption_threshold, num_perm=num_perm, shingle=shingle, workers=workers)
    try:
        bar, update = _progress("dedup")
        with bar:
            s = run_dedup(run_dir, opts, captions_dir=captions, coco_captions=coco_captions, coco_images=coco_images, progress=lambda what, done, total: update(done, total))
    except ConfigError as exc:
        raise fail(str(exc))
    t = Table(title=f"dedup: {s.run_id}", header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    for k, v in s.counts().items():
        t.add_row(k.replace("_", " "), str(v))
    for reason, k in s.image_errors.items():
        t.add_row(f"  image error: {reason}", str(k))
    t.add_row("wall time", f"{s.seconds:.2f} s")
    t.add_row("records", str(s.out_dir))
    Console().print(t)


# ------------------------------------------------------------ pipeline

pipeline_app = typer.Typer(help="Caption, then rewrite, in one command with one engine choice (OUT/captions then OUT/edits; the same resume rules as the two stage commands).", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("div2k")
@with_flags(engine_kw=ENGINE_FLAGS, executor_kw=EXECUTOR_FLAGS)
def pipeline_div2k(
    data: Annotated[Path, typer.Option("--data", help="Extracted DIV2K_train_HR/ (or DIV2K_valid_HR/) folder, or the official zip.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: OUT/captions/ and OUT/edits/ (Parquet shards + manifests).")] = Path("runs/div2k"),
    split: Annotated[str, typer.Option("--split", help="train (ids 0001-0800) or valid (0801-0900).")] = "train",
    ids: Annotated[Optional[str], typer.Option("--ids", help="Only these image numbers, e.g. 1-100 or 1,5,9-12.")] = None,
    limit: LimitOpt = None,
    caption_model: Annotated[str, typer.Option("--caption-model", help="Vision-language model for captions: hub id or local directory.", rich_help_panel="Engine")] = "llava-hf/llava-1.5-13b-hf",
    rewrite_model: Annotated[str, typer.Option("--rewrite-model", help="Instruction model for rewrites: hub id or local directory.", rich_help_panel="Engine")] = "meta-llama/Llama-3.1-8B-Instruct",
    rewrite_base_url: Annotated[Optional[str], typer.Option("--rewrite-base-url", help="openai: server for the rewrites when it is not the caption server (vllm serve serves one model each); default --base-url.", rich_help_panel="Engine")] = None,
    crop: CropOpt = False,
    caption_max_new_tokens: Annotated[int, typer.Option("--caption-max-new-tokens", help="Caption generation budget per image.", rich_help_panel="Sampling")] = 256,
    rewrite_max_new_tokens: Annotated[int, typer.Option("--rewrite-max-new-tokens", help="Rewrite generation budget per attempt.", rich_help_panel="Sampling")] = 512,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Rewrite generations per caption until one passes the rule checker.", rich_help_panel="Sampling")] = 3,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    strict: StrictOpt = False,
    rows_per_shard: ShardOpt = 256,
    workers: WorkersOpt = 2,
    engine_kw: dict = None,
    executor_kw: dict = None,
) -> None:
    """Caption DIV2K with LLaVA-1.5, then rewrite every caption with Llama-3.1 (greedy captions; rule-checked rewrites with retries)."""
    from rich.console import Console

    from dataprep.caption import CaptionOptions
    from dataprep.pipeline import run_pipeline
    from dataprep.rewrite import KEPT_FAILING, RewriteOptions
    from dataprep.sources import div2k
    from dataprep.runtime import print_summary

    cfg = engine_config(**engine_kw)
    copts = CaptionOptions(crop=crop, max_new_tokens=caption_max_new_tokens, seed=seed, force=force, rows_per_shard=rows_per_shard, workers=workers)
    ropts = RewriteOptions(max_attempts=max_attempts, max_new_tokens=rewrite_max_new_tokens, seed=seed, force=force, rows_per_shard=rows_per_shard)
    console = Console()
    try:
        executor = executor_config(**(executor_kw or {}))
        refs = div2k(data, split=split, ids=ids, limit=limit)
        summary = run_pipeline(refs, out, cfg, caption_model, rewrite_model, copts, ropts, rewrite_base_url=rewrite_base_url, executor=executor, console=console)
    except ConfigError as exc:
        raise fail(str(exc))
    print_summary(summary.caption, console)
    print_summary(summary.rewrite, console)
    if strict and (summary.n_failed or summary.rewrite.extra.get(KEPT_FAILING, 0)):
        raise typer.Exit(1)


# ------------------------------------------------------------ server (`dataprep serve` is flows', see the end)

server_app = typer.Typer(help="A local Prefect server (127.0.0.1, SQLite under --home, telemetry off) for the flows. For a team or cluster server set PREFECT_API_URL instead.", no_args_is_help=True)
app.add_typer(server_app, name="server")
HomeOpt = Annotated[Path, typer.Option("--home", help="Server directory (PREFECT_HOME): SQLite database, log, pid file.", rich_help_panel="Server")]
PortOpt = Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.", rich_help_panel="Server")]


@server_app.command("start")
def server_start(
    home: HomeOpt = Path(".prefect"),
    port: PortOpt = 4200,
    gpu_slots: Annotated[int, typer.Option("--gpu-slots", help="Size of the global concurrency limit 'gpu' that GPU stages hold (created if missing; an existing limit keeps its size).")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for /api/health.")] = 90.0,
) -> None:
    """Start a Prefect server in the background and wait until it is healthy."""
    from rich.console import Console

    from dataprep import server

    try:
        state = server.start(home, port, gpu_slots=gpu_slots, timeout_s=timeout)
    except (ConfigError, RuntimeError) as exc:
        raise fail(str(exc))
    Console().print(f"prefect server running (pid {state.pid}): UI {state.ui_url}\n  export PREFECT_API_URL={state.api_url}   # for prefect CLI and workers; `dataprep serve --home {home}` finds it itself")


@server_app.command("stop")
def server_stop(home: HomeOpt = Path(".prefect")) -> None:
    """Stop the server started with this --home."""
    from dataprep import server

    state = server.stop(home)
    print(f"stopped prefect server (pid {state.pid})" if state else f"no server running for {home}")


@server_app.command("status")
def server_status(home: HomeOpt = Path(".prefect")) -> None:
    """Say whether the server of this --home runs and answers /api/health (exit 1 if not)."""
    from dataprep import server

    state, ok = server.status(home)
    if state is None:
        print(f"no server running for {home}")
        raise typer.Exit(1)
    print(f"pid {state.pid}, {state.api_url}: {'healthy' if ok else 'NOT healthy'}")
    if not ok:
        raise typer.Exit(1)


# ------------------------------------------------------------ tiny models, demo


@app.command("tiny-models")
def tiny_models(
    out: Annotated[Path, typer.Argument(help="Directory to write into; one from_pretrained directory per model.")],
) -> None:
    """Write tiny random LLaVA and Llama checkpoints, small test images and DIV2K-shaped frames for offline tests and the demo (`softrepa tiny-models` adds the SD pipelines)."""
    from rich.console import Console

    from dataprep.tiny import write_all

    written = write_all(out)
    console = Console()
    for name, path in written.items():
        console.print(f"{name:8s} {path}", highlight=False, markup=False)


# ------------------------------------------------------------ commands of other packages
# dataprep imports nothing of flows (tests/test_imports.py), yet `dataprep serve`
# is a flows command: flows registers it in the entry-point group
# "dataprep.commands" (pyproject.toml) and it is added here. Only this
# distribution's own metadata is read (scanning every installed distribution
# would cost about 50 ms of each `dataprep` start), every copy of it on
# sys.path: a checkout's stale *.egg-info found first must not hide the
# installed entry points.


def add_plugin_commands(target: typer.Typer, group: str = "dataprep.commands") -> list[str]:
    """Add each command of the entry-point ``group`` to ``target``; returns their names."""
    found: dict[str, metadata.EntryPoint] = {}
    for dist in metadata.distributions(name="softrepa-dataprep"):
        for ep in dist.entry_points.select(group=group):
            found.setdefault(ep.name, ep)
    for name, ep in found.items():
        target.command(name)(ep.load())
    return list(found)


add_plugin_commands(app)


def main() -> None:
    """Entry point: exit 0 / 1 / 2 as :mod:`dataprep.errors` describes; --debug shows tracebacks."""
    from dataprep.errors import run_cli

    run_cli(app, "dataprep")


def _print_config_error(exc: ConfigError) -> int:
    fail(str(exc))
    return 2
