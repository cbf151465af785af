"""The `dataprep` command line: parse flags, call the library, print summaries.

One module per command group (``caption``: caption and pipeline; ``rewrite``:
check, rewrite, judge; ``data``: batches, dedup, export, stats, report;
``server``: server, tiny-models); ``common`` holds the app and the
flag groups. ``dataprep serve`` belongs to flows: dataprep imports nothing
of flows, so flows names it in the entry-point group ``dataprep.commands``
(pyproject.toml) and :func:`dataprep.runtime.add_plugin_commands` adds it here. Flags of a stage's settings come from its config dataclass
(:mod:`dataprep.runtime`, "command-line flags from config dataclasses").
Heavy libraries (torch, transformers, datasets, pyarrow) are imported inside
the commands, never at module level, so ``dataprep --help`` starts fast.
Exit status: 0 when a run completed (per-row errors are recorded, not fatal),
1 with ``--strict`` when any row failed, 2 for usage or configuration errors.
Any other failure prints one line and exits 1 (``--debug`` or DATAPREP_DEBUG=1
shows the traceback); see :mod:`dataprep.errors`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dataprep.cli import caption, data, rewrite, server  # noqa: F401  (registers the commands)
from dataprep.cli.common import app
from dataprep.errors import run_cli

__all__ = ["app", "main"]


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="On a failure, show the full traceback instead of one line (also DATAPREP_DEBUG=1). Accepted anywhere on the command line.")] = False,
) -> None:
    # `main` takes --debug off the command line before typer parses it (so it
    # works after a subcommand too); this declaration puts it in --help.
    del debug



def main() -> None:
    """Entry point: exit 0 / 1 / 2 as :mod:`dataprep.errors` describes; --debug shows tracebacks."""
    run_cli(app, "dataprep")
