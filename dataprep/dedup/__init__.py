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

The package splits at the seams of that work: :mod:`~dataprep.dedup.options`
(what to find), :mod:`~dataprep.dedup.images` (hashing, near pairs),
:mod:`~dataprep.dedup.captions` (MinHash, LSH), :mod:`~dataprep.dedup.components`
(pairs -> clusters -> rows, pure) and :mod:`~dataprep.dedup.stage` (the run:
read the index, write the shards and the manifest).
"""

from dataprep.dedup.captions import caption_signatures, lsh_params, near_caption_pairs, shingles
from dataprep.dedup.components import Cluster, UnionFind, caption_clusters, cluster_rows, image_clusters
from dataprep.dedup.images import hash_images, image_fingerprint, near_image_pairs, phash64, popcount64
from dataprep.dedup.options import CAPTION, IMAGE, INSTALL_FIX, MINHASH, PHASH, SHA256, DedupOptions, require_libraries
from dataprep.dedup.stage import DedupSummary, run_dedup

__all__ = [
    "CAPTION", "IMAGE", "INSTALL_FIX", "MINHASH", "PHASH", "SHA256", "Cluster", "DedupOptions", "DedupSummary", "UnionFind",
    "caption_clusters", "caption_signatures", "cluster_rows", "hash_images", "image_clusters", "image_fingerprint", "lsh_params",
    "near_caption_pairs", "near_image_pairs", "phash64", "popcount64", "require_libraries", "run_dedup", "shingles",
]
