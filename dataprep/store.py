"""Parquet shards: one schema per record, atomic writes, manifest, resume index.

Every stage writes to its own folder (``OUT/captions``, ``OUT/edits``,
``OUT/batches``) as ``part-<run>-<nnnnn>.parquet`` shards plus a
``_manifest.json`` (config, package versions, counts, failures by reason). The rules that make reruns safe:

- A shard is written to a hidden temp name and renamed, so a killed run loses
  at most the shard in flight and never leaves a half-written file.
- Generated rows carry a content ``key`` (see :func:`content_key`). A rerun
  skips keys that already have a good row (``error`` is null) and retries the
  rest.
- :func:`compact` keeps one row per key (the newest good row, else the newest
  error row) so a retried or recomputed row never appears twice.

Only pyarrow is imported here: `softrepa` reads the shards through these
schemas without pulling in the rest of `dataprep`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------- schemas

PROVENANCE_FIELDS: list[pa.Field] = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("engine", pa.string()),
    pa.field("model", pa.string()),
    pa.field("model_revision", pa.string()),
    pa.field("prompt_id", pa.string()),
    pa.field("prompt_sha256", pa.string()),
    pa.field("sampling", pa.string()),  # JSON, so every engine's knobs fit one column
    pa.field("seed", pa.int64()),
    pa.field("finish_reason", pa.string()),  # stop | length | error
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("run_id", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("error", pa.string()),  # null on a good row; a readable reason otherwise
]

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("error", pa.string()),
    ]
)

# Captions carry the image's uri and size too, so the batch builder and the
# trainer find pixels without a join against a separate images table.
CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("caption", pa.string()),
        *PROVENANCE_FIELDS,
    ]
)

EDITS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("source", pa.string()),
        pa.field("target", pa.string()),
        pa.field("raw_output", pa.string()),
        pa.field("passed", pa.bool_()),
        pa.field("violations", pa.list_(pa.string())),
        pa.field("source_span", pa.string()),
        pa.field("target_span", pa.string()),
        pa.field("attempts", pa.int32()),
        *PROVENANCE_FIELDS,
    ]
)

BATCHES_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("preset", pa.string()),
        pa.field("image_ids", pa.list_(pa.string())),
        pa.field("image_uris", pa.list_(pa.string())),
        pa.field("prompts", pa.list_(pa.string())),
        # positive | hard_negative | negative, relative to the batch as a whole:
        # a prompt is "positive" if it is some image's own caption.
        pa.field("prompt_kinds", pa.list_(pa.string())),
        # which image each prompt came from (the edit's or caption's image)
        pa.field("prompt_image_ids", pa.list_(pa.string())),
        # per image i: index into `prompts` of its positive
        pa.field("positive_index", pa.list_(pa.int32())),
        pa.field("seed", pa.int64()),
        pa.field("epoch", pa.int32()),
    ]
)

# An instruction model's grading of one edit pair on rules 1, 2 and 7 of
# prompts/edit.txt (dataprep.judge). ``edit_key`` is the graded edit row's key,
# ``edit_passed`` the rule checker's verdict on it, so checker/judge agreement
# is read from this table alone.
JUDGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("edit_key", pa.string()),
        pa.field("edit_passed", pa.bool_()),
        pa.field("source", pa.string()),
        pa.field("target", pa.string()),
        pa.field("verdict", pa.string()),  # good | bad; null on an error row
        pa.field("rule1_ok", pa.bool_()),
        pa.field("rule1_reason", pa.string()),
        pa.field("rule2_ok", pa.bool_()),
        pa.field("rule2_reason", pa.string()),
        pa.field("rule7_ok", pa.bool_()),
        pa.field("rule7_reason", pa.string()),
        pa.field("raw_output", pa.string()),
        pa.field("attempts", pa.int32()),
        *PROVENANCE_FIELDS,
    ]
)

# Duplicate clusters (dataprep.dedup): one row per member of a cluster of two
# or more, plus error rows for items that could not be hashed. Singletons are
# not written, so the table stays small at COCO scale.
DEDUP_SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # image | caption
        pa.field("item_id", pa.string(), nullable=False),  # the image_id the image or caption belongs to
        pa.field("cluster_id", pa.string()),  # "<kind>:<representative's item_id>"
        pa.field("representative", pa.bool_()),
        pa.field("method", pa.string()),  # sha256 | phash | minhash
        pa.field("distance", pa.float64()),  # to the representative: phash Hamming bits, or 1 - estimated Jaccard
        pa.field("run_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("error", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES_SCHEMA,
    "captions": CAPTIONS_SCHEMA,
    "edits": EDITS_SCHEMA,
    "batches": BATCHES_SCHEMA,
    "judge": JUDGE_SCHEMA,
    "dedup": DEDUP_SCHEMA,
}


# ---------------------------------------------------------------- keys


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_key(
    stage: str,
    input_sha256: str,
    model: str,
    model_revision: str | None,
    prompt_sha256: str,
    sampling: dict[str, Any] | str,
    seed: int | None,
) -> str:
    """The row's identity: same inputs, model, prompt and sampling -> same key.

    Changing any of them changes the key, so a rerun never reuses a stale row.
    The engine is deliberately not part of it: vLLM and transformers serve the
    same model, and a row from either satisfies the other.
    """
    if not isinstance(sampling, str):
        sampling = json.dumps(sampling, sort_keys=True)
    payload = json.dumps(
        [stage, input_sha256, model, model_revision or "", prompt_sha256, sampling, seed],
        separators=(",", ":"),
    )
    return sha256_text(payload)


def new_run_id() -> str:
    """UTC time to the microsecond first: shard names sort in run order, which
    :func:`compact` relies on to find the newest row."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:6]


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# ---------------------------------------------------------------- writing


def shard_paths(folder: Path | str) -> list[Path]:
    """Finished shards in write order (hidden temp files are never listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("part-*.parquet") if not p.name.startswith("."))


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write to a hidden temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class ShardWriter:
    """Buffers rows and writes a shard every ``rows_per_shard`` rows.

    Rows are dicts with the schema's columns; missing columns become null,
    unknown ones are an error (a typo must not silently drop data).
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
        columns = {name: [r.get(name) for r in self._buffer] for name in self.schema.names}
        table = pa.Table.from_pydict(columns, schema=self.schema)
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


# ---------------------------------------------------------------- reading


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


# ---------------------------------------------------------------- manifest


def package_versions(names: Iterable[str] = ("softrepa-dataprep", "torch", "transformers", "diffusers", "vllm", "pyarrow", "pillow", "datasets")) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def failure_counts(folder: Path | str) -> dict[str, int]:
    """Error rows by reason (the text before the first ':' of `error`)."""
    counts: Counter[str] = Counter()
    for path in shard_paths(folder):
        for e in pq.read_table(path, columns=["error"]).column("error").to_pylist():
            if e is not None:
                counts[e.split(":", 1)[0]] += 1
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


# The leading underscore matters: pyarrow, pandas and datasets skip files
# starting with "_" or ".", so `pd.read_parquet("OUT/captions")` reads the
# shards of a stage folder directly, manifest and temp files included beside them.
MANIFEST_NAME = "_manifest.json"


def read_manifest(folder: Path | str) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Manifest:
    stage: str
    config: dict[str, Any]
    run_id: str
    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    started_at: str = field(default_factory=lambda: utcnow().isoformat())
    finished_at: str | None = None

    def write(self, folder: Path | str) -> Path:
        """Write the manifest; earlier runs are kept under ``runs``."""
        path = Path(folder) / MANIFEST_NAME
        history: list[dict[str, Any]] = []
        if path.exists():
            try:
                old = json.loads(path.read_text())
                history = old.get("runs", [])
            except (OSError, json.JSONDecodeError):
                history = []
        this = {k: v for k, v in self.__dict__.items()}
        history = [r for r in history if r.get("run_id") != self.run_id] + [
            {k: this[k] for k in ("run_id", "started_at", "finished_at", "counts")}
        ]
        body = dict(this, runs=history)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".manifest.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
        return path
