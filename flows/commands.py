"""Commands flows adds to the ``dataprep`` and ``softrepa`` command lines: ``dataprep serve``, ``softrepa recipe``.

dataprep and softrepa import nothing of flows (the dependency rule that
``tests/test_imports.py`` checks), so these commands are registered from here:
``pyproject.toml`` names them in the entry-point groups ``dataprep.commands``
and ``softrepa.commands``, and each command line adds its group's commands
(:func:`dataprep.runtime.add_plugin_commands`). A command here must stay
cheap to import (every ``dataprep`` and ``softrepa`` start loads this module):
prefect and the flows are imported when the command runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.errors import ConfigError
from dataprep.runtime import Flags, with_config
from flows.defaults import DEFAULT_DATA, DEFAULT_OUT, NIGHTLY


def serve(
    cron: Annotated[str, typer.Option("--cron", help="Schedule of prepare-div2k (cron, 5 fields).")] = NIGHTLY,
    timezone: Annotated[Optional[str], typer.Option("--timezone", help="IANA time zone of --cron (default UTC).")] = None,
    data: Annotated[str, typer.Option("--data", help="prepare-div2k default: DIV2K_train_HR/ folder or zip.")] = DEFAULT_DATA,
    out: Annotated[str, typer.Option("--out", help="prepare-div2k default: run directory (captions/, edits/, batches/, train/).")] = DEFAULT_OUT,
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
    from dataprep import server

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


@with_config(cfg=Flags("flows.recipe:RecipeConfig", parse={name: (Path, str) for name in ("coco_captions", "coco_images", "pairs", "out")} | {"hard_negatives": (Optional[Path], str)}))
def recipe(
    train_steps: Annotated[Optional[int], typer.Option("--train-steps", help="Training steps (default: the trainer's Table 3 value).")] = None,
    options: Annotated[Optional[Path], typer.Option("--options", help='JSON file {"batch_options": {...}, "train_options": {...}, "eval_options": {...}} with BatchOptions / TrainConfig / EvalConfig fields (eval_options.metrics: MetricConfig fields).')] = None,
    cfg=None,
) -> None:
    """The paper's recipe in one command: COCO batches -> train SD3 tokens -> FlowEdit on DIV2K pairs, Table 5 with the paper's numbers beside ours."""
    # prefect loads here, not at the top: this module is imported by every `softrepa` start
    from flows.recipe import run_recipe

    extra: dict = {}
    if options is not None:
        try:
            extra = json.loads(options.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {options}: {exc}", "--options", "pass a JSON object") from None
        unknown = sorted(set(extra) - {"batch_options", "train_options", "eval_options"})
        if unknown:
            raise ConfigError(f"unknown keys {unknown} in {options}", "--options", "use batch_options, train_options, eval_options")
    train_options = dict(extra.get("train_options", {}))
    if train_steps is not None:
        train_options["steps"] = train_steps
    cfg = replace(cfg, batch_options=dict(extra.get("batch_options", {})), train_options=train_options, eval_options=dict(extra.get("eval_options", {})))
    res = run_recipe(cfg, on_stage=lambda msg: typer.echo(f"== {msg}"))
    typer.echo(res.markdown)
    typer.echo(f"tokens: {res.train.tokens_dir}\nscores: {res.evaluation.scores_path}\ntable: {res.table_md}")
