"""Parquet shards: one schema per record, atomic writes, manifest, resume index.

Every stage writes to its own folder (``OUT/captions``, ``OUT/edits``,
``OUT/batches``) as ``part-<run>-<nnnnn>.parquet`` shards plus a
``_manifest.json`` (config, package versions, counts, failures by reason).
The modules, each one concern:

- :mod:`~dataprep.store.schemas`: every Parquet schema (and the columns added later);
- :mod:`~dataprep.store.keys`: row keys and run ids (what a rerun skips);
- :mod:`~dataprep.store.atomic`: the one atomic write (bytes, text, JSON, Parquet);
- :mod:`~dataprep.store.shards`: writing, reading, the resume index, compaction;
- :mod:`~dataprep.store.records`: the manifest and the completion records;
- :mod:`~dataprep.store.checks`: shards and the output folder, checked before a run;
- :mod:`~dataprep.store.locks`: one run per stage folder;
- :mod:`~dataprep.store.usable`: which caption and edit rows a reader uses (one decision).

``from dataprep.store import X`` is the public way in. Only pyarrow (and the
standard library) is imported by these modules: ``softrepa`` reads the shards
through these schemas without pulling in the rest of ``dataprep``. pyarrow
itself loads on first use of a name that needs it (a schema, the shard
functions, the checks): the atomic writes, keys, records and locks are
standard library only, so a module that just writes a file atomically (token
files, grids, plots, the rule checker) does not pay pyarrow's import at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dataprep.store.atomic import atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text, write_table_atomic
from dataprep.store.keys import content_key, new_run_id, sha256_bytes, sha256_text, utcnow
from dataprep.store.locks import HOLDER_NAME, LOCK_NAME, StageLocked, describe_holder, stage_lock
from dataprep.store.records import (
    MANIFEST_NAME,
    Manifest,
    package_versions,
    read_json_record,
    read_manifest,
    read_run_record,
    run_record_path,
    write_run_record,
)
from dataprep.store.usable import caption_skip, caption_skips, edit_skip

# name -> the module that defines it, imported (with pyarrow) on first use
_LAZY = {
    **dict.fromkeys(
        ("BATCHES_SCHEMA", "CAPTIONS_SCHEMA", "DEDUP_SCHEMA", "EDITS_SCHEMA", "JUDGE_SCHEMA", "LATER_COLUMNS",
         "PROVENANCE_FIELDS", "SCHEMAS", "SCORE_METRICS", "SCORES_SCHEMA"),
        "dataprep.store.schemas",
    ),
    **dict.fromkeys(
        ("ShardWriter", "compact", "count_rows", "done_keys", "failure_counts", "iter_rows", "read_table", "rows_to_table", "shard_paths"),
        "dataprep.store.shards",
    ),
    **dict.fromkeys(("check_run_shards", "check_shards", "check_writable"), "dataprep.store.checks"),
}

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ below imports them
    import pyarrow.parquet as pq  # noqa: F401

    from dataprep.store.checks import check_run_shards, check_shards, check_writable  # noqa: F401
    from dataprep.store.schemas import (  # noqa: F401
        BATCHES_SCHEMA,
        CAPTIONS_SCHEMA,
        DEDUP_SCHEMA,
        EDITS_SCHEMA,
        JUDGE_SCHEMA,
        LATER_COLUMNS,
        PROVENANCE_FIELDS,
        SCHEMAS,
        SCORE_METRICS,
        SCORES_SCHEMA,
    )
    from dataprep.store.shards import ShardWriter, compact, count_rows, done_keys, failure_counts, iter_rows, read_table, rows_to_table, shard_paths  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "pq":  # tests patch store.pq.write_table to fake a full disk
        return importlib.import_module("pyarrow.parquet")
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "atomic_file", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "write_table_atomic",
    "content_key", "new_run_id", "sha256_bytes", "sha256_text", "utcnow",
    "HOLDER_NAME", "LOCK_NAME", "StageLocked", "describe_holder", "stage_lock",
    "MANIFEST_NAME", "Manifest", "package_versions", "read_json_record", "read_manifest", "read_run_record", "run_record_path", "write_run_record",
    "caption_skip", "caption_skips", "edit_skip",
    *_LAZY,
]
