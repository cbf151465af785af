"""What the trainer reads: the batch rows of one `dataprep batches` run, and the order it visits them.

:func:`read_batch_rows` refuses a folder of several runs (unless one is
picked) and a run that did not finish (unless ``allow_partial``);
:func:`check_row` names why a row cannot train; :class:`RowStream` maps a
position in the training stream to a row, pass after pass, each pass in a
fresh permutation of ``(seed, pass)`` (:func:`batch_order`), so a resume
mid-pass continues the same order; :func:`slot_generator` is the CPU
generator of one row slot of a step (see :mod:`softrepa.train`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dataprep.errors import ConfigError, Reason
from dataprep.store import BATCHES_SCHEMA, read_run_record, run_record_path, shard_paths


def batch_runs(folder: str | Path) -> dict[str, list[Path]]:
    """Shards per `dataprep batches` run (``part-<run>-<nnnnn>.parquet``), in shard order."""
    runs: dict[str, list[Path]] = {}
    for path in shard_paths(folder):
        m = re.fullmatch(r"part-(.+)-\d{5}\.parquet", path.name)
        runs.setdefault(m.group(1) if m else path.stem, []).append(path)
    return runs


def read_batch_rows(folder: str | Path, run: str | None = None, allow_partial: bool = False) -> list[dict[str, Any]]:
    """The batch rows of one run, in shard order (the trainer's deterministic data order).

    A folder that holds several runs (rebuilt batches, another seed or grid)
    is refused unless ``run`` picks one: training on all of them would repeat
    images and mix stale captions into the data silently. A run without its
    completion record (``_run-<id>.json``, written last by `dataprep batches`),
    or missing a shard the record lists, did not finish and is refused unless
    ``allow_partial``: its shards may hold a fraction of the epochs.
    """
    import pyarrow.parquet as pq

    runs = batch_runs(folder)
    if run is not None:
        if run not in runs:
            raise ConfigError(f"no batch run {run!r} in {folder} (runs: {', '.join(sorted(runs)) or 'none'})", "--batch-run", "pass one of the listed run ids")
        paths = runs[run]
    elif len(runs) > 1:
        raise ConfigError(f"{folder} holds {len(runs)} batch runs: {', '.join(sorted(runs))}", "--batch-run", "pick one with --batch-run ID (or build each run into its own --out folder)")
    else:
        paths = [p for ps in runs.values() for p in ps]
    if not allow_partial:
        for run_id in ([run] if run is not None else list(runs)):
            _check_complete(folder, run_id, runs[run_id])
    cols = ["batch_id", "preset", "image_ids", "image_uris", "prompts", "positive_index"]
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(pq.read_table(path, columns=cols, schema=BATCHES_SCHEMA).to_pylist())
    return rows


def _check_complete(folder: str | Path, run_id: str, paths: list[Path]) -> None:
    record = read_run_record(folder, run_id)
    if record is None:
        raise ConfigError(
            f"batch run {run_id} in {folder} has no completion record ({run_record_path(folder, run_id).name}): "
            f"the `dataprep batches` run that wrote its {len(paths)} shard(s) did not finish",
            "--allow-partial",
            "rerun the same `dataprep batches` command to finish it, or pass --allow-partial to train on the shards there are",
        )
    have = {p.name for p in paths}
    missing = [name for name in record["shards"] if name not in have]
    if missing:
        raise ConfigError(
            f"batch run {run_id} in {folder} lacks {len(missing)} of the shards its completion record lists (e.g. {missing[0]})",
            "--allow-partial",
            "rerun the same `dataprep batches` command to rewrite them, or pass --allow-partial to train on the shards there are",
        )


def check_row(row: dict[str, Any]) -> str | None:
    """The reason a batch row cannot be trained on, or None."""
    uris, prompts, pos = row.get("image_uris") or [], row.get("prompts") or [], row.get("positive_index") or []
    if not uris or not prompts:
        return Reason.EMPTY_BATCH.value
    if len(pos) != len(uris):
        return Reason.POSITIVE_INDEX_LENGTH.value
    if any(p is None or not 0 <= p < len(prompts) for p in pos):
        return Reason.POSITIVE_INDEX_RANGE.value
    if any(not isinstance(p, str) for p in prompts):
        return Reason.NULL_PROMPT.value
    return None


def batch_order(n: int, seed: int, pass_index: int, shuffle: bool = True) -> list[int]:
    """Row indices for pass ``pass_index`` over ``n`` rows: a permutation drawn
    from ``(seed, pass_index)`` (the same on every process and after a resume),
    or ``0..n-1`` without shuffling."""
    if not shuffle:
        return list(range(n))
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, pass_index]).permutation(n)]


class RowStream:
    """Stream position -> row index, pass after pass (one permutation per pass, cached)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._pass, self._order = -1, []

    def __getitem__(self, position: int) -> int:
        p = position // self.n
        if p != self._pass:
            self._pass, self._order = p, batch_order(self.n, self.seed, p, self.shuffle)
        return self._order[position % self.n]


def slot_generator(seed: int, slot: int) -> torch.Generator:
    """The CPU generator of row slot ``slot`` (timesteps, noise, VAE samples), seeded from ``(seed, slot)``."""
    import numpy as np

    s = int(np.random.SeedSequence([seed, slot]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
    return torch.Generator().manual_seed(s)
