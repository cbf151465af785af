"""SoftREPA: soft text tokens trained with a contrastive score-matching loss, and an editing evaluator.

From ``dataprep`` this package imports only its foundation: ``dataprep.errors``
(ConfigError), ``dataprep.runtime`` (device, dtype, progress, summaries) and
``dataprep.store`` (shards, schemas, manifests). torch, diffusers,
transformers and the metric packages are imported inside functions where a
module must stay cheap to import; project modules at the top.
"""
