"""`dataprep stats`: counts of a run dir, per stage, in one table."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from PIL import Image
from rich.console import Console

from dataprep import stats
from dataprep.batches import BatchOptions, build_batches
from dataprep.export import export_softrepa
from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, ShardWriter

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def make_run(root: Path) -> None:
    img = root / "img.png"
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(img)
    with ShardWriter(root / "captions", CAPTIONS_SCHEMA, "r1", rows_per_shard=5) as w:
        for i in range(12):
            w.add(dict(image_id=f"img/{i}", image_uri=str(img), caption=f"A photo of thing {i}.", key=f"c{i}", created_at=T0))
        w.add(dict(image_id="img/12", key="e1", error="decode: truncated", created_at=T0))
        w.add(dict(image_id="img/13", key="e2", error="decode: truncated", created_at=T0))
        w.add(dict(image_id="img/14", key="e3", error="too_large: 1e9 pixels", created_at=T0))
    with ShardWriter(root / "edits", EDITS_SCHEMA, "r1", rows_per_shard=4) as w:
        for i in range(12):
            ok = i % 3 != 0
            viol = [] if ok else (["color_change", "multiple_concepts"] if i % 2 else ["color_change"])
            w.add(dict(image_id=f"img/{i}", image_uri=str(img), source=f"A photo of thing {i}.", target=f"A photo of item {i}.", passed=ok, violations=viol, key=f"k{i}", created_at=T0))
        w.add(dict(image_id="img/0", key="kx", error="engine: timeout", created_at=T0))


def test_collect_counts_every_stage(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    build_batches(run / "captions", run / "batches", BatchOptions(preset="sd1.5", epochs=2), edits_dir=run / "edits")
    export_softrepa(run, tmp_path / "export")
    s = stats.collect(run)
    assert "images" not in s  # no stage writes an images table (its schema is gone)
    assert s["captions"] == {"rows": 15, "good": 12, "failed": 3, "images": 15, "images_captioned": 12, "images_without_caption": 3, "failures": {"decode": 2, "too_large": 1}}
    e = s["edits"]
    assert (e["rows"], e["errors"], e["checked"], e["passed"]) == (13, 1, 12, 8)
    assert abs(e["pass_rate"] - 8 / 12) < 1e-9 and e["images_with_passing_edit"] == 8
    assert e["violations"] == {"color_change": 4, "multiple_concepts": 2}
    b = s["batches"]
    assert b["rows"] == 6 and b["presets"] == {"sd1.5": 6} and b["epochs"] == 2
    assert b["prompts"]["positive"] == 24 and sum(b["prompts"].values()) == 6 * 8
    (run_id, info), = b["runs"].items()
    assert info["preset"] == "sd1.5" and info["epochs"] == 2
    assert [(x["kind"], x["pairs"], x["exists"]) for x in s["exports"]] == [("softrepa", 8, True)]
    console = Console(record=True, width=200)
    console.print(stats.render(s))
    text = console.export_text()
    for word in ("captions", "edits", "batches", "exports", "66.7%", "violation color_change", run_id):
        assert word in text


def test_empty_run_dir(tmp_path):
    s = stats.collect(tmp_path)
    assert s["captions"] is None and s["edits"] is None and s["batches"] is None and s["exports"] == []
    console = Console(record=True, width=120)
    console.print(stats.render(s))
    assert "none" in console.export_text()


def test_cli_batches_export_stats(tmp_path):
    """The README demo lines: batches, export softrepa/piebench, stats, through the CLI."""
    import json

    from typer.testing import CliRunner

    from dataprep.cli import app

    run = tmp_path / "run"
    make_run(run)
    cli = CliRunner()
    r = cli.invoke(app, ["batches", "--preset", "sd1.5", "--captions", str(run / "captions"), "--edits", str(run / "edits"), "--out", str(run / "batches"), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert len(list((run / "batches").glob("part-*.parquet"))) == 1
    for kind in ("softrepa", "piebench"):
        r = cli.invoke(app, ["export", kind, str(run / "exports" / kind), "--run", str(run)])
        assert r.exit_code == 0, r.output
    assert len(json.loads((run / "exports" / "softrepa" / "prompts_editing.json").read_text())) == 8
    r = cli.invoke(app, ["stats", str(run), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["batches"]["rows"] == 6
    r = cli.invoke(app, ["batches", "--preset", "sd1.5", "--hard-negatives", "9", "--captions", str(run / "captions"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--hard-negatives" in r.output and not (tmp_path / "b").exists()
