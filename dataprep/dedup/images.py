"""Images: sha256 and a 64-bit perceptual hash each (in worker processes), near pairs by multi-index hashing."""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from dataprep.errors import Reason, failure, read_failure
from dataprep.dedup.options import DedupOptions
from dataprep.images import _no_pil_bomb_guard, decode
from dataprep.sources import ImageRef, read_bytes


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
    digest = hashlib.sha256(data).hexdigest()
    # header checks (empty, not an image, too many pixels, corrupt) as the caption stage makes them
    img = decode(data, max_pixels, draft=("L", (64, 64)))
    return digest, phash64(img), _stored_pixels(data)


def _stored_pixels(data: bytes) -> int:
    """Pixels of the stored image (its header), not of the reduced draft the hash saw."""
    from PIL import Image

    with _no_pil_bomb_guard(), Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    return w * h


def _hash_chunk(items: list[tuple[int, str, bytes | None]], max_pixels: int) -> list[tuple[int, str | None, int, int, str | None]]:
    """Worker: (position, sha256, phash, pixels, error) for each (position, uri, bytes)."""
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
