"""The softrepa command line: configuration errors exit 2 naming the flag, before any work."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from softrepa.cli import app

runner = CliRunner()


def _tokens(folder):
    from softrepa.tokens import SoftTokens, TokenConfig, save_tokens

    save_tokens(SoftTokens(TokenConfig("sd1.5", n_tokens=4, n_layers=1, dim=8, t_dependent=True, apply=("down",))), folder)
    return folder


@pytest.mark.parametrize("command", ["export-tokens", "import-tokens"])
def test_out_dir_that_is_a_file_exits_2_naming_it(tmp_path, command):
    """Before: the writer's NotADirectoryError / FileExistsError, exit 1."""
    ours = _tokens(tmp_path / "ours")
    official = tmp_path / "official"
    assert runner.invoke(app, ["export-tokens", str(ours), str(official)]).exit_code == 0
    target = tmp_path / "file"
    target.write_text("x")
    args = ["export-tokens", str(ours), str(target)] if command == "export-tokens" else ["import-tokens", str(official), str(target), "--backbone", "sd1.5"]
    res = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert res.exit_code == 2, (res.output, res.exception)
    assert "OUT_DIR" in res.output and "Fix:" in res.output


def test_tiny_metrics_are_written_only_after_the_arguments_are_checked(tmp_path):
    """Before: --tiny-metrics built the metric models, then a bad --pairs stopped the run."""
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate-edit", "--pairs", str(tmp_path / "missing"), "--out", str(out), "--tiny-metrics"], env={"COLUMNS": "300"})
    assert res.exit_code == 2, (res.output, res.exception)
    assert "--pairs" in res.output
    assert not (out / "tiny-metrics").exists()


def test_train_flags_are_the_train_config_fields_with_its_defaults():
    from dataclasses import MISSING, fields

    from softrepa.train import TrainConfig

    out = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output.split())
    for f in fields(TrainConfig):
        if f.name in ("progress", "precision"):  # progress: always on here; precision: the hidden alias of --dtype
            continue
        assert "--" + f.name.replace("_", "-") in out, f.name
        if f.default not in (MISSING, None) and not isinstance(f.default, bool):
            assert f"[default: {f.default}]" in out, f.name


def test_precision_is_a_hidden_alias_that_still_reaches_the_config(tmp_path, monkeypatch):
    import softrepa.train as tr

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        raise tr.ConfigError("stopped by the test", "--x")

    monkeypatch.setattr(tr, "train", fake_train)
    assert "--precision" not in runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output
    res = runner.invoke(app, ["train", "--preset", "sd3", "--batches", str(tmp_path), "--model", "m", "--out", str(tmp_path / "o"), "--precision", "bf16"])
    assert res.exit_code == 2 and seen, res.output
    # TrainConfig.precision (bf16) becomes dtype (bfloat16) with the one-vocabulary rename
    assert getattr(seen[0], "dtype", getattr(seen[0], "precision", None)) in ("bf16", "bfloat16")
