"""The dedup run: the run's index in, cluster rows and a manifest out (``RUN/dedup``)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dataprep.batches import load_caption_index, load_coco_index
from dataprep.errors import ConfigError, reason_of
from dataprep.stage import acquire_stage_lock
from dataprep.store import DEDUP_SCHEMA, Manifest, ShardWriter, new_run_id, shard_paths, utcnow
from dataprep.dedup.captions import caption_signatures, lsh_params
from dataprep.dedup.components import caption_clusters, cluster_rows, image_clusters
from dataprep.dedup.images import hash_images
from dataprep.dedup.options import IMAGE, SHA256, DedupOptions, require_libraries


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
