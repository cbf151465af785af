"""Helpers for the softrepa tests: batch shards, small PNGs, prompts.

Tiny pipelines come from :mod:`tests.tiny_models` (the ``tiny_pipelines``
fixture; the function is re-exported here for the tests that call it).
"""

from __future__ import annotations

from pathlib import Path

from tests.tiny_models import tiny_pipelines  # noqa: F401  (re-exported: one builder for every test)


def write_pngs(folder: Path, n: int, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """``n`` small, distinct, non-square RGB PNGs (so resize + crop is exercised)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        p = folder / f"img{i:02d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def write_batch_shards(folder: Path, preset: str, uris: list[str], prompts: list[str], n_rows: int,
                       n_images: int, n_prompts: int, bad_uri_rows: tuple[int, ...] = ()) -> list[Path]:
    """Batch rows in ``BATCHES_SCHEMA`` written with ``ShardWriter`` (2 rows per shard).

    Row r takes images ``r*n_images ...`` (cycling) and, as its prompts, the
    images' own captions first (positives, ``positive_index = 0..B-1``) then
    the next captions as negatives, like ``dataprep batches`` lays them out.
    Rows in ``bad_uri_rows`` point at a missing file.
    """
    from dataprep.store import BATCHES_SCHEMA, ShardWriter, write_run_record

    with ShardWriter(folder, BATCHES_SCHEMA, run_id="test", rows_per_shard=2) as w:
        for r in range(n_rows):
            idx = [(r * n_images + k) % len(uris) for k in range(n_images)]
            pidx = [(r * n_images + k) % len(prompts) for k in range(n_prompts)]
            row_uris = [uris[i] for i in idx]
            if r in bad_uri_rows:
                row_uris[0] = str(Path(folder) / "missing.png")
            w.add({
                "batch_id": f"b{r:03d}", "preset": preset,
                "image_ids": [f"img/{i}" for i in idx], "image_uris": row_uris,
                "prompts": [prompts[i] for i in pidx],
                "prompt_kinds": ["positive"] * n_images + ["negative"] * (n_prompts - n_images),
                "prompt_image_ids": [f"img/{i}" for i in pidx],
                "positive_index": list(range(n_images)), "seed": 0, "epoch": 0,
            })
    write_run_record(folder, "test", w.written)  # finished, as `dataprep batches` marks it
    return w.written


PROMPTS = [
    "a red cat on a sofa", "a green dog in a field", "the brown fox", "a photo of a sofa",
    "a blue car on a road", "a yellow house", "a small boat on a lake", "a tall tree",
]
