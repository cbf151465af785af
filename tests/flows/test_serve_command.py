"""`dataprep serve` is a flows command that reaches dataprep's CLI through the
entry-point group ``dataprep.commands``: dataprep imports nothing of flows."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from dataprep.cli import app
from dataprep.errors import run_cli
from dataprep.runtime import plugin_commands
from flows.commands import serve


def test_serve_is_added_to_dataprep_from_the_entry_point_group():
    group = typer.main.get_command(app)
    assert "serve" in group.list_commands(None), "reinstall the package (pip install -e .) so its metadata has the dataprep.commands group"
    assert group.get_command(None, "serve") is not None
    assert plugin_commands("dataprep.commands")["serve"] is serve


def test_a_group_nobody_fills_adds_nothing():
    assert plugin_commands("dataprep.no-such-group") == {}


def test_serve_without_a_server_is_a_config_error_naming_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_cli(app, "dataprep", ["serve", "--home", str(tmp_path / "home")])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no Prefect server" in err and "dataprep server start --home" in err


def test_dataprep_help_lists_serve_without_importing_prefect():
    code = ("import sys; from typer.testing import CliRunner; from dataprep.cli import app; "
            "out = CliRunner().invoke(app, ['--help'], env={'COLUMNS': '200'}).output; "
            "assert 'serve' in out, out; "
            "assert 'prefect' not in sys.modules and 'flows.deployments' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_listing_the_commands_looks_plugins_up(monkeypatch):
    # the lookup reads package metadata (importlib.metadata, ~20 ms of start-up):
    # `dataprep --help` needs it, a command of dataprep's own does not
    from typer.testing import CliRunner

    from dataprep import runtime

    calls: list[str] = []
    monkeypatch.setattr(runtime, "plugin_commands", lambda group: calls.append(group) or {})
    assert CliRunner().invoke(app, ["check", "--help"]).exit_code == 0
    assert calls == []
    assert CliRunner().invoke(app, ["--help"]).exit_code == 0
    assert calls == ["dataprep.commands"]
