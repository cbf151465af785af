"""Every Parquet schema the project writes: one per record, in one place.

A stage folder holds shards of exactly one of these (:data:`SCHEMAS` maps the
folder name to it); ``softrepa`` writes its evaluation scores with
:data:`SCORES_SCHEMA`. Changing a column's name, type or order breaks every
run folder written before: add columns at the end and list them in
:data:`LATER_COLUMNS` instead.

Columns are written ``name:type`` (``!`` = not nullable), a group of related
columns to a string, so a schema reads at a glance; :func:`columns` turns
them into pyarrow fields.
"""

from __future__ import annotations

import pyarrow as pa

_TYPES: dict[str, pa.DataType] = {
    "str": pa.string(),
    "i32": pa.int32(),
    "i64": pa.int64(),
    "f64": pa.float64(),
    "bool": pa.bool_(),
    "time": pa.timestamp("us", tz="UTC"),
    "[str]": pa.list_(pa.string()),
    "[i32]": pa.list_(pa.int32()),
}


def columns(*groups: str | list[pa.Field]) -> list[pa.Field]:
    """``"image_id:str! caption:str"`` (and lists of fields, kept as they are) -> fields, in order."""
    out: list[pa.Field] = []
    for group in groups:
        if not isinstance(group, str):
            out.extend(group)
            continue
        for column in group.split():
            name, type_ = column.split(":")
            out.append(pa.field(name, _TYPES[type_.rstrip("!")], nullable=not type_.endswith("!")))
    return out


def schema(*groups: str | list[pa.Field]) -> pa.Schema:
    return pa.schema(columns(*groups))


# Who made a generated row and how. ``sampling`` is JSON, so every engine's
# knobs fit one column; ``finish_reason`` is stop | length | error; ``error``
# is null on a good row, else "reason: detail" (dataprep.errors.Reason).
PROVENANCE_FIELDS: list[pa.Field] = columns(
    "key:str! engine:str model:str model_revision:str prompt_id:str prompt_sha256:str sampling:str seed:i64",
    "finish_reason:str prompt_tokens:i32 completion_tokens:i32 run_id:str created_at:time error:str",
)

# Captions carry the image's uri and size too, so the batch builder and the
# trainer find pixels without a join against a separate images table.
# image_flags: image checks (dataprep.imagecheck: small, blank, aspect); null = not checked.
CAPTIONS_SCHEMA = schema(
    "image_id:str! image_sha256:str image_uri:str image_width:i32 image_height:i32",
    "caption:str",
    PROVENANCE_FIELDS,
    "image_flags:[str]",
)

# note: a non-fatal remark, e.g. why a rewrite was kept over --max-target-share.
EDITS_SCHEMA = schema(
    "image_id:str image_uri:str source:str target:str raw_output:str",
    "passed:bool violations:[str] source_span:str target_span:str attempts:i32",
    PROVENANCE_FIELDS,
    "note:str",
)

# prompt_kinds: positive | hard_negative | negative, relative to the batch as a
# whole (a prompt is "positive" if it is some image's own caption);
# prompt_image_ids: which image each prompt came from (the edit's or caption's
# image); positive_index: per image i, the index into ``prompts`` of its positive.
BATCHES_SCHEMA = schema(
    "batch_id:str! preset:str image_ids:[str] image_uris:[str]",
    "prompts:[str] prompt_kinds:[str] prompt_image_ids:[str] positive_index:[i32]",
    "seed:i64 epoch:i32",
)

# An instruction model's grading of one edit pair on rules 1, 2 and 7 of
# prompts/edit.txt (dataprep.judge). ``edit_key`` is the graded edit row's key,
# ``edit_passed`` the rule checker's verdict on it, so checker/judge agreement
# is read from this table alone. verdict: good | bad; null on an error row.
JUDGE_SCHEMA = schema(
    "image_id:str edit_key:str edit_passed:bool source:str target:str verdict:str",
    "rule1_ok:bool rule1_reason:str rule2_ok:bool rule2_reason:str rule7_ok:bool rule7_reason:str",
    "raw_output:str attempts:i32",
    PROVENANCE_FIELDS,
)

# Duplicate clusters (dataprep.dedup): one row per member of a cluster of two
# or more, plus error rows for items that could not be hashed. Singletons are
# not written, so the table stays small at COCO scale. kind: image | caption;
# item_id: the image_id the image or caption belongs to; cluster_id:
# "<kind>:<representative's item_id>"; method: sha256 | phash | minhash;
# distance to the representative: phash Hamming bits, or 1 - estimated Jaccard.
DEDUP_SCHEMA = schema(
    "kind:str! item_id:str! cluster_id:str representative:bool method:str distance:f64",
    "run_id:str created_at:time error:str",
)

# Per-pair, per-setting scores of `softrepa evaluate-edit` (OUT/scores.parquet).
# passed: the rule checker's verdict; null when the pairs carry none.
SCORE_METRICS = ("clip", "pickscore", "lpips", "imagereward", "hpsv2")
SCORES_SCHEMA = schema(
    "pair_id:str image_id:str passed:bool setting:str method:str n_max:i32 tgt_cfg:f64",
    "source_prompt:str target_prompt:str source_image:str edited_image:str",
    " ".join(f"{m}:f64" for m in SCORE_METRICS),
    "error:str",
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
