"""The Prefect artifact rows for replacement diversity (pure, no server); judge and dedup rows are tested in test_flows."""

from __future__ import annotations

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
