"""Shards of a stage folder: writing, reading, the resume index and compaction.

A stage folder holds ``part-<run>-<nnnnn>.parquet`` shards of one schema
(:mod:`dataprep.store.schemas`). The rules that make reruns safe:

- A shard is written to a hidden temp name and renamed
  (:func:`~dataprep.store.atomic.write_table_atomic`), so a killed run loses
  at most the shard in flight and never leaves a half-written file.
- Generated rows carry a content ``key`` (:func:`~dataprep.store.keys.content_key`).
  A rerun skips keys that already have a good row (``error`` is null) and
  retries the rest (:func:`done_keys`).
- :func:`compact` keeps one row per key (the newest good row, else the newest
  error row) so a retried or recomputed row never appears twice.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.errors import Reason, failure, reason_of
from dataprep.store.atomic import write_table_atomic


def shard_paths(folder: Path | str) -> list[Path]:
    """Finished shards in write order (hidden temp files are never listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("part-*.parquet") if not p.name.startswith("."))


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table of ``schema``; a row that does not fit never sinks the others.

    The fast path converts all rows at once. When that fails (a number where a
    caption belongs, a list in a text column), each row is converted alone and
    a row that still fails is coerced: a value that does not fit its column
    becomes null (a required string column gets ``str(value)``), and when the
    schema has an ``error`` column the row becomes an error row
    (``bad_type: column 'caption' got int``) unless it already was one.
    """
    try:
        return pa.Table.from_pydict({name: [r.get(name) for r in rows] for name in schema.names}, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        pass
    return pa.Table.from_pylist([_fit_row(r, schema) for r in rows], schema=schema)


def _fits(value: Any, type_: pa.DataType) -> bool:
    try:
        pa.array([value], type=type_)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return False


def _fit_row(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bad: list[str] = []
    for f in schema:
        value = row.get(f.name)
        if value is None or _fits(value, f.type):
            out[f.name] = value
            continue
        bad.append(f"column {f.name!r} got {type(value).__name__}")
        out[f.name] = str(value) if not f.nullable and pa.types.is_string(f.type) else None
    if bad and "error" in schema.names and out.get("error") is None:
        out["error"] = failure(Reason.BAD_TYPE, "; ".join(bad))
        if "finish_reason" in schema.names:
            out["finish_reason"] = "error"
    return out


class ShardWriter:
    """Buffers rows and writes a shard every ``rows_per_shard`` rows.

    Rows are dicts with the schema's columns; missing columns become null,
    unknown ones are an error (a typo must not silently drop data). A value
    of the wrong type makes its row an error row (see :func:`rows_to_table`)
    instead of failing the whole shard.
    """

    def __init__(self, folder: Path | str, schema: pa.Schema, run_id: str, rows_per_shard: int = 256):
        if rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")
        self.folder = Path(folder)
        self.schema = schema
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self._buffer: list[dict[str, Any]] = []
        self._index = 0
        self.written: list[Path] = []
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(self.schema.names)
        if unknown:
            raise KeyError(f"columns not in schema: {sorted(unknown)}")
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> Path | None:
        if not self._buffer:
            return None
        table = rows_to_table(self._buffer, self.schema)
        while True:  # a shard name is never reused, even across runs with the same id
            path = self.folder / f"part-{self.run_id}-{self._index:05d}.parquet"
            self._index += 1
            if not path.exists():
                break
        write_table_atomic(table, path)
        self._buffer.clear()
        self.written.append(path)
        return path

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        # Flush on error too: finished rows are kept, the failure is the caller's.
        self.close()


def read_table(folder: Path | str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """All shards of a stage folder as one table (empty table if none)."""
    paths = shard_paths(folder)
    if not paths:
        empty = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        return empty.empty_table()
    tables = [pq.read_table(p, columns=columns, schema=schema) for p in paths]
    return pa.concat_tables(tables)


def iter_rows(folder: Path | str, schema: pa.Schema, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stream rows shard by shard (bounded memory for large stores)."""
    for path in shard_paths(folder):
        for batch in pq.ParquetFile(path).iter_batches(columns=columns):
            yield from batch.to_pylist()


def done_keys(folder: Path | str) -> set[str]:
    """Keys that already have a good row (error is null)."""
    done: set[str] = set()
    for path in shard_paths(folder):
        t = pq.read_table(path, columns=["key", "error"])
        keys = t.column("key").to_pylist()
        errors = t.column("error").to_pylist()
        done.update(k for k, e in zip(keys, errors) if e is None)
    return done


def compact(folder: Path | str, schema: pa.Schema) -> int:
    """Keep one row per key: the newest good row, else the newest error row.

    Rewrites (atomically) only the shards that hold a superseded row; returns
    how many rows were dropped. Shard order (the run id starts with a UTC
    timestamp) then row order decides what is newest.
    """
    paths = shard_paths(folder)
    if not paths:
        return 0
    # pass 1: find the winning (shard, row) per key
    best: dict[str, tuple[bool, int, int]] = {}
    for si, path in enumerate(paths):
        t = pq.read_table(path, columns=["key", "error"])
        for ri, (k, e) in enumerate(zip(t.column("key").to_pylist(), t.column("error").to_pylist())):
            cand = (e is None, si, ri)
            cur = best.get(k)
            if cur is None or (cand[0], cand[1], cand[2]) > (cur[0], cur[1], cur[2]):
                best[k] = cand
    keep: dict[int, set[int]] = {}
    for good, si, ri in best.values():
        keep.setdefault(si, set()).add(ri)
    dropped = 0
    for si, path in enumerate(paths):
        t = pq.read_table(path, schema=schema)
        rows_kept = keep.get(si, set())
        if len(rows_kept) == t.num_rows:
            continue
        dropped += t.num_rows - len(rows_kept)
        if rows_kept:
            mask = pa.array([i in rows_kept for i in range(t.num_rows)])
            write_table_atomic(t.filter(mask), path)
        else:
            path.unlink()
    return dropped


def failure_counts(folder: Path | str) -> dict[str, int]:
    """Error rows by reason (the text before the first ':' of `error`)."""
    counts: Counter[str] = Counter()
    for path in shard_paths(folder):
        for e in pq.read_table(path, columns=["error"]).column("error").to_pylist():
            if e is not None:
                counts[reason_of(e)] += 1
    return dict(counts)


def count_rows(folder: Path | str) -> tuple[int, int]:
    """(good rows, error rows) across all shards."""
    good = bad = 0
    for path in shard_paths(folder):
        errors = pq.read_table(path, columns=["error"]).column("error")
        n_bad = errors.null_count
        bad += len(errors) - n_bad
        good += n_bad
    return good, bad
