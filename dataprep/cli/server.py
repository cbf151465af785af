"""``dataprep server`` (a local Prefect server for the flows) and ``dataprep tiny-models``; ``dataprep serve`` is flows' (see :mod:`dataprep.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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


# ------------------------------------------------------------ tiny models, demo


@app.command("tiny-models")
def tiny_models(
    out: Annotated[Path, typer.Argument(help="Directory to write into; one from_pretrained directory per model.")],
    no_diffusers: Annotated[bool, typer.Option("--no-diffusers", hidden=True, help="Accepted for scripts written when this command also wrote the SD pipelines; it now never does.")] = False,
) -> None:
    """Write tiny random LLaVA and Llama checkpoints, small test images and DIV2K-shaped frames for offline tests and the demo (`softrepa tiny-models` adds the SD pipelines)."""
    from rich.console import Console

    from dataprep.tiny import write_all

    del no_diffusers  # what the command always does now
    written = write_all(out)
    console = Console()
    for name, path in written.items():
        console.print(f"{name:8s} {path}", highlight=False, markup=False)
