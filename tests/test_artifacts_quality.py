"""The Prefect artifact rows for data quality: diversity, judge and dedup counts (pure, no server)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.store import EDITS_SCHEMA, ShardWriter
from flows import artifacts


def test_diversity_rows_from_the_edit_store(tmp_path):
    with ShardWriter(tmp_path / "edits", EDITS_SCHEMA, "r1") as w:
        for n, (s, t, ok) in enumerate([("dog", "cat", True), ("horse", "cat", True), ("cup", "vase", True), ("car", "bus", False)]):
            w.add(dict(image_id=f"i{n}", passed=ok, source_span=s, target_span=t, key=f"k{n}"))
    rows = {r["what"]: r["value"] for r in artifacts.diversity_rows(tmp_path / "edits")}
    assert rows["replacements counted"] == 3
    assert rows["most common target (share)"] == "cat (66.7%)"
    assert rows["pair dog -> cat"] == "1 (33.3%)" and "pair car -> bus" not in rows
    assert artifacts.diversity_rows(tmp_path / "nothing") == []


def test_judge_and_dedup_folders_are_read_generically(tmp_path):
    (tmp_path / "judge").mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"key": "a", "agrees_with_checker": True, "verdict": "good", "error": None},
        {"key": "b", "agrees_with_checker": False, "verdict": "bad", "error": None},
        {"key": "c", "agrees_with_checker": True, "verdict": "good", "error": None},
        {"key": "d", "agrees_with_checker": None, "verdict": None, "error": "parse_error: x"},
    ]), tmp_path / "judge" / "part-r-00000.parquet")
    rows = {r["what"]: r["value"] for r in artifacts.stage_folder_rows(tmp_path / "judge")}
    assert rows["rows"] == 4 and rows["error rows"] == 1
    assert rows["agrees_with_checker true"] == "66.7%" and rows["verdict = good"] == 2
    (tmp_path / "dedup").mkdir()
    pq.write_table(pa.Table.from_pylist([{"image_id": "x", "kind": "image", "cluster": 1}, {"image_id": "y", "kind": "image", "cluster": 1}, {"image_id": "z", "kind": "caption", "cluster": 2}]), tmp_path / "dedup" / "part-r-00000.parquet")
    rows = {r["what"]: r["value"] for r in artifacts.stage_folder_rows(tmp_path / "dedup")}
    assert rows["kind = image"] == 2 and rows["distinct cluster"] == 2
    assert artifacts.stage_folder_rows(tmp_path / "missing") == []
