"""The command line: help text, exit codes, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dataprep.cli import app

runner = CliRunner()


def test_top_level_help_does_not_import_heavy_libraries():
    code = "import sys; from dataprep.cli import app; heavy = [m for m in ('torch', 'transformers', 'datasets', 'diffusers', 'prefect', 'vllm') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize(
    "args,flags",
    [
        (["caption", "--help"], ["div2k", "folder", "hf"]),
        (["caption", "div2k", "--help"], ["--data", "--split", "--ids", "--limit", "--model", "--engine", "--quantize", "--batch-size", "--device", "--dtype", "--temperature", "--seed", "--max-new-tokens", "--prompt-file", "--crop", "--max-pixels", "--force", "--strict", "--rows-per-shard", "--workers"]),
        (["caption", "hf", "--help"], ["--image-column", "--split"]),
    ],
)
def test_help_explains_every_flag(args, flags):
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in flags:
        assert flag in result.output, flag


def test_bad_configuration_exits_2_naming_flag_and_fix(tmp_path):
    result = runner.invoke(app, ["caption", "div2k", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "--data" in result.output and "Fix:" in result.output
    result = runner.invoke(app, ["caption", "folder", str(tmp_path), "--model", "x", "--batch-size", "zero"])
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_strict_exits_1_on_row_errors_and_0_without(tmp_path, tiny_models):
    from tests.images_factory import bad_images, good_images

    good_images(tmp_path / "imgs")
    base = ["caption", "folder", str(tmp_path / "imgs"), "--model", str(tiny_models / "llava"), "--max-new-tokens", "4", "--workers", "0"]
    ok = runner.invoke(app, base + ["--out", str(tmp_path / "a"), "--strict"])
    assert ok.exit_code == 0, ok.output
    bad_images(tmp_path / "imgs" / "bad")
    lenient = runner.invoke(app, base + ["--out", str(tmp_path / "b")])
    assert lenient.exit_code == 0 and "too_large" in lenient.output
    strict = runner.invoke(app, base + ["--out", str(tmp_path / "c"), "--strict"])
    assert strict.exit_code == 1


def test_every_caption_option_is_a_flag_with_the_dataclass_default():
    """The flags are the CaptionOptions fields: a new field is a new flag, its default shown once."""
    from dataclasses import fields

    from dataprep.caption import CaptionOptions

    out = " ".join(runner.invoke(app, ["caption", "folder", "--help"], env={"COLUMNS": "400"}).output.split())
    for f in fields(CaptionOptions):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
    assert f"[default: {CaptionOptions().max_new_tokens}]" in out


def test_report_out_that_is_a_file_exits_2_naming_out(tmp_path):
    """Before: the writer's FileExistsError, exit 1 with a one-line traceback summary."""
    import shutil
    from pathlib import Path

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parents[1] / "fixtures" / "stored_run" / "run", run)
    target = tmp_path / "report.html"
    target.write_text("not a folder")
    result = runner.invoke(app, ["report", str(run), "--out", str(target), "--no-thumbs"], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "Fix:" in result.output


def test_tiny_models_still_takes_no_diffusers(tmp_path, monkeypatch):
    """Scripts written before the SD pipelines moved to `softrepa tiny-models` pass --no-diffusers,
    which is now what the command always does. Before: 'No such option: --no-diffusers', exit 2."""
    import dataprep.tiny

    monkeypatch.setattr(dataprep.tiny, "write_all", lambda out: {"llava": tmp_path / "llava"})
    result = runner.invoke(app, ["tiny-models", str(tmp_path), "--no-diffusers"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "llava" in result.output
    assert "--no-diffusers" not in runner.invoke(app, ["tiny-models", "--help"], env={"COLUMNS": "200"}).output  # hidden


def test_flags_only_still_honours_exclude():
    """``Flags(only=..., exclude=...)`` dropped ``exclude`` silently: a command listing its
    fields in order could not also leave one out."""
    from dataclasses import dataclass

    from dataprep.runtime import Flags, option

    @dataclass
    class Opts:
        a: int = option(1, "a")
        b: int = option(2, "b")
        c: int = option(3, "c")

    assert [f.name for f in Flags(Opts, only=("c", "a", "b"), exclude=("b",)).fields()] == ["c", "a"]
    assert [f.name for f in Flags(Opts, exclude=("a",)).fields()] == ["b", "c"]
