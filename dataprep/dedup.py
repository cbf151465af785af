"""Duplicate images and captions of a run: ``dataprep dedup RUN`` -> ``RUN/dedup``.

Two near-identical images (or captions) in one contrastive batch make a
positive look like a negative. This stage finds them and records clusters:

- **images, exact**: equal sha256 of the file bytes;
- **images, near**: perceptual hash (``imagehash.phash``, 64 bits, the DCT of
  a 32x32 grey thumbnail) within ``image_distance`` Hamming bits: survives
  resizing, JPEG recompression and small shifts. Candidate pairs come from
  multi-index hashing (the 64 bits cut into ``image_distance + 1`` bands; two
  hashes within that distance agree exactly on at least one band), so no
  all-pairs comparison is made;
- **captions, near**: MinHash signatures (``datasketch``) of word shingles,
  banded LSH for candidates (``datasketch``'s band/row choice for the
  threshold, weighted towards recall), each candidate pair verified by its
  estimated Jaccard. For COCO every caption is an item of its image.

Clusters are the connected components of the verified pairs. The
representative of an image cluster is its largest image (most pixels, then
the smallest id); of a caption cluster the smallest id. Only members of
clusters of two or more are written (``DEDUP_SCHEMA``), plus an error row per
image that could not be read. Each run replaces the previous records (the
answer depends on the whole set, not on one row).

Memory is bounded by the number of items, never by pixels: images stream
through worker processes (at most ``workers * 4`` chunks in flight) and leave
a 64-bit hash and a size each; a caption leaves a ``num_perm`` x 4-byte
signature (also computed in the workers). A phash sees a 32x32 thumbnail: a
shift beyond 1-2 % of the side, a crop or a mirror image is a new picture to it. ``bench/cpu_dedup.py`` prints the figures.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import re
import time
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from dataprep.errors import ConfigError, Reason, failure, read_failure, reason_of
from dataprep.stage import acquire_stage_lock
from dataprep.store import DEDUP_SCHEMA, Manifest, ShardWriter, new_run_id, shard_paths, utcnow

IMAGE, CAPTION = "image", "caption"
SHA256, PHASH, MINHASH = "sha256", "phash", "minhash"
INSTALL_FIX = 'pip install "softrepa-dataprep[quality]" (imagehash, datasketch)'


@dataclass(frozen=True)
class DedupOptions:
    """CLI flags map one-to-one to these fields."""

    images: bool = True
    captions: bool = True
    # phash Hamming bits (of 64) that still count as the same picture: resizing and
    # JPEG at quality 40 move 0-2 bits, a 2 px shift of a 160 px picture 2-8, and
    # generated distinct pictures differ by 18 or more
    image_distance: int = 8
    # estimated Jaccard of word 3-grams: one changed word in a 75-word LLaVA caption
    # leaves ~0.92; two captions that share boilerplate but differ in object and
    # background fall to ~0.6 (and stay apart: they are each other's good negatives)
    caption_threshold: float = 0.85
    num_perm: int = 128  # MinHash permutations per caption
    shingle: int = 3  # words per shingle
    workers: int = 2  # hashing processes for images and caption signatures (0: in this process)
    max_pixels: int = 64_000_000  # larger images are error rows (decompression-bomb guard)
    seed: int = 1  # MinHash permutation seed (datasketch's default)
    rows_per_shard: int = 65536

    def validate(self) -> "DedupOptions":
        if not (self.images or self.captions):
            raise ConfigError("nothing to deduplicate: --no-images and --no-texts both given", "--no-images/--no-texts", "drop one of them")
        if not 0 <= self.image_distance <= 32:
            raise ConfigError(f"--image-distance {self.image_distance} is outside 0..32 (bits of a 64-bit hash)", "--image-distance", "e.g. 6; 0 finds only pixel-identical thumbnails")
        if not 0.0 < self.caption_threshold <= 1.0:
            raise ConfigError(f"--caption-threshold {self.caption_threshold} is outside (0, 1]", "--caption-threshold", "e.g. 0.8")
        if not 16 <= self.num_perm <= 1024:
            raise ConfigError(f"--num-perm {self.num_perm} is outside 16..1024", "--num-perm", "e.g. 128")
        if self.shingle < 1:
            raise ConfigError(f"--shingle {self.shingle} is less than 1", "--shingle", "e.g. 3 (words)")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} is negative", "--workers", "0 hashes in this process; e.g. 2")
        if self.rows_per_shard < 1:
            raise ConfigError(f"--rows-per-shard {self.rows_per_shard} is less than 1", "--rows-per-shard", "e.g. 65536")
        return self


def require_libraries(opts: DedupOptions) -> None:
    """ConfigError with the install line unless the libraries the options need import."""
    for needed, module in ((opts.images, "imagehash"), (opts.captions, "datasketch")):
        if not needed:
            continue
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"{module} is not installed", "--no-images" if module == "imagehash" else "--no-texts", INSTALL_FIX) from None


# ------------------------------------------------------------ union-find (pure)


class UnionFind:
    """Disjoint sets over 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = int(p[i])
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def components(self) -> list[list[int]]:
        """Sets of two or more, each sorted, in order of their smallest member."""
        groups: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            groups.setdefault(self.find(i), []).append(i)
        return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


# ------------------------------------------------------------ images (pure but for I/O)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1).astype(np.int64)


def phash64(img: Any) -> int:
    """The 64-bit perceptual hash of a PIL image as an int (imagehash.phash, hash_size 8)."""
    import imagehash

    bits = imagehash.phash(img, hash_size=8).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def image_fingerprint(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(sha256 of the bytes, 64-bit phash, pixels) of one encoded image; ValueError names the reason.

    JPEGs decode at a reduced scale (``draft``): the hash only sees a 32x32
    thumbnail, and a full decode of a 12 MP photo costs ~20x more. The EXIF
    orientation is applied, so a rotated-by-tag copy hashes like its original.
    """
    from dataprep.images import decode

    digest = hashlib.sha256(data).hexdigest()
    # header checks (empty, not an image, too many pixels, corrupt) as the caption stage makes them
    img = decode(data, max_pixels, draft=("L", (64, 64)))
    return digest, phash64(img), _stored_pixels(data)


def _stored_pixels(data: bytes) -> int:
    """Pixels of the stored image (its header), not of the reduced draft the hash saw."""
    from PIL import Image

    from dataprep.images import _no_pil_bomb_guard

    with _no_pil_bomb_guard(), Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    return w * h


def _hash_chunk(items: list[tuple[int, str, bytes | None]], max_pixels: int) -> list[tuple[int, str | None, int, int, str | None]]:
    """Worker: (position, sha256, phash, pixels, error) for each (position, uri, bytes)."""
    from dataprep.sources import ImageRef, read_bytes

    out = []
    for pos, uri, data in items:
        try:
            raw = data if data is not None else read_bytes(ImageRef(image_id="", source="", uri=uri))
        except Exception as exc:  # a missing file or a bad zip member is one error row, not a dead run
            out.append((pos, None, 0, 0, read_failure(exc)))
            continue
        try:
            sha, ph, px = image_fingerprint(raw, max_pixels)
            out.append((pos, sha, ph, px, None))
        except ValueError as exc:
            out.append((pos, None, 0, 0, str(exc)))
        except Exception as exc:  # an image Pillow chokes on in an unexpected way
            out.append((pos, None, 0, 0, failure(Reason.CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}")))
    return out


def hash_images(uris: list[str | None], opts: DedupOptions, data: list[bytes | None] | None = None, progress: Callable[[int], None] | None = None, chunk: int = 32) -> tuple[np.ndarray, list[str | None], np.ndarray, list[str | None]]:
    """(phash uint64 [N], sha256 [N], pixels int64 [N], error [N]) for images by uri (or bytes).

    Chunks of ``chunk`` images go to ``opts.workers`` spawned processes with
    at most ``4 * workers`` chunks in flight, so memory holds a few dozen
    encoded images at a time whatever N is.
    """
    n = len(uris)
    hashes = np.zeros(n, dtype=np.uint64)
    pixels = np.zeros(n, dtype=np.int64)
    shas: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    work = [(i, uris[i] or "", data[i] if data is not None else None) for i in range(n)]
    chunks = [work[k : k + chunk] for k in range(0, n, chunk)]

    def take(results: list[tuple[int, str | None, int, int, str | None]]) -> None:
        for pos, sha, ph, px, err in results:
            shas[pos], hashes[pos], pixels[pos], errors[pos] = sha, np.uint64(ph), px, err
        if progress:
            progress(len(results))

    if opts.workers == 0 or len(chunks) <= 1:
        for c in chunks:
            take(_hash_chunk(c, opts.max_pixels))
        return hashes, shas, pixels, errors
    # spawn: workers never inherit the parent's torch state
    with ProcessPoolExecutor(max_workers=opts.workers, mp_context=mp.get_context("spawn")) as pool:
        pending: deque[Future] = deque()
        for c in chunks:
            pending.append(pool.submit(_hash_chunk, c, opts.max_pixels))
            if len(pending) >= 4 * opts.workers:
                take(pending.popleft().result())
        while pending:
            take(pending.popleft().result())
    return hashes, shas, pixels, errors


def near_image_pairs(hashes: np.ndarray, max_distance: int, valid: np.ndarray | None = None, block: int = 1024) -> Iterator[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)``, i < j, of 64-bit hashes within ``max_distance`` bits.

    Multi-index hashing: the 64 bits are cut into ``max_distance + 1`` bands;
    by pigeonhole two hashes within the distance agree on at least one band,
    so only hashes sharing a band value are compared (a pair sharing several
    bands is yielded once per band; callers union, so repeats are harmless).
    ``valid`` masks out items without a hash.
    """
    idx_all = np.arange(len(hashes)) if valid is None else np.flatnonzero(valid)
    h = hashes[idx_all]
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = order[s:e]
            for a in range(0, len(members), block):  # bounded: block x run comparisons at once
                rows = members[a : a + block]
                d = popcount64(h[rows][:, None] ^ h[members][None, :])
                ii, jj = np.nonzero(d <= max_distance)
                for x, y in zip(ii, jj):
                    i, j = int(idx_all[rows[x]]), int(idx_all[members[y]])
                    if i < j:
                        yield i, j, int(d[x, y])


# ------------------------------------------------------------ captions (pure)


_WORD = re.compile(r"\w+", re.UNICODE)


def shingles(text: str, n: int) -> list[bytes]:
    """Word n-grams of the case-folded text (the whole text when shorter than n words)."""
    words = _WORD.findall((text or "").casefold())
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def _signature_chunk(texts: list[str], num_perm: int, seed: int, shingle: int) -> np.ndarray:
    """Worker: MinHash signatures ``[len(texts), num_perm]`` uint32."""
    from datasketch import MinHash

    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    base = MinHash(num_perm=num_perm, seed=seed)  # permutations made once, copied per text
    for i, t in enumerate(texts):
        m = base.copy()
        m.update_batch(shingles(t, shingle))
        out[i] = m.hashvalues  # datasketch's hash values fit 32 bits
    return out


def caption_signatures(texts: Iterable[str], opts: DedupOptions, progress: Callable[[int], None] | None = None, chunk: int = 4096) -> np.ndarray:
    """MinHash signatures ``[N, num_perm]`` uint32, by ``opts.workers`` processes in chunks of ``chunk`` texts."""
    texts = list(texts)
    out = np.empty((len(texts), opts.num_perm), dtype=np.uint32)
    starts = list(range(0, len(texts), chunk))
    args = (opts.num_perm, opts.seed, opts.shingle)
    if opts.workers == 0 or len(starts) <= 1:
        for k in starts:
            out[k : k + chunk] = _signature_chunk(texts[k : k + chunk], *args)
            if progress:
                progress(len(out[k : k + chunk]))
        return out
    with ProcessPoolExecutor(max_workers=opts.workers, mp_context=mp.get_context("spawn")) as pool:
        pending: deque[tuple[int, Future]] = deque()

        def take() -> None:
            k, fut = pending.popleft()
            sig = fut.result()
            out[k : k + len(sig)] = sig
            if progress:
                progress(len(sig))

        for k in starts:
            pending.append((k, pool.submit(_signature_chunk, texts[k : k + chunk], *args)))
            if len(pending) >= 2 * opts.workers:
                take()
        while pending:
            take()
    return out


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH picks for this threshold.

    Every candidate is verified, so a false candidate costs a comparison and
    a missed pair costs a duplicate in the data: the choice weighs misses 9x
    (datasketch's default 1:1 gave b=8, r=16 at 0.85 and found 85 of 200
    planted pairs of Jaccard 0.91 in ``bench/cpu_dedup.py``; 9:1 gives b=11,
    r=11 and finds all 200).
    """
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


def near_caption_pairs(sigs: np.ndarray, threshold: float, bands: int, rows: int, verify_all: int = 4096, block: int = 64) -> Iterator[tuple[int, int, float]]:
    """Verified pairs ``(i, j, estimated Jaccard)``, i < j, from banded LSH over ``sigs``.

    Each band of ``rows`` signature values is folded into one 64-bit key;
    items sharing a key in any band are candidates. Within a bucket, equal
    signatures are paired at once (the same text up to case and punctuation),
    then the distinct ones are verified pair by pair in blocks of ``block``
    rows. Captions that share boilerplate ("The image features ...") fill
    buckets with unrelated texts, so checking against one member would miss
    true pairs; only a bucket of more than ``verify_all`` distinct signatures
    (a degenerate input) is verified against its first member alone.
    """
    n = len(sigs)
    rng = np.random.default_rng(0x5EED)
    mult = rng.integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    for b in range(bands):
        part = sigs[:, b * rows : (b + 1) * rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            key = (part * mult).sum(axis=1, dtype=np.uint64)  # wraps mod 2^64: a hash, collisions verified below
        del part
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if n else np.array([], dtype=int)
        ends = np.r_[starts[1:], n] if n else starts
        need = threshold * sigs.shape[1] - 1e-9  # agreeing values a pair needs
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = np.sort(order[s:e])
            if e - s <= block:  # the common case: one small comparison, no bookkeeping
                d = sigs[members]
                agree = (d[:, None, :] == d[None, :, :]).sum(axis=2)
                ii, jj = np.nonzero(np.triu(agree >= need, k=1))
                for x, y in zip(ii, jj):
                    yield int(members[x]), int(members[y]), float(agree[x, y]) / sigs.shape[1]
                continue
            _, first, inverse = np.unique(sigs[members], axis=0, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
            for x in np.flatnonzero(first[inverse] != np.arange(len(members))):
                yield int(members[first[inverse[x]]]), int(members[x]), 1.0
            distinct = members[np.sort(first)]
            if len(distinct) < 2:
                continue
            if len(distinct) > verify_all:
                sim = (sigs[distinct[1:]] == sigs[distinct[0]]).mean(axis=1)
                for y in np.flatnonzero(sim >= threshold):
                    yield int(distinct[0]), int(distinct[1 + y]), float(sim[y])
                continue
            d = sigs[distinct]
            for a in range(0, len(distinct), block):
                sim = (d[a : a + block, None, :] == d[None, :, :]).mean(axis=2)  # [block, m]
                ii, jj = np.nonzero(sim >= threshold)
                for x, y in zip(ii, jj):
                    if a + x < y:
                        yield int(distinct[a + x]), int(distinct[y]), float(sim[x, y])


# ------------------------------------------------------------ clusters (pure)


@dataclass
class Cluster:
    kind: str
    members: list[int]  # positions into the item list
    representative: int


def image_clusters(ids: list[str], hashes: np.ndarray, shas: list[str | None], pixels: np.ndarray, errors: list[str | None], max_distance: int) -> list[Cluster]:
    """Exact (sha256) and near (phash) image clusters; representative: most pixels, then smallest id."""
    n = len(ids)
    valid = np.array([e is None for e in errors], dtype=bool)
    uf = UnionFind(n)
    first_by_sha: dict[str, int] = {}
    for i, sha in enumerate(shas):
        if sha is not None and valid[i]:
            j = first_by_sha.setdefault(sha, i)
            if j != i:
                uf.union(i, j)
    for i, j, _ in near_image_pairs(hashes, max_distance, valid):
        uf.union(i, j)
    return [Cluster(IMAGE, g, min(g, key=lambda i: (-int(pixels[i]), ids[i]))) for g in uf.components()]


def caption_clusters(ids: list[str], sigs: np.ndarray, threshold: float, bands: int, rows: int) -> list[Cluster]:
    """Near-duplicate caption clusters; representative: the smallest id."""
    uf = UnionFind(len(ids))
    for i, j, _ in near_caption_pairs(sigs, threshold, bands, rows):
        uf.union(i, j)
    return [Cluster(CAPTION, g, min(g, key=lambda i: ids[i])) for g in uf.components()]


def cluster_rows(c: Cluster, ids: list[str], run_id: str, *, hashes: np.ndarray | None = None, shas: list[str | None] | None = None, sigs: np.ndarray | None = None, names: list[str] | None = None) -> list[dict[str, Any]]:
    """DEDUP_SCHEMA rows of one cluster; distance and method relative to its representative.

    ``ids`` are the item ids (the image each item belongs to); ``names`` (default
    ``ids``) name the representative in the cluster id: ``image_id#k`` for the
    k-th of several captions of one image (COCO), so two caption clusters never share an id.
    """
    rep = c.representative
    names = names or ids
    now = utcnow()
    rows = []
    for m in c.members:
        if c.kind == IMAGE:
            same = shas is not None and shas[m] is not None and shas[m] == shas[rep]
            method = SHA256 if same else PHASH
            distance = 0.0 if same else float(popcount64(np.array([hashes[m] ^ hashes[rep]], dtype=np.uint64))[0])
        else:
            method = MINHASH
            distance = 0.0 if m == rep else float(1.0 - (sigs[m] == sigs[rep]).mean())
        rows.append({"kind": c.kind, "item_id": ids[m], "cluster_id": f"{c.kind}:{names[rep]}", "representative": m == rep, "method": method, "distance": distance, "run_id": run_id, "created_at": now, "error": None})
    return rows


# ------------------------------------------------------------ the stage


@dataclass
class DedupSummary:
    out_dir: Path
    run_id: str
    images: int = 0
    image_errors: Counter = field(default_factory=Counter)
    image_clusters: int = 0
    images_in_clusters: int = 0
    exact_image_duplicates: int = 0  # members equal to their representative's bytes (representatives excluded)
    captions: int = 0
    caption_clusters: int = 0
    captions_in_clusters: int = 0
    lsh: tuple[int, int] | None = None  # (bands, rows) for the caption threshold
    seconds: float = 0.0
    shards: list[Path] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "images": self.images,
            "image_errors": sum(self.image_errors.values()),
            "image_clusters": self.image_clusters,
            "images_in_clusters": self.images_in_clusters,
            "images_removed_by_keep_one": self.images_in_clusters - self.image_clusters,
            "exact_image_duplicates": self.exact_image_duplicates,
            "captions": self.captions,
            "caption_clusters": self.caption_clusters,
            "captions_in_clusters": self.captions_in_clusters,
            "captions_removed_by_keep_one": self.captions_in_clusters - self.caption_clusters,
        }


def run_dedup(
    run_dir: Path | str,
    opts: DedupOptions = DedupOptions(),
    *,
    captions_dir: Path | str | None = None,
    coco_captions: Path | str | None = None,
    coco_images: Path | str | None = None,
    out_dir: Path | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DedupSummary:
    """Cluster the images and captions of ``RUN/captions`` (or a COCO captions file) into ``RUN/dedup``.

    Items are the images with a usable caption and their captions, exactly
    the index the batch builder uses (the newest good caption per image; for
    COCO every caption of an image). ``progress(what, done, total)`` is
    called as images and captions are hashed.
    """
    from dataprep.batches import load_caption_index, load_coco_index

    opts.validate()
    require_libraries(opts)
    t0, started = time.perf_counter(), utcnow().isoformat()
    run = Path(run_dir)
    if coco_captions is not None:
        if coco_images is None:
            raise ConfigError("--coco-captions needs the image folder", "--coco-images", "pass the train2017/ folder")
        index = load_coco_index(coco_captions, coco_images)
        source = {"coco_captions": str(coco_captions), "coco_images": str(coco_images)}
    else:
        captions_dir = Path(captions_dir) if captions_dir is not None else run / "captions"
        if not shard_paths(captions_dir):
            raise ConfigError(f"no caption shards in {captions_dir}", "RUN", "pass the --out folder of a `dataprep caption` run (or --captions DIR, or --coco-captions FILE)")
        index = load_caption_index(captions_dir)
        source = {"captions": str(captions_dir)}
    out = Path(out_dir) if out_dir is not None else run / "dedup"
    ids = list(index.image_ids)
    # one entry per caption: the image it belongs to, and a name unique per caption
    cap_ids: list[str] = []
    cap_names: list[str] = []
    for i, image_id in enumerate(ids):
        n = index.starts[i + 1] - index.starts[i]
        cap_ids += [image_id] * n
        cap_names += [image_id] if n == 1 else [f"{image_id}#{k}" for k in range(n)]
    run_id = new_run_id()
    summary = DedupSummary(out_dir=out, run_id=run_id)
    # one dedup run per folder: a second one would delete the first's shards as "old"
    lock = acquire_stage_lock(out, flag="RUN", fix="wait for the other `dataprep dedup` of this run to finish")
    try:
        old = shard_paths(out)
        writer = ShardWriter(out, DEDUP_SCHEMA, run_id, opts.rows_per_shard)

        def tick(what: str, total: int) -> Callable[[int], None]:
            done = [0]

            def step(k: int) -> None:
                done[0] += k
                if progress:
                    progress(what, done[0], total)

            return step

        with writer:
            if opts.images:
                hashes, shas, pixels, errors = hash_images(index.image_uris, opts, progress=tick("images", len(ids)))
                summary.images = len(ids)
                for i, e in enumerate(errors):
                    if e is not None:
                        summary.image_errors[reason_of(e)] += 1
                        writer.add({"kind": IMAGE, "item_id": ids[i], "run_id": run_id, "created_at": utcnow(), "error": e})
                for c in image_clusters(ids, hashes, shas, pixels, errors, opts.image_distance):
                    rows = cluster_rows(c, ids, run_id, hashes=hashes, shas=shas)
                    summary.image_clusters += 1
                    summary.images_in_clusters += len(rows)
                    summary.exact_image_duplicates += sum(r["method"] == SHA256 and not r["representative"] for r in rows)
                    for r in rows:
                        writer.add(r)
                del hashes, shas, pixels, errors
            if opts.captions:
                sigs = caption_signatures(index.texts, opts, progress=tick("captions", len(cap_ids)))
                summary.captions = len(cap_ids)
                bands, rows_per_band = lsh_params(opts.caption_threshold, opts.num_perm)
                summary.lsh = (bands, rows_per_band)
                for c in caption_clusters(cap_names, sigs, opts.caption_threshold, bands, rows_per_band):
                    rows = cluster_rows(c, cap_ids, run_id, sigs=sigs, names=cap_names)
                    summary.caption_clusters += 1
                    summary.captions_in_clusters += len(rows)
                    for r in rows:
                        writer.add(r)
                del sigs
        summary.shards = list(writer.written)
        # the records describe the whole set: the previous run's are replaced, never merged
        for p in old:
            if p not in summary.shards:
                p.unlink()
        summary.seconds = time.perf_counter() - t0
        config = {"options": asdict(opts), **source, "lsh_bands_rows": list(summary.lsh) if summary.lsh else None}
        Manifest(stage="dedup", config=config, run_id=run_id, counts=summary.counts(), failures=dict(summary.image_errors), started_at=started, finished_at=utcnow().isoformat()).write(out)
        return summary
    finally:
        lock.__exit__(None, None, None)
