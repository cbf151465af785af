"""``dataprep caption div2k|folder|hf`` and ``dataprep pipeline div2k``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from dataprep.cli.common import CAPTION_MODEL, EXECUTOR, REWRITE_MODEL, DataOpt, IdsOpt, LimitOpt, SplitOpt, StrictOpt, app, engine_flags, model_flag, print_stage
from dataprep.runtime import Flags, config_command, print_summary

caption_app = typer.Typer(
    help="Caption images with a vision-language model (default LLaVA-1.5-13B) using prompts/caption.txt. "
    "Pick a source: div2k, folder or hf.",
    no_args_is_help=True,
)
app.add_typer(caption_app, name="caption")

CAPTION = dict(
    engine=engine_flags(CAPTION_MODEL, "Vision-language model: hub id or local directory."),
    options=Flags("dataprep.caption:CaptionOptions"),
    executor=EXECUTOR,
)
OutOpt = Annotated[Path, typer.Option("--out", help="Run directory; captions go to OUT/captions/ as Parquet shards + _manifest.json.")]


def _caption(refs: Callable[[], Any], out: Path, strict: bool, engine, options, executor) -> None:
    """Caption ``refs()`` with the flag groups of :data:`CAPTION` (engine, options, executor)."""
    from dataprep.caption import run_caption

    summary = run_caption(refs(), out, engine, options, executor=executor)  # sources check their paths before the model loads
    print_stage(summary, strict and bool(summary.n_failed))


@config_command(caption_app, "div2k", **CAPTION)
def caption_div2k(
    data: DataOpt,
    out: OutOpt = Path("runs/div2k"),
    split: SplitOpt = "train",
    ids: IdsOpt = None,
    limit: LimitOpt = None,
    strict: StrictOpt = False,
    **configs,
) -> None:
    """Caption DIV2K (ids div2k/0001..0800) with LLaVA-1.5 and "Describe the object and background in the image"."""
    from dataprep.sources import div2k

    _caption(lambda: div2k(data, split=split, ids=ids, limit=limit), out, strict, **configs)


@config_command(caption_app, "folder", **CAPTION)
def caption_folder(
    path: Annotated[Path, typer.Argument(help="Folder of images, searched recursively (png, jpg, webp, bmp, tiff).")],
    out: OutOpt = Path("runs/folder"),
    name: Annotated[Optional[str], typer.Option("--name", help="Id prefix (default: the folder's name); ids are NAME/relative/path.png.")] = None,
    limit: LimitOpt = None,
    strict: StrictOpt = False,
    **configs,
) -> None:
    """Caption every image under a folder."""
    from dataprep.sources import folder

    _caption(lambda: folder(path, name=name, limit=limit), out, strict, **configs)


@config_command(caption_app, "hf", **CAPTION)
def caption_hf(
    name_or_path: Annotated[str, typer.Argument(help="Hugging Face dataset: hub id, or a local Parquet file/folder, imagefolder or save_to_disk directory (these work offline).")],
    out: OutOpt = Path("runs/hf"),
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "train",
    image_column: Annotated[str, typer.Option("--image-column", help="Column holding the images.")] = "image",
    id_column: Annotated[Optional[str], typer.Option("--id-column", help="Column with a stable id (default: row number).")] = None,
    limit: LimitOpt = None,
    strict: StrictOpt = False,
    **configs,
) -> None:
    """Caption the images of a Hugging Face dataset (through `datasets`)."""
    from dataprep.sources import hf_dataset

    _caption(lambda: list(hf_dataset(name_or_path, split=split, image_column=image_column, id_column=id_column, limit=limit)), out, strict, **configs)


# ------------------------------------------------------------ pipeline

pipeline_app = typer.Typer(help="Caption, then rewrite, in one command with one engine choice (OUT/captions then OUT/edits; the same resume rules as the two stage commands).", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@config_command(
    pipeline_app,
    "div2k",
    captioner=model_flag("--caption-model", CAPTION_MODEL, "Vision-language model for captions: hub id or local directory."),
    rewriter=model_flag("--rewrite-model", REWRITE_MODEL, "Instruction model for rewrites: hub id or local directory."),
    engine=engine_flags(None),
    caption_options=Flags("dataprep.caption:CaptionOptions", only=("crop", "max_new_tokens", "seed", "force", "rows_per_shard", "workers"),
                          names={"max_new_tokens": "--caption-max-new-tokens"}, helps={"max_new_tokens": "Caption generation budget per image."}),
    rewrite_options=Flags("dataprep.rewrite:RewriteOptions", only=("max_new_tokens", "max_attempts"), names={"max_new_tokens": "--rewrite-max-new-tokens"}, panels={"max_attempts": "Sampling"},
                          helps={"max_new_tokens": "Rewrite generation budget per attempt.", "max_attempts": "Rewrite generations per caption until one passes the rule checker."}),
    executor=EXECUTOR,
)
def pipeline_div2k(
    data: Annotated[Path, typer.Option("--data", help="Extracted DIV2K_train_HR/ (or DIV2K_valid_HR/) folder, or the official zip.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory: OUT/captions/ and OUT/edits/ (Parquet shards + manifests).")] = Path("runs/div2k"),
    split: SplitOpt = "train",
    ids: IdsOpt = None,
    limit: LimitOpt = None,
    rewrite_base_url: Annotated[Optional[str], typer.Option("--rewrite-base-url", help="openai: server for the rewrites when it is not the caption server (vllm serve serves one model each); default --base-url.", rich_help_panel="Engine")] = None,
    strict: StrictOpt = False,
    captioner=None,
    rewriter=None,
    engine=None,
    caption_options=None,
    rewrite_options=None,
    executor=None,
) -> None:
    """Caption DIV2K with LLaVA-1.5, then rewrite every caption with Llama-3.1 (greedy captions; rule-checked rewrites with retries)."""
    from rich.console import Console

    from dataprep.pipeline import run_pipeline
    from dataprep.rewrite import KEPT_FAILING

    # --seed, --force and --rows-per-shard apply to both stages
    c = caption_options
    rewrite_options = replace(rewrite_options, seed=c.seed, force=c.force, rows_per_shard=c.rows_per_shard)
    console = Console()
    from dataprep.sources import div2k

    refs = div2k(data, split=split, ids=ids, limit=limit)
    summary = run_pipeline(refs, out, engine, captioner.model, rewriter.model, caption_options, rewrite_options, rewrite_base_url=rewrite_base_url, executor=executor, console=console)
    print_summary(summary.caption, console)
    print_summary(summary.rewrite, console)
    if strict and (summary.n_failed or summary.rewrite.extra.get(KEPT_FAILING, 0)):
        raise typer.Exit(1)
