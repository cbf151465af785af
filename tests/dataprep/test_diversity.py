"""Replacement diversity (rule 3 of prompts/edit.txt): the pure counts, `check` and `stats` showing them."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from dataprep import diversity, stats
from dataprep.store import EDITS_SCHEMA, ShardWriter

PAIRS = [
    ("A dog sits on a bench.", "A cat sits on a bench."),
    ("Two dogs play. The dogs run.", "Two cats play. The cats run."),
    ("A horse grazes in a field.", "A cat grazes in a field."),
    ("A cup sits on a desk.", "A vase sits on a desk."),
    ("A red car is parked.", "A blue car is parked."),  # fails the checker: not counted
]


def test_concept_folds_case_plural_possessive_and_determiners():
    assert diversity.concept("Dogs") == "dog"
    assert diversity.concept("the fox's") == "fox"
    assert diversity.concept("an owl") == "owl"
    assert diversity.concept("pair of glasses") == "pair of glass"
    assert diversity.concept(None) is None and diversity.concept("  ") is None


def test_summary_top_pairs_top_target_share_and_entropy():
    d = diversity.Diversity()
    for s, t in [("dog", "cat"), ("dogs", "cats"), ("horse", "cat"), ("cup", "vase")]:
        d.add(s, t)
    assert d.add(None, "cat") is None  # not a replacement: not counted
    s = d.summary()
    assert s["replacements"] == 4 and s["distinct_targets"] == 2 and s["distinct_pairs"] == 3
    assert (s["top_target"], s["top_target_share"]) == ("cat", 0.75)
    assert math.isclose(s["target_entropy_bits"], -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)), abs_tol=1e-4)
    assert math.isclose(s["pair_entropy_bits"], 1.5, abs_tol=1e-4)  # 1/2, 1/4, 1/4
    assert s["top_pairs"][0] == {"source": "dog", "target": "cat", "edits": 2, "share": 0.5}
    assert diversity.Diversity().summary()["top_target"] is None
    one = diversity.Diversity()
    one.add("dog", "cat")
    assert one.summary()["target_entropy_bits"] == 0.0 and "-" not in diversity.table_rows(one.summary())[3]["value"]


def test_from_rows_counts_only_passing_checked_rows():
    rows = [
        {"passed": True, "error": None, "source_span": "dog", "target_span": "cat"},
        {"passed": False, "error": None, "source_span": "dog", "target_span": "owl"},
        {"passed": True, "error": "engine: timeout", "source_span": "dog", "target_span": "owl"},
    ]
    assert diversity.from_rows(rows).targets == {"cat": 1}


def test_check_cli_prints_the_diversity_table(tmp_path):
    from dataprep.cli import app

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in PAIRS))
    res = CliRunner().invoke(app, ["check", str(path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "diversity" in res.output
    assert "most common target (share)" in res.output and "cat (75.0%)" in res.output
    assert "pair dog -> cat" in res.output


def test_stats_shows_the_diversity_of_the_edit_store(tmp_path):
    from rich.console import Console

    run = tmp_path / "run"
    with ShardWriter(run / "edits", EDITS_SCHEMA, "r1") as w:
        for n, (src, tgt, ok) in enumerate([("dog", "cat", True), ("dogs", "cats", True), ("horse", "cat", True), ("cup", "vase", True), ("car", "truck", False)]):
            w.add(dict(image_id=f"i{n}", source=f"A {src}.", target=f"A {tgt}.", passed=ok, violations=[], source_span=src, target_span=tgt, key=f"k{n}"))
    s = stats.collect(run)
    assert s["diversity"]["replacements"] == 4 and s["diversity"]["top_target"] == "cat"
    console = Console(record=True, width=200)
    console.print(stats.render(s))
    text = console.export_text()
    assert "diversity" in text and "cat (75.0%)" in text and "pair dog -> cat" in text
    assert stats.collect(tmp_path / "empty")["diversity"] is None
