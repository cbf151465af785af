"""Duplicate clusters as a rule of the batch builder (pure but for reading the records).

``dataprep dedup`` writes image clusters and caption clusters (``RUN/dedup``).
For batches they become one *group* per image: two images are in one group
when they are linked by any chain of clusters (image a looks like image b, b's
caption reads like c's caption: a, b and c are one group). The builder then
keeps its rule with two calls, :func:`clash` and :func:`mark`: no two images
of one group meet in a batch, as batch images or as owners of prompts. A
positive and a near-copy of it as a "negative" would teach the tokens to
push apart two descriptions of the same picture.

``--dedup keep-one`` instead keeps one image per group (:func:`keep_one`):
the representative of its image cluster (the largest copy), else of its
caption cluster, the smallest id among several.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dataprep.errors import ConfigError, Reason
from dataprep.store import DEDUP_SCHEMA, check_shards, read_manifest, shard_paths

DEDUP_MODES = ("separate", "keep-one", "off")


def load_groups(dedup_dir: Path | str) -> tuple[dict[str, int], set[str]]:
    """(group number per clustered image id, ids chosen to keep per group).

    Group numbers are dense and follow the sorted smallest member id, so the
    same records always give the same numbers. Error rows are ignored.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    reps: dict[str, set[str]] = {"image": set(), "caption": set()}
    for path in shard_paths(dedup_dir):
        t = pq.read_table(path, columns=["kind", "item_id", "cluster_id", "representative", "error"]).to_pydict()
        for kind, item, cluster, rep, err in zip(t["kind"], t["item_id"], t["cluster_id"], t["representative"], t["error"]):
            if err is not None or cluster is None:
                continue
            a, b = find("item:" + item), find("cluster:" + cluster)
            if a != b:
                parent[max(a, b)] = min(a, b)
            if rep:
                reps.setdefault(kind, set()).add(item)
    members: dict[str, list[str]] = {}
    for node in list(parent):
        if node.startswith("item:"):
            members.setdefault(find(node), []).append(node[len("item:") :])
    groups: dict[str, int] = {}
    keep: set[str] = set()
    for g, ids in enumerate(sorted((sorted(v) for v in members.values()), key=lambda v: v[0])):
        for i in ids:
            groups[i] = g
        image_reps = [i for i in ids if i in reps["image"]]
        caption_reps = [i for i in ids if i in reps["caption"]]
        keep.add((image_reps or caption_reps or ids)[0])
    return groups, keep


def check_records(dedup_dir: Path | str, mode: str) -> bool:
    """Whether ``dedup_dir`` holds a finished dedup run; ConfigError for a bad mode or, with keep-one, none."""
    if mode not in DEDUP_MODES:
        raise ConfigError(f"unknown --dedup mode {mode!r}", "--dedup", f"use one of {', '.join(DEDUP_MODES)}")
    finished = read_manifest(dedup_dir) is not None or bool(shard_paths(dedup_dir))
    if finished:  # another stage's shards here (a --dedup-dir typo) is a configuration error, not a schema dump
        check_shards(dedup_dir, DEDUP_SCHEMA, flag="--dedup-dir")
    if not finished and mode == "keep-one":
        raise ConfigError(f"no dedup records in {dedup_dir}", "--dedup keep-one", "run `dataprep dedup RUN` first, or pass --dedup-dir DIR")
    return finished


def attach_groups(index: Any, dedup_dir: Path | str, mode: str = "separate") -> Any:
    """Apply the dedup records to a :class:`dataprep.batches.CaptionIndex`.

    ``separate``: set ``index.groups`` (one number per image, -1 when it is in
    no cluster) for :func:`clash`. ``keep-one``: drop all but one image per
    group (counted as ``skipped["dedup_duplicate"]``), leaving no groups.
    ``off``, or no records: the index as it is.
    """
    if mode == "off" or not check_records(dedup_dir, mode):
        return index
    groups, keep = load_groups(dedup_dir)
    if mode == "keep-one":
        return keep_one(index, groups, keep)
    index.groups = [groups.get(i, -1) for i in index.image_ids]
    return index


def keep_one(index: Any, groups: dict[str, int], keep: set[str]) -> Any:
    """A new index without the images of a group that are not its kept one."""
    return index.without({i for i in index.image_ids if i in groups and i not in keep}, Reason.DEDUP_DUPLICATE)


def clash(groups: list[int] | None, j: int, used: set[int]) -> bool:
    """Whether image ``j`` shares a group with an image already in the batch (``used``)."""
    return groups is not None and groups[j] >= 0 and groups[j] in used


def mark(groups: list[int] | None, j: int, used: set[int]) -> None:
    """Record image ``j``'s group as present in the batch."""
    if groups is not None and groups[j] >= 0:
        used.add(groups[j])
