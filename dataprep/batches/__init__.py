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

The package, one step a module:

- :mod:`~dataprep.batches.options`: :class:`BatchOptions` (the grid, presets);
- :mod:`~dataprep.batches.index`: the stores streamed through Arrow into a
  :class:`CaptionIndex` (:func:`load_caption_index`, :func:`load_coco_index`,
  :func:`attach_edits`);
- :mod:`~dataprep.batches.build`: the pure builder, :func:`iter_batches`: an
  index in, rows out, and its :class:`BuildCounts` as the generator's return
  value (no out-parameter);
- :mod:`~dataprep.batches.write`: the shards, the completion record, the
  manifest and the summary (:func:`build_batches`, :func:`write_batches`),
  holding at most ``rows_per_shard`` rows beyond the index.
"""

from dataprep.batches.build import HARD_NEGATIVE, NEGATIVE, POSITIVE, BuildCounts, batch_rows, check_fillable, iter_batches, norm_text, run_id_for
from dataprep.batches.index import CaptionIndex, attach_edits, load_caption_index, load_coco_index, make_index
from dataprep.batches.options import PRESETS, BatchOptions
from dataprep.batches.write import BatchSummary, apply_quality, build_batches, build_coco_batches, print_batch_summary, write_batches

__all__ = [
    "HARD_NEGATIVE", "NEGATIVE", "POSITIVE", "PRESETS", "BatchOptions", "BatchSummary", "BuildCounts", "CaptionIndex",
    "apply_quality", "attach_edits", "batch_rows", "build_batches", "build_coco_batches", "check_fillable", "iter_batches",
    "load_caption_index", "load_coco_index", "make_index", "norm_text", "print_batch_summary", "run_id_for", "write_batches",
]
