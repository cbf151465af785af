"""Captions: MinHash signatures of word shingles (in worker processes), near pairs by banded LSH."""

from __future__ import annotations

import multiprocessing as mp
import re
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from dataprep.dedup.options import DedupOptions


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
