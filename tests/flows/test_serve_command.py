"""`dataprep serve` is a flows command that reaches dataprep's CLI through the
entry-point group ``dataprep.commands``: dataprep imports nothing of flows."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from dataprep.cli import add_plugin_commands, app
from dataprep.errors import run_cli
from flows.commands import serve


def test_serve_is_added_to_dataprep_from_the_entry_point_group():
    registered = {c.name: c.callback for c in app.registered_commands}
    assert registered.get("serve") is serve, "reinstall the package (pip install -e .) so its metadata has the dataprep.commands group"


def test_a_group_nobody_fills_adds_nothing():
    target = typer.Typer()
    assert add_plugin_commands(target, group="dataprep.no-such-group") == []
    assert target.registered_commands == []


def test_serve_without_a_server_is_a_config_error_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(app, "dataprep", ["serve", "--home", str(tmp_path / "home")])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no Prefect server" in err and "dataprep server start --home" in err


def test_dataprep_help_lists_serve_without_importing_prefect():
    code = ("import sys; from dataprep.cli import app; "
            "assert 'serve' in [c.name for c in app.registered_commands]; "
            "assert 'prefect' not in sys.modules and 'flows.deployments' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
