"""What dedup finds and how hard it looks; the optional libraries it needs."""

from __future__ import annotations

from dataclasses import dataclass

from dataprep.errors import ConfigError
from dataprep.runtime import at_least, option

IMAGE, CAPTION = "image", "caption"
SHA256, PHASH, MINHASH = "sha256", "phash", "minhash"
INSTALL_FIX = 'pip install "softrepa-dataprep[quality]" (imagehash, datasketch)'


@dataclass(frozen=True)
class DedupOptions:
    """What to cluster; `dataprep dedup`'s flags are its fields. Invalid values cannot be built."""

    images: bool = option(True, "Cluster exact (sha256) and near-duplicate (perceptual hash) images.", flag="--images/--no-images")
    captions: bool = option(True, "Cluster near-duplicate caption texts (MinHash LSH).", flag="--texts/--no-texts")
    # phash Hamming bits (of 64) that still count as the same picture: resizing and
    # JPEG at quality 40 move 0-2 bits, a 2 px shift of a 160 px picture 2-8, and
    # generated distinct pictures differ by 18 or more
    image_distance: int = option(8, "Max Hamming distance (bits of a 64-bit phash) for two images to count as one.")
    # estimated Jaccard of word 3-grams: one changed word in a 75-word LLaVA caption
    # leaves ~0.92; two captions that share boilerplate but differ in object and
    # background fall to ~0.6 (and stay apart: they are each other's good negatives)
    caption_threshold: float = option(0.85, "Min estimated Jaccard similarity (word shingles) for two captions to count as one.")
    num_perm: int = option(128, "MinHash permutations per caption (memory: 4 bytes each).")
    shingle: int = option(3, "Words per shingle.")
    workers: int = option(2, "Hashing processes for images and caption signatures (0 = in this process).")
    max_pixels: int = 64_000_000  # larger images are error rows (decompression-bomb guard)
    seed: int = 1  # MinHash permutation seed (datasketch's default)
    rows_per_shard: int = 65536

    def __post_init__(self) -> None:
        if not (self.images or self.captions):
            raise ConfigError("nothing to deduplicate: --no-images and --no-texts both given", "--no-images/--no-texts", "drop one of them")
        if not 0 <= self.image_distance <= 32:
            raise ConfigError(f"--image-distance {self.image_distance} is outside 0..32 (bits of a 64-bit hash)", "--image-distance", "e.g. 6; 0 finds only pixel-identical thumbnails")
        if not 0.0 < self.caption_threshold <= 1.0:
            raise ConfigError(f"--caption-threshold {self.caption_threshold} is outside (0, 1]", "--caption-threshold", "e.g. 0.8")
        if not 16 <= self.num_perm <= 1024:
            raise ConfigError(f"--num-perm {self.num_perm} is outside 16..1024", "--num-perm", "e.g. 128")
        at_least(self.shingle, 1, "--shingle", "e.g. 3 (words)")
        at_least(self.workers, 0, "--workers", "0 hashes in this process; e.g. 2")
        at_least(self.rows_per_shard, 1, "--rows-per-shard", "e.g. 65536")


def require_libraries(opts: DedupOptions) -> None:
    """ConfigError with the install line unless the libraries the options need import."""
    for needed, module in ((opts.images, "imagehash"), (opts.captions, "datasketch")):
        if not needed:
            continue
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"{module} is not installed", "--no-images" if module == "imagehash" else "--no-texts", INSTALL_FIX) from None
