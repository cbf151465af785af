"""Verified pairs -> clusters (connected components, union-find) -> DEDUP_SCHEMA rows. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dataprep.store import utcnow
from dataprep.dedup.captions import near_caption_pairs
from dataprep.dedup.images import near_image_pairs, popcount64
from dataprep.dedup.options import CAPTION, IMAGE, MINHASH, PHASH, SHA256


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
