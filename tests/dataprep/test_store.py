from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from dataprep.store import CAPTIONS_SCHEMA, ShardWriter, compact, content_key, done_keys, read_table, shard_paths, utcnow


def row(key: str, error: str | None = None, caption: str = "c") -> dict:
    return {"image_id": key, "key": key, "caption": caption, "error": error, "created_at": utcnow()}


def test_key_changes_with_model_prompt_sampling_seed():
    base = dict(stage="caption", input_sha256="abc", model="m", model_revision=None, prompt_sha256="p", sampling={"t": 0}, seed=0)
    k = content_key(**base)
    assert content_key(**base) == k
    for change in ({"model": "m2"}, {"model_revision": "r"}, {"prompt_sha256": "q"}, {"sampling": {"t": 1}}, {"seed": 1}, {"input_sha256": "x"}, {"stage": "rewrite"}):
        assert content_key(**(base | change)) != k, change


def test_shards_roll_over_and_leave_no_temp_files(tmp_path):
    with ShardWriter(tmp_path, CAPTIONS_SCHEMA, "run", rows_per_shard=2) as w:
        for i in range(5):
            w.add(row(f"k{i}"))
    assert len(shard_paths(tmp_path)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert read_table(tmp_path, CAPTIONS_SCHEMA).num_rows == 5


def test_unknown_column_is_an_error(tmp_path):
    w = ShardWriter(tmp_path, CAPTIONS_SCHEMA, "run")
    with pytest.raises(KeyError):
        w.add({"key": "a", "captoin": "typo"})


def test_done_keys_only_counts_good_rows(tmp_path):
    with ShardWriter(tmp_path, CAPTIONS_SCHEMA, "run") as w:
        w.add(row("good"))
        w.add(row("bad", error="corrupt_image: x"))
    assert done_keys(tmp_path) == {"good"}


def test_compact_keeps_newest_good_row_per_key(tmp_path):
    with ShardWriter(tmp_path, CAPTIONS_SCHEMA, "20260101T000000-a") as w:
        w.add(row("a", error="generate_error: boom"))
        w.add(row("b", caption="old b"))
        w.add(row("c", error="x: first"))
    with ShardWriter(tmp_path, CAPTIONS_SCHEMA, "20260102T000000-b") as w:
        w.add(row("a", caption="retried a"))
        w.add(row("b", caption="new b"))
        w.add(row("c", error="x: second"))
    assert compact(tmp_path, CAPTIONS_SCHEMA) == 3
    t = read_table(tmp_path, CAPTIONS_SCHEMA).to_pylist()
    by_key = {r["key"]: r for r in t}
    assert len(t) == 3
    assert by_key["a"]["caption"] == "retried a" and by_key["a"]["error"] is None
    assert by_key["b"]["caption"] == "new b"
    assert by_key["c"]["error"] == "x: second"
    # the first run's shard lost every row and is gone; nothing to do a second time
    assert len(shard_paths(tmp_path)) == 1
    assert compact(tmp_path, CAPTIONS_SCHEMA) == 0
    assert pq.read_schema(shard_paths(tmp_path)[0]).equals(CAPTIONS_SCHEMA, check_metadata=False)


# ---------------------------------------------------------------- one usable-row decision


EDIT_CASES = [
    ({"error": None, "passed": True, "source": "a red cat", "target": "a red dog"}, None, None),
    ({"error": "timeout: x", "passed": True, "source": "a red cat", "target": "a red dog"}, "edit_error_rows", "edit_error_rows"),
    ({"error": None, "passed": False, "source": "a red cat", "target": "a red dog"}, "edit_failed_rows", None),
    ({"error": None, "passed": None, "source": "a red cat", "target": "a red dog"}, "edit_failed_rows", None),
    ({"error": None, "passed": True, "source": "a red cat", "target": "  "}, "edit_empty_rows", "edit_empty_rows"),
    ({"error": None, "passed": True, "source": None, "target": "a red dog"}, "edit_empty_rows", "edit_empty_rows"),
]


@pytest.mark.parametrize("row, strict, lenient", EDIT_CASES)
def test_edit_skip_is_keep_or_a_reason_of_the_vocabulary(row, strict, lenient):
    from dataprep.errors import Reason
    from dataprep.store import edit_skip

    assert edit_skip(row) == strict and edit_skip(row, require_passed=False) == lenient
    assert all(r is None or isinstance(r, Reason) for r in (edit_skip(row), edit_skip(row, require_passed=False)))


def test_the_column_wise_caption_decision_agrees_with_the_row_one():
    import pyarrow as pa

    from dataprep.store import caption_skip, caption_skips

    rows = [{"error": None, "caption": "a cat"}, {"error": "x: y", "caption": "a cat"}, {"error": None, "caption": " \n"},
            {"error": None, "caption": None}, {"error": "x: y", "caption": None}]
    column = caption_skips(pa.Table.from_pylist(rows)).to_pylist()
    assert column == [None if caption_skip(r) is None else caption_skip(r).value for r in rows]
    assert column == [None, "caption_error_rows", "caption_empty_rows", "caption_empty_rows", "caption_error_rows"]


def test_store_imports_without_pyarrow_until_a_name_needs_it():
    import subprocess
    import sys

    code = "import sys; from dataprep.store import atomic_write_text, edit_skip, Manifest, stage_lock; assert 'pyarrow' not in sys.modules; from dataprep.store import EDITS_SCHEMA; assert 'pyarrow' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
