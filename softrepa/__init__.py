"""SoftREPA: soft text tokens trained with a contrastive score-matching loss, and an editing evaluator."""
