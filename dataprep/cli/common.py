"""What the ``dataprep`` commands share: the app, the flag groups, the progress bar.

Flag groups are config dataclasses (:class:`dataprep.runtime.Flags`): each
flag's default, help text and validation live once, on its field. The
dataclasses are named as strings, so their modules (which import pyarrow)
load only when a command runs or shows its --help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.errors import ConfigError
from dataprep.runtime import Flags, Ref, print_summary, progress_bar, typer_app
from dataprep.engines import split_base_urls

app = typer_app("dataprep", "Data preparation for SoftREPA: caption images, rewrite captions into single-concept edits, build contrastive batches, export pairs.", plugins="dataprep.commands")

ENGINE_CONFIG = "dataprep.engines:EngineConfig"
CAPTION_MODEL = Ref("dataprep.caption:DEFAULT_MODEL")
REWRITE_MODEL = Ref("dataprep.rewrite:DEFAULT_MODEL")
JUDGE_MODEL = Ref("dataprep.judge:DEFAULT_MODEL")


def _base_urls(values: list[str]) -> str | None:
    """--base-url repeated (or comma lists): one comma list in the config."""
    return ",".join(split_base_urls(values)) or None


def engine_flags(model: Ref | None, model_help: str = "") -> Flags:
    """The engine flags of a model-running command; ``model`` None: the command names its models itself."""
    parse = {"base_url": (Optional[list[str]], _base_urls)}
    if model is None:
        return Flags(ENGINE_CONFIG, exclude=("model", "revision"), parse=parse)
    return Flags(ENGINE_CONFIG, defaults={"model": model}, helps={"model": model_help}, parse=parse)


def model_flag(flag: str, model: Ref, help: str) -> Flags:
    """One more model choice of a command (the pipeline's two): an EngineConfig with only ``model``."""
    return Flags(ENGINE_CONFIG, only=("model",), names={"model": flag}, defaults={"model": model}, helps={"model": help})


EXECUTOR = Flags("dataprep.executors:ExecutorConfig")

StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 if any row failed (default: record per-row errors and exit 0).", rich_help_panel="Run")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Caption at most N images.")]
DataOpt = Annotated[Path, typer.Option("--data", help="Extracted DIV2K_train_HR/ (or DIV2K_valid_HR/) folder, or the official zip, read without extracting.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train (ids 0001-0800) or valid (0801-0900).")]
IdsOpt = Annotated[Optional[str], typer.Option("--ids", help="Only these image numbers, e.g. 1-100 or 1,5,9-12.")]


def positive_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} is less than 1", "--limit", "use a positive number, or leave it out")


def progress(label: str):
    """A rich progress bar and the ``progress(done, total)`` callback that drives it."""
    bar = progress_bar(label, None, transient=True)
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def print_stage(summary, strict_failed: bool) -> None:
    """A model stage's summary table; with --strict, exit 1 when ``strict_failed``."""
    from rich.console import Console


    print_summary(summary, Console())
    if strict_failed:
        raise typer.Exit(1)
