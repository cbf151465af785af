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
- :mod:`~dataprep.store.usable`: which caption and edit rows a reader uses.

``from dataprep.store import X`` is the public way in. Only pyarrow (and the
standard library) is imported here: ``softrepa`` reads the shards through these
schemas without pulling in the rest of ``dataprep``.
"""

from __future__ import annotations

import pyarrow.parquet as pq  # noqa: F401 -- tests patch store.pq.write_table to fake a full disk

from dataprep.store.atomic import atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text, write_table_atomic
from dataprep.store.checks import check_run_shards, check_shards, check_writable
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
from dataprep.store.schemas import (
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
from dataprep.store.shards import (
    ShardWriter,
    compact,
    count_rows,
    done_keys,
    failure_counts,
    iter_rows,
    read_table,
    rows_to_table,
    shard_paths,
)

__all__ = [
    "BATCHES_SCHEMA", "CAPTIONS_SCHEMA", "DEDUP_SCHEMA", "EDITS_SCHEMA", "HOLDER_NAME", "JUDGE_SCHEMA", "LATER_COLUMNS",
    "LOCK_NAME", "MANIFEST_NAME", "PROVENANCE_FIELDS", "SCHEMAS", "SCORE_METRICS", "SCORES_SCHEMA",
    "Manifest", "ShardWriter", "StageLocked", "atomic_file", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
    "check_run_shards", "check_shards", "check_writable", "compact", "content_key", "count_rows", "describe_holder",
    "done_keys", "failure_counts", "iter_rows", "new_run_id", "package_versions", "read_json_record", "read_manifest",
    "read_run_record", "read_table", "rows_to_table", "run_record_path", "sha256_bytes", "sha256_text", "shard_paths",
    "stage_lock", "utcnow", "write_run_record", "write_table_atomic",
]
