"""softrepa-dataprep: captions, single-concept edits and contrastive batches for SoftREPA."""

__version__ = "0.1.0"
