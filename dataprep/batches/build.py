"""The pure builder: a :class:`~dataprep.batches.index.CaptionIndex` and options in, batch rows out.

No I/O. :func:`iter_batches` yields the rows and returns its
:class:`BuildCounts` (``counts = yield from iter_batches(...)``, or
:func:`batch_rows` for both at once); the same index, options and seed give
the same rows.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generator

from dataprep import clusters
from dataprep.batches.index import CaptionIndex
from dataprep.batches.options import BatchOptions
from dataprep.errors import ConfigError

POSITIVE, HARD_NEGATIVE, NEGATIVE = "positive", "hard_negative", "negative"


@dataclass
class BuildCounts:
    """What the builder did: batches, prompts by kind, and the images it could not place."""

    batches: int = 0
    prompts: Counter = field(default_factory=Counter)  # prompts written, by kind (POSITIVE, HARD_NEGATIVE, NEGATIVE)
    dropped_images: int = 0  # left out by drop_last, summed over epochs
    unfillable_batches: int = 0  # not enough distinct captions to fill a grid
    duplicate_images: int = 0  # left over because their caption repeats one already in every open batch
    edits_unused: int = 0  # an edit equal to another text of its batch, or over --hard-negatives

    def add(self, row: dict[str, Any]) -> None:
        """Count a filled batch row."""
        self.batches += 1
        self.prompts.update(row["prompt_kinds"])

    @property
    def positives(self) -> int:
        return self.prompts[POSITIVE]

    @property
    def hard_negatives(self) -> int:
        return self.prompts[HARD_NEGATIVE]

    @property
    def negatives(self) -> int:
        return self.prompts[NEGATIVE]


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


def iter_batches(index: CaptionIndex, opts: BatchOptions, run_id: str = "run") -> Generator[dict[str, Any], None, BuildCounts]:
    """Yield batch rows (BATCHES_SCHEMA dicts), epoch after epoch; return the counts.

    Per epoch: the images are shuffled by ``(seed, epoch)``; an image whose
    positive would clash with its batch (same text as a caption already there)
    waits for the next batch, so every batch keeps its rules and every image
    still comes once. Positive of image ``i`` in epoch ``e`` is caption
    ``e mod n_i`` (COCO's rotation; a single caption otherwise).
    """
    n_img, n_prompt = opts.grid
    max_hard = opts.max_hard_negatives
    counts = BuildCounts()
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
            row, unused = _fill(index, members, positive_at, n_prompt, max_hard, rng)
            counts.edits_unused += unused
            if row is None:
                counts.unfillable_batches += 1
                counts.dropped_images += len(members)
            else:
                counts.add(row)
                row.update(batch_id=f"{run_id}-e{epoch:03d}-{b:07d}", preset=opts.label, seed=opts.seed, epoch=epoch)
                b += 1
                yield row
            if exhausted and not pending:
                break
    return counts


def batch_rows(index: CaptionIndex, opts: BatchOptions, run_id: str = "run") -> tuple[list[dict[str, Any]], BuildCounts]:
    """All rows of :func:`iter_batches` and its counts (for small indexes and tests)."""
    rows: list[dict[str, Any]] = []
    counts = yield_into(iter_batches(index, opts, run_id), rows.append)
    return rows, counts


def yield_into(rows: Generator[dict[str, Any], None, BuildCounts], sink: Callable[[dict[str, Any]], None]) -> BuildCounts:
    """Feed every row to ``sink``; return the generator's counts."""
    while True:
        try:
            sink(next(rows))
        except StopIteration as done:
            return done.value


def norm_text(text: str) -> str:
    """Texts that differ only in case or spacing are one prompt to the model
    (CLIP lowercases and re-tokenises), so they count as equal in a batch."""
    return " ".join(text.casefold().split())


def _fill(index: CaptionIndex, members: list[int], positive_at: Callable[[int], int], n_prompt: int, max_hard: int, rng: random.Random) -> tuple[dict[str, Any] | None, int]:
    """Prompts for one batch (None when the free slots cannot be filled), and
    how many of its images' edits were left unused."""
    unused = 0
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
            unused += 1
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
        return None, unused
    return {
        "image_ids": [index.image_ids[i] for i in members],
        "image_uris": [index.image_uris[i] for i in members],
        "prompts": prompts,
        "prompt_kinds": kinds,
        "prompt_image_ids": owners,
        "positive_index": list(range(len(members))),
    }, unused


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
