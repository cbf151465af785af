"""Commands flows adds to the ``dataprep`` command line: ``dataprep serve``.

dataprep imports nothing of flows (the dependency rule that
``tests/test_imports.py`` checks), so this command is registered from here:
``pyproject.toml`` names it in the entry-point group ``dataprep.commands``
and ``dataprep.cli`` adds every command of that group to its app. A command
here must stay cheap to import (every ``dataprep`` start loads this module):
prefect and the flows are imported when the command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep import server
from dataprep.errors import ConfigError


def serve(
    cron: Annotated[str, typer.Option("--cron", help="Schedule of prepare-div2k (cron, 5 fields).")] = "0 2 * * *",
    timezone: Annotated[Optional[str], typer.Option("--timezone", help="IANA time zone of --cron (default UTC).")] = None,
    data: Annotated[str, typer.Option("--data", help="prepare-div2k default: DIV2K_train_HR/ folder or zip.")] = "data/DIV2K_train_HR",
    out: Annotated[str, typer.Option("--out", help="prepare-div2k default: run directory (captions/, edits/, batches/, train/).")] = "runs/div2k",
    limit: Annotated[Optional[int], typer.Option("--limit", help="prepare-div2k default: at most N images.")] = None,
    caption_model: Annotated[Optional[str], typer.Option("--caption-model", help="prepare-div2k default captioner (default LLaVA-1.5-13B).")] = None,
    rewrite_model: Annotated[Optional[str], typer.Option("--rewrite-model", help="prepare-div2k default rewriter (default Llama-3.1-8B-Instruct).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Device for every model (auto, cpu, cuda, cuda:N).")] = None,
    preset: Annotated[str, typer.Option("--preset", help="Batch and training preset: sd3, sdxl or sd1.5.")] = "sd3",
    train_model: Annotated[Optional[str], typer.Option("--train-model", help="Diffusers pipeline the triggered training uses (default: the preset's paper backbone).")] = None,
    train_steps: Annotated[Optional[int], typer.Option("--train-steps", help="Training steps (default: Table 3 of the paper).")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Run evaluate-edit after each training (sd3 only).")] = True,
    home: Annotated[Path, typer.Option("--home", help="Server directory (PREFECT_HOME): SQLite database, log, pid file.", rich_help_panel="Server")] = Path(".prefect"),
    limit_runs: Annotated[Optional[int], typer.Option("--max-runs", help="Flow runs this process executes at once (default: no limit; GPU stages still queue on the 'gpu' slot).")] = None,
) -> None:
    """Serve prepare-div2k (cron), train-on-new-shards (event) and evaluate-edit (event) from this process until Ctrl-C.

    Uses PREFECT_API_URL when set, else the server `dataprep server start --home HOME` runs.
    """
    if not os.environ.get("PREFECT_API_URL"):
        state, ok = server.status(home)
        if not ok:
            raise ConfigError(f"no Prefect server: PREFECT_API_URL is unset and none runs for --home {home}.", "--home",
                              f"`dataprep server start --home {home}` or export PREFECT_API_URL")
        os.environ.update(server.client_env(state))
    # prefect loads here, not at the top: this module is imported by every `dataprep` start
    from flows.deployments import prepare_parameters, serve_all

    engine = {"device": device} if device else None
    train_options = {k: v for k, v in {"model": train_model, "steps": train_steps, "device": device}.items() if v is not None}
    eval_options = ({"device": device} if device else {}) if evaluate else None
    params = prepare_parameters(data, out, limit=limit, caption_model=caption_model, rewrite_model=rewrite_model, engine=engine,
                                preset=preset, train_options=train_options or None, eval_options=eval_options)
    serve_all(cron, timezone, params, limit=limit_runs)  # a ConfigError (bad --cron) exits 2 through run_cli
