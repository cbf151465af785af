"""Contrastive batches: grids of images x prompts for SoftREPA training.

SoftREPA trains on grids of ``images x prompts`` (paper, appendix Table 3,
"batch size (positive, negative)"): each image's own caption is its positive
and every other prompt of the grid a negative for it. Presets:

=======  ======  =======  =============================
preset   images  prompts  pairs (positive, negative)
=======  ======  =======  =============================
sd3      4       4        16 (4, 12)
sdxl     1       16       16 (1, 15)
sd1.5    4       8        32 (4, 28)
=======  ======  =======  =============================

A batch's prompts are laid out as ``[positives (one per image, in image
order)] + [hard negatives] + [negatives]``. The official code only uses
in-batch captions; we fill the ``prompts - images`` free slots first with the
hardest negative there is, the positive caption's own single-concept edit
(passed the rule checker, no error), then with captions of images that are not
in the batch. The SD3 grid (4 x 4) has no free slot, so it gets no hard
negatives; use a custom grid (``images=4, prompts=8``) to add them.

Rules every batch obeys (tests check each):

- each image appears once per epoch (``drop_last`` drops the final partial
  batch, so its images sit that epoch out); the order is shuffled by seed;
- no prompt text twice in a batch; no negative equals any caption text of an
  image in the batch (for COCO: captions of the same image are never its
  negatives); failed or error edits are never used;
- no two images of one duplicate group (``dataprep dedup`` records, see
  :mod:`dataprep.clusters`) meet in a batch, as batch images or as owners of
  negatives; ``--dedup keep-one`` keeps one image per group instead, and
  ``--require-judge`` keeps only judged-good edits (:mod:`dataprep.judge`);
- the same index, options and seed give the same rows, so the shards are
  byte-identical (names derive from a hash of the config and the inputs).

The core (:func:`iter_batches`) is pure: a :class:`CaptionIndex` in, rows out.
:func:`load_caption_index` / :func:`load_coco_index` stream the stores into
that index and :func:`build_batches` writes the rows shard by shard, so at most
``rows_per_shard`` rows are held beyond the index.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import time
from array import array
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataprep import clusters
from dataprep.errors import ConfigError
from dataprep.runtime import at_least, option
from dataprep.store import BATCHES_SCHEMA, CAPTIONS_SCHEMA, EDITS_SCHEMA, Manifest, check_shards, run_record_path, shard_paths, utcnow, write_run_record, write_table_atomic

# Paper, appendix Table 3: (images, prompts) per batch.
PRESETS: dict[str, tuple[int, int]] = {"sd3": (4, 4), "sdxl": (1, 16), "sd1.5": (4, 8)}

POSITIVE, HARD_NEGATIVE, NEGATIVE = "positive", "hard_negative", "negative"


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class BatchOptions:
    """What to build; the fields are `dataprep batches`' flags. Invalid values cannot be built.

    ``images`` / ``prompts`` override the preset's grid (``preset="custom"``
    needs both). ``hard_negatives``: at most this many edits per batch; None
    means as many as fit (``min(images, prompts - images)``).
    """

    preset: str = option("sd3", "Grid of paper Table 3: sd3 = 4 images x 4 prompts (4 pos, 12 neg), sdxl = 1 x 16 (1, 15), sd1.5 = 4 x 8 (4, 28); or custom with --images/--prompts.", panel="Grid")
    images: int | None = option(None, "Images per batch (overrides the preset's).", panel="Grid")
    prompts: int | None = option(None, "Prompts per batch, positives included (overrides the preset's); must be >= --images.", panel="Grid")
    hard_negatives: int | None = option(None, "At most K edits (hard negatives) per batch; default as many as fit: min(images, prompts - images).", panel="Grid")
    epochs: int = option(1, "Passes over the images; each image once per epoch, reshuffled each epoch.", panel="Run")
    drop_last: bool = option(True, "Drop the last partial batch of an epoch (fixed grid shape, default) or keep it with fewer images.", flag="--drop-last/--keep-last", panel="Run")
    seed: int = option(0, "Shuffle and negative-sampling seed; same inputs + seed give byte-identical shards.", panel="Run")
    rows_per_shard: int = option(1024, "Batches per Parquet shard (memory holds at most this many beyond the caption index).", panel="Run")
    # leave out images whose caption row has one of these image_flags
    drop_image_flags: tuple[str, ...] = option((), "Leave out images whose caption row has any of these image checks, comma-separated: small,blank,aspect (see `dataprep caption ... --min-side/--blank-std/--max-aspect`).", panel="Input")
    # hard negatives only from edits the judge graded good (OUT/judge)
    require_judge: bool = option(False, "Use only edits the judge graded good as hard negatives (run `dataprep judge` first).", panel="Quality")
    dedup: str = option("separate", "Duplicate clusters of `dataprep dedup`: separate (never two members of a cluster in one batch; default, when records exist), keep-one (one image per cluster), off.", panel="Quality")

    @property
    def grid(self) -> tuple[int, int]:
        """(images per batch, prompts per batch)."""
        base = PRESETS.get(self.preset, (None, None))
        # `is None`, not `or`: an explicit 0 must reach __post_init__'s check, not become the preset's value
        return (base[0] if self.images is None else self.images, base[1] if self.prompts is None else self.prompts)  # type: ignore[return-value]

    @property
    def label(self) -> str:
        """The preset name written into each row: the preset, or custom-NxM."""
        n, m = self.grid
        if self.preset in PRESETS and PRESETS[self.preset] == (n, m):
            return self.preset
        return f"custom-{n}x{m}"

    @property
    def max_hard_negatives(self) -> int:
        n, m = self.grid
        fit = min(n, m - n)
        return fit if self.hard_negatives is None else self.hard_negatives

    def __post_init__(self) -> None:
        if self.preset not in PRESETS and self.preset != "custom":
            raise ConfigError(f"unknown preset {self.preset!r}", "--preset", f"use one of {', '.join(PRESETS)} or custom with --images/--prompts")
        if self.preset == "custom" and (self.images is None or self.prompts is None):
            raise ConfigError("preset custom needs a grid", "--images/--prompts", "pass both, e.g. --images 4 --prompts 8")
        n, m = self.grid
        if n < 1:
            raise ConfigError(f"images per batch must be >= 1, got {n}", "--images", "pass a positive number")
        if m < n:
            raise ConfigError(f"{m} prompts cannot hold the positives of {n} images", "--prompts", f"pass --prompts >= {n} (each image needs its own caption in the batch)")
        if self.hard_negatives is not None:
            fit = min(n, m - n)
            if self.hard_negatives < 0 or self.hard_negatives > fit:
                raise ConfigError(
                    f"--hard-negatives {self.hard_negatives} does not fit a {n}x{m} grid (at most {fit}: one edit per image, {m - n} free prompt slots)",
                    "--hard-negatives",
                    f"pass 0..{fit}, or a grid with more prompts than images (e.g. --images {n} --prompts {2 * n})",
                )
        at_least(self.epochs, 1, "--epochs", "pass a positive number")
        at_least(self.rows_per_shard, 1, "--rows-per-shard", "pass a positive number")
        if self.drop_image_flags:
            from dataprep.imagecheck import parse_flags

            parse_flags(",".join(self.drop_image_flags))
        if self.dedup not in clusters.DEDUP_MODES:
            raise ConfigError(f"unknown --dedup mode {self.dedup!r}", "--dedup", f"use one of {', '.join(clusters.DEDUP_MODES)}")


# ---------------------------------------------------------------- the index


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
        is_error = pc.is_valid(t["error"])
        is_empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(t["caption"], "")), ""), True)
        bad = pc.or_(is_error, is_empty)
        n_error, n_bad = pc.sum(is_error).as_py() or 0, pc.sum(bad).as_py() or 0
        skipped["caption_error_rows"] += n_error
        skipped["caption_empty_rows"] += n_bad - n_error
        if n_bad:
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
        skipped["image_flagged"] = len(flagged)
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
        skipped["images_without_caption"] = len(bad_ids.difference(image_ids))
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
            # count and drop unusable rows in Arrow; only usable ones become Python objects
            is_error = pc.is_valid(b.column("error"))
            failed = pc.and_(pc.invert(is_error), pc.invert(pc.fill_null(b.column("passed"), False)))
            empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(b.column("target"), "")), ""), True)
            empty = pc.and_(empty, pc.invert(pc.or_(is_error, failed)))
            for name, mask in (("edit_error_rows", is_error), ("edit_failed_rows", failed), ("edit_empty_rows", empty)):
                sk[name] += pc.sum(mask).as_py() or 0
            b = b.filter(pc.invert(pc.or_(pc.or_(is_error, failed), empty)))
            cols = [b.column(c).to_pylist() for c in ("image_id", "source", "target")]
            for image_id, source, target, ts in zip(*cols, _ts(b.column("created_at"))):
                i = bisect.bisect_left(ids, image_id)
                if i == len(ids) or ids[i] != image_id:
                    sk["edit_without_caption"] += 1
                    continue
                src = (source or "").strip()
                k = next((k for k in range(index.starts[i], index.starts[i + 1]) if index.texts[k].strip() == src), None)
                if k is None:
                    sk["edit_stale"] += 1
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
            skipped["caption_empty_rows"] += 1
            continue
        if a.get("image_id") not in images:  # malformed or dangling annotation: count it, go on
            skipped["annotation_without_image"] += 1
            continue
        caps.setdefault(a["image_id"], [])
        if text not in caps[a["image_id"]]:  # a repeated caption would be its own negative
            caps[a["image_id"]].append(text)
    rows = []
    for image_id, file_name in images.items():
        if image_id not in caps:
            skipped["images_without_caption"] += 1
            continue
        path = root / file_name
        if not path.is_file():
            skipped["image_missing"] += 1
            continue
        rows.append((f"coco/{Path(file_name).stem}", str(path.resolve()), caps[image_id]))
    return make_index(rows, skipped)


# ---------------------------------------------------------------- the pure core


@dataclass
class BuildCounts:
    batches: int = 0
    positives: int = 0
    hard_negatives: int = 0
    negatives: int = 0
    dropped_images: int = 0  # left out by drop_last, summed over epochs
    unfillable_batches: int = 0  # not enough distinct captions to fill a grid
    duplicate_images: int = 0  # left over because their caption repeats one already in every open batch
    edits_unused: int = 0  # an edit equal to another text of its batch, or over --hard-negatives


def run_id_for(opts: BatchOptions, fingerprint: str) -> str:
    """Deterministic run id: preset + hash of options and the index fingerprint."""
    d = asdict(opts)
    # fields added after the first release count only when set, so a run built
    # without them keeps its id (and its shards stay "up to date" for the flows)
    for name, default in (("drop_image_flags", ()), ("require_judge", False), ("dedup", "separate")):
        if d[name] == default or (name == "drop_image_flags" and not d[name]):
            del d[name]
    payload = json.dumps([d, fingerprint], sort_keys=True)
    return f"{opts.label}-s{opts.seed}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _epoch_rng(seed: int, epoch: int, stream: str) -> random.Random:
    # str seeds are hashed with sha512: stable across Python versions and runs
    return random.Random(f"softrepa-batches/{seed}/{epoch}/{stream}")


def iter_batches(index: CaptionIndex, opts: BatchOptions, run_id: str = "run", counts: BuildCounts | None = None) -> Iterator[dict[str, Any]]:
    """Yield batch rows (BATCHES_SCHEMA dicts), epoch after epoch.

    Per epoch: the images are shuffled by ``(seed, epoch)``; an image whose
    positive would clash with its batch (same text as a caption already there)
    waits for the next batch, so every batch keeps its rules and every image
    still comes once. Positive of image ``i`` in epoch ``e`` is caption
    ``e mod n_i`` (COCO's rotation; a single caption otherwise).
    """
    n_img, n_prompt = opts.grid
    max_hard = opts.max_hard_negatives
    counts = counts if counts is not None else BuildCounts()
    N = len(index)
    for epoch in range(opts.epochs):
        order = list(range(N))
        _epoch_rng(opts.seed, epoch, "order").shuffle(order)
        rng = _epoch_rng(opts.seed, epoch, "negatives")

        def positive_at(i: int, epoch: int = epoch) -> int:
            return index.starts[i] + epoch % (index.starts[i + 1] - index.starts[i])

        def positive(i: int) -> str:
            return index.texts[positive_at(i)]

        stream = iter(order)
        pending: deque[int] = deque()
        b = 0
        while True:
            members: list[int] = []
            pos_texts: set[str] = set()
            all_caps: set[str] = set()
            groups_in: set[int] = set()  # duplicate groups already in the batch (dataprep.clusters)

            def fits(j: int) -> bool:
                if clusters.clash(index.groups, j, groups_in):
                    return False
                return norm_text(positive(j)) not in all_caps and not any(norm_text(c) in pos_texts for c in index.captions(j))

            def take(j: int) -> None:
                members.append(j)
                pos_texts.add(norm_text(positive(j)))
                all_caps.update(norm_text(c) for c in index.captions(j))
                clusters.mark(index.groups, j, groups_in)

            for _ in range(len(pending)):
                j = pending.popleft()
                if len(members) < n_img and fits(j):
                    take(j)
                else:
                    pending.append(j)
            exhausted = False
            while len(members) < n_img:
                j = next(stream, None)
                if j is None:
                    exhausted = True
                    break
                if fits(j):
                    take(j)
                else:
                    pending.append(j)
            if not members:
                break
            if len(members) < n_img and opts.drop_last:
                # what waits in pending clashes with the open batch: a repeated
                # caption, not an image the grid's shape left out
                counts.dropped_images += len(members)
                counts.duplicate_images += len(pending)
                break
            row = _fill(index, members, positive_at, n_prompt, max_hard, rng, counts)
            if row is None:
                counts.unfillable_batches += 1
                counts.dropped_images += len(members)
            else:
                counts.batches += 1
                row.update(batch_id=f"{run_id}-e{epoch:03d}-{b:07d}", preset=opts.label, seed=opts.seed, epoch=epoch)
                b += 1
                yield row
            if exhausted and not pending:
                break


def norm_text(text: str) -> str:
    """Texts that differ only in case or spacing are one prompt to the model
    (CLIP lowercases and re-tokenises), so they count as equal in a batch."""
    return " ".join(text.casefold().split())


def _fill(index: CaptionIndex, members: list[int], positive_at: Callable[[int], int], n_prompt: int, max_hard: int, rng: random.Random, counts: BuildCounts) -> dict[str, Any] | None:
    """Prompts for one batch, or None when the free slots cannot be filled."""
    prompts = [index.texts[positive_at(i)] for i in members]
    kinds = [POSITIVE] * len(members)
    owners = [index.image_ids[i] for i in members]
    used = set()
    for i in members:
        used.update(norm_text(c) for c in index.captions(i))  # no caption of a batch image is ever a negative
    # hard negatives: the positive caption's own edit
    for i in members:
        edit = index.edits[positive_at(i)]
        if edit is None:
            continue
        if len(prompts) >= n_prompt or kinds.count(HARD_NEGATIVE) >= max_hard or norm_text(edit) in used:
            counts.edits_unused += 1
            continue
        prompts.append(edit)
        kinds.append(HARD_NEGATIVE)
        owners.append(index.image_ids[i])
        used.add(norm_text(edit))
    # negatives: captions of images outside the batch, random with rejection,
    # then a full scan from a random start so a crowded index still fills
    need = n_prompt - len(prompts)
    inside = set(members)
    groups_in: set[int] = set()  # a negative's image must not duplicate any image of the batch, nor another negative's
    for i in members:
        clusters.mark(index.groups, i, groups_in)
    N = len(index)

    def add_negative(j: int, text: str) -> None:
        prompts.append(text)
        kinds.append(NEGATIVE)
        owners.append(index.image_ids[j])
        used.add(norm_text(text))
        clusters.mark(index.groups, j, groups_in)

    tries, max_tries = 0, 32 * need
    while need and tries < max_tries and N > len(inside):
        tries += 1
        j = rng.randrange(N)
        if j in inside or clusters.clash(index.groups, j, groups_in):
            continue
        caps = index.captions(j)
        text = caps[rng.randrange(len(caps))] if len(caps) > 1 else caps[0]
        if norm_text(text) in used:
            continue
        add_negative(j, text)
        need -= 1
    if need:
        start = rng.randrange(N) if N else 0
        for step in range(N):
            j = (start + step) % N
            if j in inside or clusters.clash(index.groups, j, groups_in):
                continue
            text = next((t for t in index.captions(j) if norm_text(t) not in used), None)
            if text is not None:
                add_negative(j, text)
                need -= 1
            if not need:
                break
    if need:
        return None
    counts.positives += len(members)
    counts.hard_negatives += kinds.count(HARD_NEGATIVE)
    counts.negatives += kinds.count(NEGATIVE)
    return {
        "image_ids": [index.image_ids[i] for i in members],
        "image_uris": [index.image_uris[i] for i in members],
        "prompts": prompts,
        "prompt_kinds": kinds,
        "prompt_image_ids": owners,
        "positive_index": list(range(len(members))),
    }


def check_fillable(index: CaptionIndex, opts: BatchOptions) -> None:
    """Fail before any work when no batch could ever be filled."""
    n, m = opts.grid
    if len(index) == 0:
        raise ConfigError("no image has a usable caption", "--captions", "caption some images first (see the skipped counts)")
    hard = min(opts.max_hard_negatives, index.n_edits())
    # identical texts (up to case and spacing) are one prompt: they can be
    # neither two positives of a batch nor a positive and its negative
    distinct = len({norm_text(t) for t in index.texts})
    if distinct < m - hard:
        dupes = len(index.texts) - distinct
        raise ConfigError(
            f"a {n}x{m} grid needs at least {m - hard} distinct captions, but the {len(index)} images have only "
            f"{distinct} distinct captions ({dupes} are duplicates of another caption, ignoring case and spacing)",
            "--captions/--preset",
            f"caption more distinct images, or choose a grid with at most {distinct + hard} prompts",
        )
    others = len(index) - n
    if others < m - n - hard:
        raise ConfigError(
            f"a {n}x{m} grid needs captions of at least {m - n - hard} images outside each batch, but only {len(index)} images have captions",
            "--preset/--prompts",
            f"caption more images or choose a grid with fewer prompts (at most {max(n, len(index) + hard)} here)",
        )


# ---------------------------------------------------------------- I/O shell


@dataclass
class BatchSummary:
    run_id: str
    preset: str
    grid: tuple[int, int]
    epochs: int
    images: int  # images in the index
    batches: int
    rows: int
    positives: int
    hard_negatives: int
    negatives: int
    dropped_images: int
    unfillable_batches: int
    duplicate_images: int
    edits_available: int
    edits_unused: int
    skipped: dict[str, int]
    shards: list[Path]
    out_dir: Path
    seconds: float
    other_runs: list[str] = field(default_factory=list)


def write_batches(index: CaptionIndex, out_dir: Path | str, opts: BatchOptions, progress: Callable[[int, int], None] | None = None, inputs: dict[str, Any] | None = None) -> BatchSummary:
    """Write the index's batches as ``part-<run_id>-<nnnnn>.parquet`` shards.

    Holds at most ``rows_per_shard`` rows beyond the index. Shards of the same
    run id (same options and inputs) are overwritten with identical bytes, so
    a rerun is idempotent; other runs' shards in the folder are left alone.
    ``progress(done, total)`` is called per written batch with the expected
    total number of batches.
    """
    from dataprep.stage import acquire_stage_lock
    from dataprep.store import check_writable

    check_fillable(index, opts)
    out = check_writable(out_dir)
    lock = acquire_stage_lock(out, flag="--out", fix="wait for that run to finish, or build into another --out folder")  # a second build into the same folder stops (exit 2) naming this one
    try:
        return _write_batches(index, out, opts, progress, inputs)
    finally:
        lock.__exit__(None, None, None)


def _write_batches(index: CaptionIndex, out: Path, opts: BatchOptions, progress: Callable[[int, int], None] | None, inputs: dict[str, Any] | None) -> BatchSummary:
    t0, started = time.perf_counter(), utcnow().isoformat()
    fingerprint = index.fingerprint()
    run_id = run_id_for(opts, fingerprint)
    # the completion record goes first and comes back last: a run killed while
    # rewriting its shards must not look finished to `softrepa train`
    run_record_path(out, run_id).unlink(missing_ok=True)
    counts = BuildCounts()
    n_img = opts.grid[0]
    per_epoch = len(index) // n_img if opts.drop_last else -(-len(index) // n_img)
    total = per_epoch * opts.epochs
    shards: list[Path] = []
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        if not buffer:
            return
        table = pa.Table.from_pydict({c: [r[c] for r in buffer] for c in BATCHES_SCHEMA.names}, schema=BATCHES_SCHEMA)
        path = out / f"part-{run_id}-{len(shards):05d}.parquet"
        write_table_atomic(table, path)
        shards.append(path)
        buffer.clear()

    for row in iter_batches(index, opts, run_id, counts):
        buffer.append(row)
        if len(buffer) >= opts.rows_per_shard:
            flush()
        if progress:
            progress(counts.batches, total)
    flush()
    # an earlier identical run cannot have more shards, but never leave a stray one
    for p in shard_paths(out):
        if p.name.startswith(f"part-{run_id}-") and p not in shards:
            p.unlink()
    others = sorted({p.name[len("part-") : -len("-00000.parquet")] for p in shard_paths(out)} - {run_id})
    summary = BatchSummary(
        run_id=run_id,
        preset=opts.label,
        grid=opts.grid,
        epochs=opts.epochs,
        images=len(index),
        batches=counts.batches,
        rows=counts.batches,
        positives=counts.positives,
        hard_negatives=counts.hard_negatives,
        negatives=counts.negatives,
        dropped_images=counts.dropped_images,
        unfillable_batches=counts.unfillable_batches,
        duplicate_images=counts.duplicate_images,
        edits_available=index.n_edits(),
        edits_unused=counts.edits_unused,
        skipped=dict(sorted(index.skipped.items())),
        shards=shards,
        out_dir=out,
        seconds=time.perf_counter() - t0,
        other_runs=others,
    )
    config = {"options": asdict(opts), "grid": list(opts.grid), "inputs": inputs or {}, "input_fingerprint": fingerprint}
    # a run's own config, beside its shards and free of timestamps (deterministic);
    # the "_" keeps pyarrow/pandas/datasets from reading it as a shard of the folder
    write_run_record(out, run_id, shards, preset=opts.label, **config, counts=_counts(summary))
    Manifest(stage="batches", config=config, run_id=run_id, counts=_counts(summary), failures=summary.skipped, started_at=started, finished_at=utcnow().isoformat()).write(out)
    return summary


def _counts(s: BatchSummary) -> dict[str, int]:
    return {
        "images": s.images,
        "batches": s.batches,
        "positives": s.positives,
        "hard_negatives": s.hard_negatives,
        "negatives": s.negatives,
        "dropped_images": s.dropped_images,
        "unfillable_batches": s.unfillable_batches,
        "duplicate_images": s.duplicate_images,
        "edits_available": s.edits_available,
        "edits_unused": s.edits_unused,
    }


def build_batches(captions_dir: Path | str, out_dir: Path | str, opts: BatchOptions, edits_dir: Path | str | None = None, progress: Callable[[int, int], None] | None = None, *, judge_dir: Path | str | None = None, dedup_dir: Path | str | None = None) -> BatchSummary:
    """Caption store (+ optional edit store) -> batch shards in ``out_dir``.

    The judge and dedup stores default to ``judge/`` beside the edit store and
    ``dedup/`` beside the caption store (see :func:`apply_quality`).
    """
    index = load_caption_index(captions_dir, opts.drop_image_flags)
    if edits_dir is not None:
        attach_edits(index, edits_dir)
    inputs = {"captions": str(captions_dir), "edits": None if edits_dir is None else str(edits_dir)}
    index = apply_quality(index, opts, inputs, judge_dir if judge_dir is not None or edits_dir is None else Path(edits_dir).parent / "judge", dedup_dir if dedup_dir is not None else Path(captions_dir).parent / "dedup")
    return write_batches(index, out_dir, opts, progress, inputs)


def apply_quality(index: CaptionIndex, opts: BatchOptions, inputs: dict[str, Any], judge_dir: Path | str | None, dedup_dir: Path | str | None) -> CaptionIndex:
    """The judge filter (``require_judge``) and the dedup rule (``dedup``) on ``index``.

    Records which stores were used in ``inputs`` (the run's config).
    """
    from dataprep.judge import require_judged

    if opts.require_judge:
        if judge_dir is None:
            raise ConfigError("--require-judge needs edits to filter", "--edits", "pass --edits OUT/edits (and run `dataprep judge --out OUT`)")
        index = require_judged(index, judge_dir)
        inputs["judge"] = str(judge_dir)
    if opts.dedup != "off" and dedup_dir is not None:
        index = clusters.attach_groups(index, dedup_dir, opts.dedup)
        if clusters.check_records(dedup_dir, opts.dedup):
            inputs["dedup"] = str(dedup_dir)
    return index


def build_coco_batches(coco_captions: Path | str, coco_images: Path | str, out_dir: Path | str, opts: BatchOptions, edits_dir: Path | str | None = None, progress: Callable[[int, int], None] | None = None, *, judge_dir: Path | str | None = None, dedup_dir: Path | str | None = None) -> BatchSummary:
    """COCO captions json + image folder (+ optional edit store) -> batch shards."""
    if opts.drop_image_flags:
        raise ConfigError("COCO captions carry no image checks", "--drop-image-flags", "use it with --captions OUT/captions (a `dataprep caption` run), or leave it out")
    index = load_coco_index(coco_captions, coco_images)
    if edits_dir is not None:
        attach_edits(index, edits_dir)
    inputs = {"coco_captions": str(coco_captions), "coco_images": str(coco_images), "edits": None if edits_dir is None else str(edits_dir)}
    # `dataprep dedup RUN --coco-captions ...` writes RUN/dedup: beside OUT/batches
    index = apply_quality(index, opts, inputs, judge_dir if judge_dir is not None or edits_dir is None else Path(edits_dir).parent / "judge", dedup_dir if dedup_dir is not None else Path(out_dir).parent / "dedup")
    return write_batches(index, out_dir, opts, progress, inputs)
