"""Messages that tell the truth: what a user reads when input is odd.

Each test here failed on the code before its fix: a shortage reported as a
partial batch, a refusal that suggested the unsafe flag, brackets eaten by
the console, JSON-quoted strings whose spans no longer lined up, and empty
files reported as anything but empty.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from dataprep.batches import BatchOptions, batch_rows, check_fillable, make_index
from dataprep.check import check_rows, read_records, write_report
from dataprep.cli import app as dataprep_app
from dataprep.errors import ConfigError
from softrepa.cli import app as softrepa_app
from tests.pickles import EvilPickle as _Evil

runner = CliRunner()


# ------------------------------------------------------------ batches


def _index(captions: list[str]):
    return make_index([(f"img/{i:03d}", f"/x/{i}.png", [c]) for i, c in enumerate(captions)], Counter())


def test_too_few_distinct_captions_names_the_real_shortage():
    # 12 images but only 3 distinct captions: a 4x4 grid can never be filled
    index = _index(["a dog on grass", "a red car", "A dog  on grass"] * 4)
    with pytest.raises(ConfigError) as exc:
        check_fillable(index, BatchOptions(preset="sd3"))
    msg = str(exc.value)
    assert "2 distinct captions" in msg and "12 images" in msg and "duplicate" in msg


def test_duplicate_captions_are_counted_as_duplicates_not_as_a_partial_batch():
    # 8 distinct captions for 8 images, plus 4 images that repeat one caption:
    # those cannot share a batch with each other, so they are left over as duplicates
    caps = [f"caption number {i}" for i in range(8)] + ["caption number 0"] * 4
    rows, counts = batch_rows(_index(caps), BatchOptions(preset="custom", images=2, prompts=4, seed=0))
    placed = sum(len(r["image_ids"]) for r in rows)
    assert placed + counts.dropped_images + counts.duplicate_images == len(caps)
    assert counts.duplicate_images >= 1
    assert counts.dropped_images < counts.duplicate_images + counts.dropped_images  # not all blamed on drop_last


def test_batches_cli_prints_duplicates_as_their_own_line(tmp_path):
    from dataprep.store import CAPTIONS_SCHEMA, ShardWriter

    caps = [f"caption number {i}" for i in range(8)] + ["caption number 0"] * 4
    with ShardWriter(tmp_path / "captions", CAPTIONS_SCHEMA, run_id="r") as w:
        for i, c in enumerate(caps):
            w.add({"key": f"k{i}", "image_id": f"img/{i:03d}", "image_uri": f"/x/{i}.png", "caption": c})
    res = runner.invoke(dataprep_app, ["batches", "--captions", str(tmp_path / "captions"), "--out", str(tmp_path / "b"),
                                       "--preset", "custom", "--images", "2", "--prompts", "4"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "duplicate" in res.output


# ------------------------------------------------------------ import-tokens


def test_unsafe_pickle_is_refused_for_safety_without_suggesting_the_unsafe_flag(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"x": _Evil()}, bad / "dc_tokens.pth")
    res = runner.invoke(softrepa_app, ["import-tokens", str(bad), str(tmp_path / "out"), "--backbone", "sd1.5"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert str(bad / "dc_tokens.pth") in out.replace(" ", "") or "dc_tokens.pth" in out
    assert "refused" in out and "safety" in out
    assert "weights_only=False" not in out and "weights_only" not in out.replace("weights_only=True", "")
    assert not (tmp_path / "out").exists()


def test_brackets_in_error_messages_survive_the_console(tmp_path):
    bad = tmp_path / "flat"
    bad.mkdir()
    torch.save(torch.nn.Parameter(torch.zeros(4, 8)), bad / "dc_tokens.pth")  # 2-D: not sd3's shape
    res = runner.invoke(softrepa_app, ["import-tokens", str(bad), str(tmp_path / "out"), "--backbone", "sd3"], env={"COLUMNS": "300"})
    assert res.exit_code == 2, res.output
    assert "[layers, tokens, dim]" in res.output and "[4, 8]" in res.output


# ------------------------------------------------------------ check


def test_check_keeps_mixed_type_string_columns_as_plain_strings(tmp_path):
    src = tmp_path / "pairs.jsonl"
    rows = [
        {"source": "A brown dog sits on the grass.", "target": "A brown fox sits on the grass.", "note": "first"},
        {"source": 42, "target": "A cat.", "note": ["a", "list"]},
        {"source": "A red car on a road.", "target": "A red bus on a road.", "note": 7},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, _ = check_rows(read_records(src), "source", "target")
    out = write_report(report, tmp_path / "r.parquet")
    t = pq.read_table(out).to_pylist()
    assert t[0]["source"] == rows[0]["source"] and t[2]["source"] == rows[2]["source"]  # no JSON quotes
    assert t[0]["note"] == "first"
    for r in (t[0], t[2]):
        (s0, s1), = r["source_spans"][:1]
        assert r["source"][s0:s1].startswith(r["source_span"])
    assert t[1]["error"].startswith("missing_source") and t[1]["source"] == "42"


# ------------------------------------------------------------ empty inputs


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.json", ""), ("w.jsonl", "\n  \n"), ("l.json", "[]"), ("e.parquet", "")])
def test_an_empty_input_file_says_it_is_empty(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ConfigError, match="empty"):
        read_records(p)
    res = runner.invoke(dataprep_app, ["check", str(p)])
    assert res.exit_code == 2 and "empty" in res.output
    res = runner.invoke(dataprep_app, ["rewrite", "--input", str(p), "--out", str(tmp_path / "run"), "--model", "nowhere"])
    assert res.exit_code == 2 and "empty" in res.output
