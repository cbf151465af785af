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
# (filled in below by the caption section)


# ------------------------------------------------------------ rewrite, check (issue 3)


# ------------------------------------------------------------ batches, export, stats (issue 5)


# ------------------------------------------------------------ pipeline (issue 4)


# ------------------------------------------------------------ server, serve (issue 8)


# ------------------------------------------------------------ tiny models, demo


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        raise SystemExit(_print_config_error(exc))


def _print_config_error(exc: ConfigError) -> int:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
    return 2
