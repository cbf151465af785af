"""`dataprep check`: pairs from any file format, report in input order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dataprep.check import check_rows, pick_columns, read_records, write_report
from dataprep.cli import app
from dataprep.errors import ConfigError

PAIRS = [
    {"id": "a", "source": "A dog on the grass.", "target": "A fox on the grass.", "note": 1},
    {"id": "b", "source": "A red car.", "target": "A blue car.", "note": 2},
    {"id": "c", "source": "A cat sits on a mat.", "target": "An owl sits on a mat.", "note": 3},
    {"id": "d", "source": "A dog and a cat.", "target": "A fox and an owl.", "note": 4},
]


def write_all_formats(tmp_path: Path) -> dict[str, Path]:
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    js = tmp_path / "pairs.json"
    js.write_text(json.dumps(PAIRS))
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), parquet)
    folder = tmp_path / "edits"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(PAIRS[:2]), folder / "part-1-00000.parquet")
    pq.write_table(pa.Table.from_pylist(PAIRS[2:]), folder / "part-1-00001.parquet")
    return {"jsonl": jsonl, "json": js, "parquet": parquet, "folder": folder}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "folder"])
def test_every_format_gives_the_same_report_in_input_order(tmp_path, fmt):
    path = write_all_formats(tmp_path)[fmt]
    rows = read_records(path)
    report, summary = check_rows(rows, *pick_columns(rows))
    assert [r["id"] for r in report] == ["a", "b", "c", "d"]
    assert [r["note"] for r in report] == [1, 2, 3, 4]  # other columns carried through
    assert [r["passed"] for r in report] == [True, False, True, False]
    assert report[1]["violations"] == ["color_change"] and report[3]["violations"] == ["multiple_concepts"]
    assert (report[2]["source_span"], report[2]["target_span"]) == ("cat", "owl")
    s0, s1 = report[0]["source_spans"][0]
    assert PAIRS[0]["source"][s0:s1] == "dog"
    assert (summary.total, summary.passed, summary.by_rule["color_change"]) == (4, 2, 1)


def test_softrepa_reference_pairs_both_fail(editing_pairs):
    rows = read_records(editing_pairs)
    assert pick_columns(rows) == ("prompt", "tgt_prompt")
    report, summary = check_rows(rows, "prompt", "tgt_prompt")
    assert summary.passed == 0 and summary.checked == 2
    assert summary.by_rule["color_change"] == 2 and summary.by_rule["multiple_concepts"] == 2
    assert [r["img_path"] for r in report] == ["0001.png", "0002.png"]


def test_bad_rows_are_recorded_and_the_rest_checked(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(
        json.dumps(PAIRS[0]) + "\n{not json\n" + json.dumps({"source": "A dog.", "target": None}) + "\n[1, 2]\n" + json.dumps(PAIRS[1]) + "\n"
    )
    rows = read_records(p)
    report, summary = check_rows(rows, *pick_columns(rows))
    assert len(report) == 5
    assert [r["error"].split(":")[0] if r["error"] else None for r in report] == [None, "bad_json", "missing_target", "bad_json", None]
    assert [r["passed"] for r in report] == [True, False, False, False, False]
    assert summary.checked == 2 and summary.passed == 1 and sum(summary.errors.values()) == 3


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_report_round_trips_by_extension(tmp_path, suffix):
    rows = read_records(write_all_formats(tmp_path)["jsonl"])
    report, _ = check_rows(rows, "source", "target")
    out = write_report(report, tmp_path / f"report{suffix}")
    back = read_records(out)
    assert [r["id"] for r in back] == ["a", "b", "c", "d"]
    assert back[1]["violations"] == ["color_change"] and back[0]["violations"] == []
    assert back[0]["source_spans"] == report[0]["source_spans"]
    assert not list(tmp_path.glob(".report*"))  # the temp file was renamed away


def test_rechecking_an_edits_store_replaces_its_verdict_columns(tmp_path):
    stale = [dict(PAIRS[1], passed=True, violations=[], source_span="x", target_span="y")]
    rows = read_records(_write_jsonl(tmp_path / "e.jsonl", stale))
    report, _ = check_rows(rows, "source", "target")
    assert report[0]["passed"] is False and report[0]["violations"] == ["color_change"]
    assert report[0]["source_span"] == "red"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_configuration_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--source-column"):
        pick_columns([{"caption": "x", "edit": "y"}])
    with pytest.raises(ConfigError, match="--target-column"):
        pick_columns([{"caption": "x", "edit": "y"}], "caption", "nope")
    assert pick_columns([{"caption": "x", "edit": "y"}], "caption", "edit") == ("caption", "edit")
    with pytest.raises(ConfigError, match="not found"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="unknown file type"):
        read_records(tmp_path / "x.csv")
    (tmp_path / "d.json").write_text('{"a": 1, "b": 2}')
    with pytest.raises(ConfigError, match="not a list"):
        read_records(tmp_path / "d.json")


def test_cli_reports_zero_of_two_on_the_softrepa_pairs(tmp_path, editing_pairs):
    REFERENCE = editing_pairs
    runner = CliRunner()
    res = runner.invoke(app, ["check", str(REFERENCE), "--out", str(tmp_path / "r.parquet")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "passed: 0 of 2" in res.output
    assert "color_change" in res.output and "multiple_concepts" in res.output
    assert "0001.png" in res.output  # failing rows named by their img_path
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 2
    strict = runner.invoke(app, ["check", str(REFERENCE), "--strict"])
    assert strict.exit_code == 1
    bad = runner.invoke(app, ["check", str(REFERENCE), "--out", str(tmp_path / "r.csv")])
    assert bad.exit_code == 2 and "--out" in bad.output
