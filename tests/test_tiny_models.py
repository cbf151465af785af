"""`dataprep tiny-models` writes dataprep's models and data; `softrepa tiny-models`
adds the SD pipelines and official-format tokens to the same folder (dataprep
imports nothing of softrepa)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import softrepa.tiny
from dataprep.cli import app as dataprep_app
from softrepa.cli import app as softrepa_app


def test_dataprep_tiny_models_writes_only_dataprep_models_and_data(tmp_path):
    res = CliRunner().invoke(dataprep_app, ["tiny-models", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["div2k", "images", "llama", "llava"]
    assert (tmp_path / "llava" / "config.json").exists() and (tmp_path / "div2k" / "prompts_editing.json").exists()


def test_softrepa_tiny_models_adds_pipelines_and_official_tokens(tmp_path, monkeypatch):
    built = []

    def fake_pipelines(root, backbones=softrepa.tiny.BACKBONES):  # building three real ones takes a minute
        built.extend(backbones)
        return {b: Path(root) / b for b in backbones}

    monkeypatch.setattr(softrepa.tiny, "write_tiny_pipelines", fake_pipelines)
    res = CliRunner().invoke(softrepa_app, ["tiny-models", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert built == list(softrepa.tiny.BACKBONES)
    assert sorted(p.name for p in (tmp_path / "official-tokens").iterdir()) == sorted(softrepa.tiny.BACKBONES)
    assert (tmp_path / "official-tokens" / "sd3" / "dc_t_tokens.pth").exists()
    assert all(name in res.output for name in (*softrepa.tiny.BACKBONES, "official-tokens"))
