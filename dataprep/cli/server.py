"""``dataprep server``, ``dataprep serve`` (the Prefect deployments) and ``dataprep tiny-models``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from dataprep.cli.common import app
from dataprep.runtime import config_command, config_exit

server_app = typer.Typer(help="A local Prefect server (127.0.0.1, SQLite under --home, telemetry off) for the flows. For a team or cluster server set PREFECT_API_URL instead.", no_args_is_help=True)
app.add_typer(server_app, name="server")
HomeOpt = Annotated[Path, typer.Option("--home", help="Server directory (PREFECT_HOME): SQLite database, log, pid file.", rich_help_panel="Server")]
PortOpt = Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.", rich_help_panel="Server")]


@config_command(server_app, "start")
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
    except RuntimeError as exc:
        raise config_exit(str(exc))
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


@config_command(app, "serve")
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
    home: HomeOpt = Path(".prefect"),
    limit_runs: Annotated[Optional[int], typer.Option("--max-runs", help="Flow runs this process executes at once (default: no limit; GPU stages still queue on the 'gpu' slot).")] = None,
) -> None:
    """Serve prepare-div2k (cron), train-on-new-shards (event) and evaluate-edit (event) from this process until Ctrl-C.

    Uses PREFECT_API_URL when set, else the server `dataprep server start --home HOME` runs.
    """
    from dataprep import server

    if not os.environ.get("PREFECT_API_URL"):
        state, ok = server.status(home)
        if not ok:
            raise config_exit(f"no Prefect server: PREFECT_API_URL is unset and none runs for --home {home}. Fix: `dataprep server start --home {home}` or export PREFECT_API_URL")
        os.environ.update(server.client_env(state))
    from flows.deployments import prepare_parameters, serve_all

    engine = {"device": device} if device else None
    train_options = {k: v for k, v in {"model": train_model, "steps": train_steps, "device": device}.items() if v is not None}
    eval_options = ({"device": device} if device else {}) if evaluate else None
    params = prepare_parameters(data, out, limit=limit, caption_model=caption_model, rewrite_model=rewrite_model, engine=engine, preset=preset, train_options=train_options or None, eval_options=eval_options)
    serve_all(cron, timezone, params, limit=limit_runs)


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
        console.print(f"{name:8s} {path}", highlight=False, markup=False)
