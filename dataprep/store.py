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

from dataprep.errors import Reason, failure, reason_of

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
        # image checks (dataprep.imagecheck): small, blank, aspect; null = not checked
        pa.field("image_flags", pa.list_(pa.string())),
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
        # non-fatal remark, e.g. why a rewrite was kept over --max-target-share
        pa.field("note", pa.string()),
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


# The leading underscore matters: pyarrow, pandas and datasets skip files
# starting with "_" or ".", so `pd.read_parquet("OUT/captions")` reads the
# shards of a stage folder directly, manifest and temp files included beside them.
MANIFEST_NAME = "_manifest.json"


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` so readers see the old file or the new one, never a part.

    A hidden temp file in the same folder (same file system, so the rename is
    atomic), fsync, then ``os.replace``; on any failure (disk full) the temp
    file is removed and the old file, if any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json_record(path: Path | str) -> Any | None:
    """A manifest or completion record, or None when absent or unreadable.

    A corrupt record (a crash of an older version mid-write, a hand edit) is
    treated as absent with a warning: the shards are the data, the record only
    describes them, so a bad one must never stop a run.
    """
    import warnings

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"ignoring unreadable {path}: {exc}", RuntimeWarning, stacklevel=2)
        return None


def read_manifest(folder: Path | str) -> dict[str, Any] | None:
    """The folder's manifest as a dict; None when absent, corrupt or not an object."""
    data = read_json_record(Path(folder) / MANIFEST_NAME)
    return data if isinstance(data, dict) else None


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
        old = read_manifest(folder) or {}
        history = [r for r in old.get("runs", []) if isinstance(r, dict)] if isinstance(old.get("runs"), list) else []
        this = {k: v for k, v in self.__dict__.items()}
        history = [r for r in history if r.get("run_id") != self.run_id] + [
            {k: this[k] for k in ("run_id", "started_at", "finished_at", "counts")}
        ]
        return atomic_write_json(path, dict(this, runs=history))


# ---------------------------------------------------------------- checks before a run


# Columns added to a schema after shards were first written with it. A shard
# from before lacks them and still belongs to its stage: readers fill them with
# null, and its rows resume like any other.
LATER_COLUMNS = frozenset({"image_flags", "note"})


def check_shards(folder: Path | str, schema: pa.Schema, flag: str = "--out") -> None:
    """Raise ConfigError naming the first shard that is unreadable or of another schema.

    Runs before any model loads: a corrupt shard (a disk error, a copy cut
    short) or one of another stage (``edits`` shards copied into
    ``captions/``) would otherwise crash the resume index or the compaction
    after the model loaded. Only the Parquet footer is read.
    """
    from dataprep.errors import ConfigError

    for path in shard_paths(folder):
        try:
            found = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad footer
            raise ConfigError(
                f"shard {path} is corrupt ({type(exc).__name__}: {exc})",
                flag,
                f"move {path.name} out of {path.parent} (its rows are lost or must be rebuilt), then rerun; the other shards are kept",
            ) from None
        wrong = [f"{f.name} ({f.type})" for f in schema if f.name in found.names and not found.field(f.name).type.equals(f.type)]
        # ShardWriter always writes every column, save those added since
        missing = [f.name for f in schema if f.name not in found.names and f.name not in LATER_COLUMNS]
        if wrong or missing:
            what = "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "", f"other types for {', '.join(wrong)}" if wrong else ""]))
            raise ConfigError(
                f"shard {path} does not hold this stage's rows ({what})",
                flag,
                f"move {path.name} out of {path.parent}, or write this run to another --out folder",
            )


def check_run_shards(run: Path | str, flag: str = "RUN") -> None:
    """:func:`check_shards` on every stage folder of a run that readers open
    (captions, edits, judge, dedup): a corrupt or foreign shard is exit 2
    naming the file, not a pyarrow error from deep inside a reader."""
    run = Path(run)
    for name, schema in (("captions", CAPTIONS_SCHEMA), ("edits", EDITS_SCHEMA), ("judge", JUDGE_SCHEMA), ("dedup", DEDUP_SCHEMA)):
        if (run / name).is_dir():
            check_shards(run / name, schema, flag)


def check_writable(out: Path | str, flag: str = "--out") -> Path:
    """Raise ConfigError unless ``out`` is (or can be made) a writable folder.

    Called before any model loads, so a typo'd ``--out`` costs seconds, not a
    model load and a crash at the first shard.
    """
    from dataprep.errors import ConfigError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder", flag, "pass a folder path (it is created if missing)")
    probe = out
    while not probe.exists():  # the nearest existing ancestor decides whether we can create it
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot create {out}: {probe} is a file", flag, "pass a folder path under a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{probe} is not writable", flag, "pass a folder you can write to")
    return out


# ---------------------------------------------------------------- one run per stage folder

LOCK_NAME = ".dataprep.lock"  # hidden: readers of the folder skip it
HOLDER_NAME = ".dataprep.lock.json"
_LOCKS: dict[str, Any] = {}  # lock file path -> FileLock, shared by every stage_lock of this process


class StageLocked(Exception):
    """Another process holds the folder's lock (``holder`` says who, when known)."""

    def __init__(self, folder: Path, holder: dict[str, Any] | None):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is in use by another run: {describe_holder(holder)}")


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown (it has only just started)"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}: {holder.get('command')}"


class stage_lock:
    """Hold the lock of a stage folder: ``with stage_lock(folder, wait=False): ...``.

    Two runs writing one stage folder at once would both compact it and both
    write a manifest; the second run therefore waits (``wait=True``, at most
    ``timeout`` seconds, None = forever) or raises :class:`StageLocked` at once.
    The lock is an OS file lock (``filelock``), so it is released when the
    holder dies, even by kill -9: a stale lock never blocks a later run. The
    holder's pid, host, start time and command sit in a JSON file beside it
    for the message the second run prints. Re-entrant in one process.
    """

    def __init__(self, folder: Path | str, wait: bool = False, timeout: float | None = None):
        self.folder = Path(folder)
        self.wait, self.timeout = wait, timeout
        self._lock = None

    def __enter__(self) -> "stage_lock":
        import socket
        import sys

        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        path = str((self.folder / LOCK_NAME).resolve())
        # one FileLock per path and process: flock() locks of two handles in
        # one process exclude each other, so a nested use would wait on itself
        self._lock = _LOCKS.setdefault(path, FileLock(path, thread_local=False))
        timeout = (-1 if self.timeout is None else self.timeout) if self.wait else 0
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout:
            raise StageLocked(self.folder, self.holder(self.folder)) from None
        if self._lock.lock_counter == 1:
            try:
                atomic_write_json(self.folder / HOLDER_NAME, {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started_at": utcnow().isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
                })
            except BaseException:  # disk full: do not keep a lock nobody will release
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is None:
            return
        if self._lock.lock_counter == 1:
            try:
                (self.folder / HOLDER_NAME).unlink()
            except OSError:
                pass
        self._lock.release()

    @staticmethod
    def holder(folder: Path | str) -> dict[str, Any] | None:
        """Who holds the lock of ``folder`` (as its holder recorded it), or None."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = read_json_record(Path(folder) / HOLDER_NAME)
        return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- completion records


def run_record_path(folder: Path | str, run_id: str) -> Path:
    """``_run-<run_id>.json``: written last, atomically, when a run finished all its shards."""
    return Path(folder) / f"_run-{run_id}.json"


def write_run_record(folder: Path | str, run_id: str, shards: list[Path], **fields: Any) -> Path:
    """Mark run ``run_id`` complete: its shard names and ``fields``, written atomically.

    A reader that finds no record (or an unreadable one) knows the run did
    not finish: the shards present may be only part of it.
    """
    return atomic_write_json(run_record_path(folder, run_id), {"run_id": run_id, **fields, "shards": [Path(p).name for p in shards]})


def read_run_record(folder: Path | str, run_id: str) -> dict[str, Any] | None:
    """The completion record of ``run_id``, or None (absent or unreadable: not complete)."""
    data = read_json_record(run_record_path(folder, run_id))
    return data if isinstance(data, dict) and isinstance(data.get("shards"), list) else None
