"""Every Parquet schema the project writes: one per record, in one place.

A stage folder holds shards of exactly one of these (:data:`SCHEMAS` maps the
folder name to it); ``softrepa`` writes its evaluation scores with
:data:`SCORES_SCHEMA`. Changing a column's name or type breaks every run
folder written before: add columns at the end and list them in
:data:`LATER_COLUMNS` instead.
"""

from __future__ import annotations

import pyarrow as pa

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

# Per-pair, per-setting scores of `softrepa evaluate-edit` (OUT/scores.parquet).
SCORE_METRICS = ("clip", "pickscore", "lpips", "imagereward", "hpsv2")
SCORES_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("passed", pa.bool_()),  # rule checker verdict; null when the pairs carry none
        pa.field("setting", pa.string()),
        pa.field("method", pa.string()),
        pa.field("n_max", pa.int32()),
        pa.field("tgt_cfg", pa.float64()),
        pa.field("source_prompt", pa.string()),
        pa.field("target_prompt", pa.string()),
        pa.field("source_image", pa.string()),
        pa.field("edited_image", pa.string()),
        *[pa.field(m, pa.float64()) for m in SCORE_METRICS],
        pa.field("error", pa.string()),
    ]
)

# A run folder's stage folders and the schema of their shards (what
# check_run_shards verifies before a reader opens them).
SCHEMAS: dict[str, pa.Schema] = {
    "captions": CAPTIONS_SCHEMA,
    "edits": EDITS_SCHEMA,
    "batches": BATCHES_SCHEMA,
    "judge": JUDGE_SCHEMA,
    "dedup": DEDUP_SCHEMA,
}

# Columns added to a schema after shards were first written with it. A shard
# from before lacks them and still belongs to its stage: readers fill them with
# null, and its rows resume like any other.
LATER_COLUMNS = frozenset({"image_flags", "note"})
