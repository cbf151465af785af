"""The index the builder reads: stores streamed through Arrow, one entry per usable image.

Which rows are usable is :mod:`dataprep.store.usable`'s decision (the same one
export, stats and evaluation use); here it is applied at scale, shard by shard,
so that only the rows that win become Python objects.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataprep.errors import ConfigError, Reason
from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, caption_skips, check_shards, edit_skip, shard_paths


@dataclass
class CaptionIndex:
    """Everything the builder needs, one entry per usable image, sorted by id.

    Captions of image ``i`` are ``texts[starts[i]:starts[i + 1]]`` (one for a
    caption store, about five for COCO). ``edits`` is parallel to ``texts``:
    the caption's passing single-concept edit, or None. ``skipped`` counts
    what was left out and why (error rows, images without a caption, failed
    edits, ...); :meth:`fingerprint` is a sha256 of the content, so a rebuild
    with other inputs gets other shard names.
    """

    image_ids: list[str]
    image_uris: list[str | None]
    starts: array
    texts: list[str]
    edits: list[str | None]
    skipped: Counter = field(default_factory=Counter)
    # per image: its duplicate group (dataprep.clusters), -1 for none; None: no dedup records
    groups: list[int] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def without(self, image_ids: set[str], reason: str) -> "CaptionIndex":
        """A new index without ``image_ids`` (counted in ``skipped[reason]``), with no duplicate groups."""
        ids, uris, texts, edits = [], [], [], []
        starts = array("q", [0])
        for i, image_id in enumerate(self.image_ids):
            if image_id in image_ids:
                continue
            ids.append(image_id)
            uris.append(self.image_uris[i])
            texts.extend(self.texts[self.starts[i] : self.starts[i + 1]])
            edits.extend(self.edits[self.starts[i] : self.starts[i + 1]])
            starts.append(len(texts))
        skipped = Counter(self.skipped)
        dropped = len(self) - len(ids)
        if dropped:
            skipped[reason] += dropped
        return CaptionIndex(ids, uris, starts, texts, edits, skipped)

    def captions(self, i: int) -> list[str]:
        return self.texts[self.starts[i] : self.starts[i + 1]]

    def n_edits(self) -> int:
        return sum(e is not None for e in self.edits)

    def fingerprint(self) -> str:
        """sha256 over ids, uris, captions and edits, in index order."""
        h = hashlib.sha256()
        sep, end = b"\x1f", b"\x1e"  # ASCII unit / record separators between fields
        for i, image_id in enumerate(self.image_ids):
            parts = [image_id, self.image_uris[i] or "", str(self.starts[i + 1] - self.starts[i])]
            for k in range(self.starts[i], self.starts[i + 1]):
                parts += [self.texts[k], "\x00" if self.edits[k] is None else self.edits[k]]
            if self.groups is not None:
                parts.append(f"group={self.groups[i]}")
            h.update(sep.join(p.encode("utf-8", "surrogatepass") for p in parts) + end)
        return h.hexdigest()


def make_index(rows: list[tuple[str, str | None, list[str]]], skipped: Counter | None = None) -> CaptionIndex:
    """Build an index from ``(image_id, uri, captions)`` tuples (sorted by id here)."""
    rows = sorted(rows, key=lambda r: r[0])
    starts = array("q", [0])
    texts: list[str] = []
    for _, _, caps in rows:
        texts.extend(caps)
        starts.append(len(texts))
    return CaptionIndex([r[0] for r in rows], [r[1] for r in rows], starts, texts, [None] * len(texts), skipped or Counter())


def _ts(col: pa.Array) -> list[int]:
    """Timestamps as int microseconds, cheap to compare; a null counts as the oldest."""
    return pc.fill_null(col.cast(pa.int64()), -(2**63)).to_pylist()


def load_caption_index(captions_dir: Path | str, drop_image_flags: Iterable[str] = ()) -> CaptionIndex:
    """Newest good caption per image_id from a caption store (read shard by shard).

    A store may hold several good rows for one image (other model or prompt,
    hence other keys): the newest ``created_at`` wins, ties go to the later
    shard/row. Error rows, empty captions and images with no good row are
    skipped and counted in ``skipped``. An image whose good caption row has
    any of ``drop_image_flags`` in ``image_flags`` (see dataprep.imagecheck)
    is left out, counted as ``image_flagged`` and per flag as
    ``image_flag_<name>``; rows written before the checks existed (null) pass.
    """
    drop = frozenset(drop_image_flags)
    flagged: dict[str, set[str]] = {}
    paths = shard_paths(captions_dir)
    if not paths:
        raise ConfigError(f"no caption shards in {captions_dir}", "--captions", "point it at OUT/captions of a `dataprep caption` run")
    check_shards(captions_dir, CAPTIONS_SCHEMA, flag="--captions")  # a corrupt shard: exit 2 naming it, not a crash mid-build
    # Two passes so that only the winning rows ever become Python strings and
    # at most one shard's text is in Arrow at a time (scale):
    # 1) per shard, the good rows' (image_id, created_at, shard, row); pick the
    #    newest per id in Arrow; 2) per shard, fetch the winners' caption/uri.
    keys: list[pa.Table] = []
    bad_ids: set[str] = set()
    skipped: Counter = Counter()
    for si, path in enumerate(paths):
        t = pq.read_table(path, columns=["image_id", "caption", "error", "created_at"])
        why = caption_skips(t)  # dataprep.store.usable: the one caption decision, column-wise
        bad = pc.is_valid(why)
        skipped.update({d["values"]: d["counts"] for d in pc.value_counts(why.drop_null()).to_pylist()})
        if pc.any(bad).as_py():
            bad_ids.update(t.filter(bad)["image_id"].to_pylist())
        rows = pa.array(range(t.num_rows), pa.int64())
        # a row without a timestamp counts as the oldest; ties: later shard, then later row wins
        created = pc.fill_null(t["created_at"].cast(pa.int64()), -(2**63))
        k = pa.table({"image_id": t["image_id"], "created_at": created, "_shard": pa.array([si] * t.num_rows, pa.int32()), "_row": rows})
        keys.append(k.filter(pc.invert(bad)))
        if drop and "image_flags" in pq.read_schema(path).names:
            fl = pq.read_table(path, columns=["image_id", "image_flags"]).filter(pc.invert(bad))
            fl = fl.filter(pc.fill_null(pc.greater(pc.list_value_length(fl["image_flags"]), 0), False))
            for image_id, names in zip(fl["image_id"].to_pylist(), fl["image_flags"].to_pylist()):
                if drop.intersection(names):
                    flagged.setdefault(image_id, set()).update(drop.intersection(names))
        del t
    k = pa.concat_tables(keys)
    del keys
    k = k.take(pc.sort_indices(k, sort_keys=[("image_id", "ascending"), ("created_at", "ascending"), ("_shard", "ascending"), ("_row", "ascending")]))
    n = k.num_rows
    if n > 1:  # the newest row of each id is the last of its run
        ids = k["image_id"].combine_chunks()
        k = k.filter(pa.concat_arrays([pc.not_equal(ids.slice(0, n - 1), ids.slice(1)), pa.array([True])]))
        del ids
    if flagged:
        k = k.filter(pc.invert(pc.is_in(k["image_id"], pa.array(sorted(flagged), pa.string()))))
        skipped[Reason.IMAGE_FLAGGED] = len(flagged)
        for names in flagged.values():
            skipped.update(f"image_flag_{n}" for n in names)
    image_ids = k["image_id"].to_pylist()
    k = k.append_column("_pos", pa.array(range(k.num_rows), pa.int64()))
    texts: list[str] = [""] * k.num_rows
    uris: list[str | None] = [None] * k.num_rows
    for si, path in enumerate(paths):
        mine = k.filter(pc.equal(k["_shard"], si))
        if not mine.num_rows:
            continue
        t = pq.read_table(path, columns=["image_uri", "caption"]).take(mine["_row"])
        for pos, uri, cap in zip(mine["_pos"].to_pylist(), t["image_uri"].to_pylist(), t["caption"].to_pylist()):
            texts[pos], uris[pos] = cap, uri
        del t
    del k
    if bad_ids:
        skipped[Reason.IMAGES_WITHOUT_CAPTION] = len(bad_ids.difference(image_ids))
    skipped = Counter({name: v for name, v in skipped.items() if v})
    return CaptionIndex(image_ids, uris, array("q", range(len(texts) + 1)), texts, [None] * len(texts), skipped)


def attach_edits(index: CaptionIndex, edits_dir: Path | str) -> CaptionIndex:
    """Attach each caption's newest usable edit (``passed`` and no error).

    An edit belongs to a caption when its image_id matches and its ``source``
    is that caption's text (whitespace at the ends ignored): an edit of an
    older caption of the image is not this caption's single-concept edit, so
    it is skipped and counted as ``edit_stale``.
    """
    paths = shard_paths(edits_dir)
    if not paths:
        raise ConfigError(f"no edit shards in {edits_dir}", "--edits", "point it at OUT/edits of a `dataprep rewrite` run, or leave it out")
    check_shards(edits_dir, EDITS_SCHEMA, flag="--edits")
    ids = index.image_ids  # sorted: found by bisection, no second id -> row dict at 1M scale
    newest = array("q", [-(2**63)]) * len(index.texts)  # created_at of the edit kept per caption
    sk = index.skipped
    for path in paths:
        pf = pq.ParquetFile(path)
        for b in pf.iter_batches(columns=["image_id", "source", "target", "passed", "error", "created_at"]):
            for row, ts in zip(b.select(["image_id", "source", "target", "passed", "error"]).to_pylist(), _ts(b.column("created_at"))):
                why = edit_skip(row)  # dataprep.store.usable: the one edit decision
                if why is not None:
                    sk[why] += 1
                    continue
                image_id, source, target = row["image_id"], row["source"], row["target"]
                i = bisect.bisect_left(ids, image_id)
                if i == len(ids) or ids[i] != image_id:
                    sk[Reason.EDIT_WITHOUT_CAPTION] += 1
                    continue
                src = (source or "").strip()
                k = next((k for k in range(index.starts[i], index.starts[i + 1]) if index.texts[k].strip() == src), None)
                if k is None:
                    sk[Reason.EDIT_STALE] += 1
                    continue
                if index.edits[k] is None or ts >= newest[k]:
                    newest[k] = ts
                    index.edits[k] = target
    for name in [k for k, v in sk.items() if not v]:
        del sk[name]
    return index


def load_coco_index(coco_captions: Path | str, coco_images: Path | str) -> CaptionIndex:
    """COCO ``captions_*.json`` -> index with all (about five) captions per image.

    Image ids are ``coco/<file stem>``; captions keep annotation-id order so
    the per-epoch rotation is stable. Images whose file is missing under
    ``coco_images`` are skipped and counted.
    """
    cp, root = Path(coco_captions), Path(coco_images)
    if not cp.is_file():
        raise ConfigError(f"COCO captions file not found: {cp}", "--coco-captions", "pass annotations/captions_train2017.json")
    if not root.is_dir():
        raise ConfigError(f"COCO image folder not found: {root}", "--coco-images", "pass the train2017/ folder")
    try:
        data = json.loads(cp.read_text())
        images = {im["id"]: im["file_name"] for im in data["images"]}
        anns = sorted(data["annotations"], key=lambda a: a.get("id", 0))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"not a COCO captions file: {cp} ({exc})", "--coco-captions", "pass annotations/captions_train2017.json") from None
    caps: dict[int, list[str]] = {}
    skipped: Counter = Counter()
    for a in anns:
        text = a.get("caption")
        if not isinstance(text, str) or not text.strip():
            skipped[Reason.CAPTION_EMPTY_ROWS] += 1
            continue
        if a.get("image_id") not in images:  # malformed or dangling annotation: count it, go on
            skipped[Reason.ANNOTATION_WITHOUT_IMAGE] += 1
            continue
        caps.setdefault(a["image_id"], [])
        if text not in caps[a["image_id"]]:  # a repeated caption would be its own negative
            caps[a["image_id"]].append(text)
    rows = []
    for image_id, file_name in images.items():
        if image_id not in caps:
            skipped[Reason.IMAGES_WITHOUT_CAPTION] += 1
            continue
        path = root / file_name
        if not path.is_file():
            skipped[Reason.IMAGE_MISSING] += 1
            continue
        rows.append((f"coco/{Path(file_name).stem}", str(path.resolve()), caps[image_id]))
    return make_index(rows, skipped)
