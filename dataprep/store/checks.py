"""Checks before a run: a stage folder's shards and the output folder.

They run before any model loads, so a corrupt shard or a typo'd ``--out``
costs seconds and names the file or flag (exit 2), not a model load and a
pyarrow traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.errors import ConfigError
from dataprep.store.schemas import LATER_COLUMNS, SCHEMAS
from dataprep.store.shards import shard_paths


def check_shards(folder: Path | str, schema: pa.Schema, flag: str = "--out") -> None:
    """Raise ConfigError naming the first shard that is unreadable or of another schema.

    Runs before any model loads: a corrupt shard (a disk error, a copy cut
    short) or one of another stage (``edits`` shards copied into
    ``captions/``) would otherwise crash the resume index or the compaction
    after the model loaded. Only the Parquet footer is read.
    """
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
    for name in ("captions", "edits", "judge", "dedup"):
        if (run / name).is_dir():
            check_shards(run / name, SCHEMAS[name], flag)


def check_writable(out: Path | str, flag: str = "--out") -> Path:
    """Raise ConfigError unless ``out`` is (or can be made) a writable folder.

    Called before any model loads, so a typo'd ``--out`` costs seconds, not a
    model load and a crash at the first shard.
    """
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
