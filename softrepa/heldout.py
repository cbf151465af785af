"""Held-out prompts and the best-by-CLIP checkpoint of ``softrepa train``.

The official trainer (``train.py``: ``--num_eval 50``, ``eval``) samples one
image for each of 50 held-out captions at every validation, scores them with
CLIP and keeps ``dc_tokens_best.pth`` for the highest mean. Here the prompts
come from a file (``--eval-prompts``) or, by default, are the captions of
``--eval-holdout`` images taken out of the training rows (:func:`hold_out`),
so the score is on text the tokens never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataprep.errors import ConfigError
from softrepa.metrics import ClipScorer


@dataclass
class HoldOut:
    """Training rows without the held-out images, and those images' captions."""

    rows: list[dict[str, Any]]
    prompts: list[str]  # one caption per held-out image, in ``image_ids`` order
    image_ids: list[str]
    rows_dropped: int = 0  # rows whose every image was held out
    slots_removed: int = 0  # (row, image) columns removed from rows that stay
    sources: dict[str, str] = field(default_factory=dict)


def _positives(row: dict[str, Any]) -> list[tuple[str, str]] | None:
    ids, prompts, pos = row.get("image_ids") or [], row.get("prompts") or [], row.get("positive_index") or []
    if not ids or len(ids) != len(pos) or len(ids) != len(row.get("image_uris") or []):
        return None
    if any(p is None or not 0 <= p < len(prompts) or not isinstance(prompts[p], str) for p in pos):
        return None
    return [(i, prompts[p]) for i, p in zip(ids, pos)]


def hold_out(rows: list[dict[str, Any]], n: int, seed: int) -> HoldOut:
    """Hold ``n`` images (chosen with ``seed``) out of training; their captions become the eval prompts.

    Each held-out image's column is removed from every row it appears in
    (image, URI and ``positive_index`` entry); its caption stays in those
    rows' prompt lists, where it is only ever a negative for other images. A
    row left without images is dropped. Malformed rows pass through for the
    trainer to skip and count. Raises :class:`ConfigError` when ``n`` is more
    than half of the distinct images.
    """
    import numpy as np

    caption: dict[str, str] = {}
    for row in rows:
        for iid, text in _positives(row) or []:
            caption.setdefault(iid, text)
    ids = sorted(caption)
    if n > len(ids) // 2:
        raise ConfigError(
            f"the batches hold {len(ids)} images: holding out {n} for the best-checkpoint evaluation would leave "
            f"{'none' if n >= len(ids) else len(ids) - n} to train on (at most half may be held out)",
            "--eval-holdout", f"hold out at most {len(ids) // 2}, give --eval-prompts FILE, or --best-by none")
    rng = np.random.default_rng([seed, 0x5EED])
    held = sorted(ids[i] for i in rng.choice(len(ids), size=n, replace=False))
    held_set = set(held)
    kept_rows, dropped, removed = [], 0, 0
    for row in rows:
        pairs = _positives(row)
        if pairs is None or not held_set.intersection(row["image_ids"]):
            kept_rows.append(row)
            continue
        keep = [k for k, iid in enumerate(row["image_ids"]) if iid not in held_set]
        removed += len(row["image_ids"]) - len(keep)
        if not keep:
            dropped += 1
            continue
        new = dict(row)
        for col in ("image_ids", "image_uris", "positive_index"):
            new[col] = [row[col][k] for k in keep]
        kept_rows.append(new)
    return HoldOut(kept_rows, [caption[i] for i in held], held, dropped, removed)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (blank lines and surrounding spaces ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"eval prompts file {p} does not exist", "--eval-prompts", "give a text file with one prompt per line")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{p} holds no prompts", "--eval-prompts", "one prompt per line")
    return prompts


class ClipEval:
    """Sample one image per held-out prompt with the current tokens and CLIP-score it.

    Prompt ``i`` always uses generator seed ``seed + i`` (same noise at every
    checkpoint, whatever the number of processes); each process samples the
    prompts ``rank::world`` and the mean is reduced over all of them.
    """

    def __init__(self, parts: Any, prompts: list[str], clip_model: str, *, steps: int, guidance: float,
                 size: int | None, batch_size: int, seed: int, group: Any, autocast_dtype: Any = None):
        try:
            self.scorer = ClipScorer(clip_model, device=str(parts.device))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load CLIP {clip_model} for the best-checkpoint evaluation: {e}", "--eval-clip-model",
                              "give a CLIP hub id or local folder, or turn the evaluation off with --best-by none") from e
        self.parts, self.prompts, self.steps, self.guidance = parts, prompts, steps, guidance
        self.size, self.batch_size, self.seed, self.group, self.autocast_dtype = size, batch_size, seed, group, autocast_dtype
        parts.pipe.set_progress_bar_config(disable=True)

    def __call__(self) -> float:
        """Mean CLIP score (cosine) over all held-out prompts."""
        import torch

        mine = list(range(self.group.rank, len(self.prompts), self.group.world))
        total = 0.0
        dev = self.parts.device
        for start in range(0, len(mine), self.batch_size):
            idx = mine[start:start + self.batch_size]
            texts = [self.prompts[i] for i in idx]
            gens = [torch.Generator("cpu").manual_seed(self.seed + i) for i in idx]
            ctx = torch.autocast(dev.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None else torch.autocast(dev.type, enabled=False)
            with torch.no_grad(), ctx:
                images = self.parts.pipe(prompt=texts, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                         height=self.size, width=self.size, generator=gens).images
            total += float(sum(self.scorer(images, texts)))
        acc = torch.tensor([total, float(len(mine))], dtype=torch.float64,
                           device=dev if self.group.backend == "nccl" else "cpu")
        self.group.all_reduce_sum(acc)
        return float(acc[0] / acc[1])
