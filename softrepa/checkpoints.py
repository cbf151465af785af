"""What a training run leaves on disk: checkpoints, the step log, token folders and their trained images.

``OUT/checkpoints/step-NNNNNNN/`` holds the token files,
``trained_images.json`` and ``state.pt`` (optimizer, scheduler, every row
slot's generator state, step, stream position); every folder and file is
written under a temp name and renamed, so a killed run leaves the previous
checkpoint intact. :func:`truncate_log` drops log lines written after the
checkpoint a run resumes from. :class:`TrainedImages` is the
``trained_images.json`` contract the evaluator's leakage guard reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dataprep.store import atomic_write_text
from softrepa.tokens import CONFIG_FILE, SoftTokens, save_tokens

TRAINED_IMAGES = "trained_images.json"
TRAIN_CONFIG = "train_config.json"
# --precision, the earlier name of --dtype, in the --dtype vocabulary
LEGACY_PRECISION = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / "state.pt").exists()) if root.is_dir() else []


def save_checkpoint(out: Path, step: int, cursor: int, tokens: SoftTokens, optimizer, scheduler, generators: list[torch.Tensor],
                    scaler: Any, extra: dict[str, Any], run_state: dict[str, Any] | None = None,
                    trained_images: dict[str, list[str]] | None = None) -> Path:
    """``out/checkpoints/step-NNNNNNN/`` = token files (+ ``trained_images.json``)
    + ``state.pt`` (optimizer, scheduler, every slot's generator state, step,
    stream position, ``run_state``). Written to a temp folder and renamed."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_tokens(tokens, tmp, extra=extra)
    if trained_images is not None:
        write_json(tmp / TRAINED_IMAGES, trained_images)
    state = {
        "step": step,
        "cursor": cursor,
        "tokens": {k: v.detach().cpu() for k, v in tokens.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generators": list(generators),
        "scaler": scaler.state_dict() if scaler is not None else None,
        **(run_state or {}),
    }
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    # our own file, but still weights-only: it holds tensors, numbers and dicts
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after checkpoint ``step`` (a run killed past its
    last checkpoint repeats those steps on resume; keep each step once)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line) if line.strip() else {}
        except ValueError:  # a line cut by the kill
            break
        if rec.get("step", rec.get("eval_step", 0)) > step:
            break
        if line.strip():
            kept.append(line)
    # skip records between the checkpoint and the next step are re-made on resume;
    # the checkpoint's own evaluation (eval_step == step) happened before it was saved
    while kept and not {"step", "eval_step"} & json.loads(kept[-1]).keys():
        kept.pop()
    atomic_write_text(path, "".join(k + "\n" for k in kept))




def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def sha256_of(uri: str) -> str:
    """sha256 of the file's bytes (local path or fsspec URL); "" when it cannot be read."""
    import fsspec

    h = hashlib.sha256()
    try:
        with fsspec.open(uri, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except Exception:  # noqa: BLE001 - unreadable now: unknown, not fatal
        return ""
    return h.hexdigest()


class TrainedImages:
    """Which images the tokens were trained on: ids of rows that took an optimiser step.

    :meth:`record` is the ``trained_images.json`` contract read by
    ``softrepa evaluate-edit`` for its leakage warning:
    ``{"image_ids": [...], "sha256": [...]}``, sorted by id, unique, sha256 of
    the image file bytes ("" when the file cannot be read).
    """

    def __init__(self, rows: list[dict[str, Any]]):
        self.ids: set[str] = set()
        self.uri: dict[str, str] = {}
        for row in rows:
            for iid, uri in zip(row.get("image_ids") or [], row.get("image_uris") or []):
                self.uri.setdefault(iid, uri)
        self._sha: dict[str, str] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.ids.update(row.get("image_ids") or [])

    def record(self) -> dict[str, list[str]]:
        ids = sorted(self.ids)
        for i in ids:
            if i not in self._sha:
                self._sha[i] = sha256_of(self.uri[i]) if i in self.uri else ""
        return {"image_ids": ids, "sha256": [self._sha[i] for i in ids]}


def save_token_dir(tokens: SoftTokens, final: Path, extra: dict[str, Any], trained: dict[str, list[str]]) -> None:
    """Token files + ``trained_images.json`` into ``final``, replacing it whole (temp folder, renames)."""
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    save_tokens(tokens, tmp, extra=extra)
    write_json(tmp / TRAINED_IMAGES, trained)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_resolution(path: Path) -> int | None:
    """The training resolution (pixels) the steps up to checkpoint ``path`` ran at, from its ``tokens.json``."""
    try:
        value = json.loads((path / CONFIG_FILE).read_text()).get("resolution")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None


def read_train_config(out: Path | str) -> dict[str, Any] | None:
    """``OUT/train_config.json`` as written by any version (None when absent or unreadable):
    ``precision`` (bf16/fp16/fp32), the earlier name of ``dtype``, is read as ``dtype``."""
    try:
        saved = json.loads((Path(out) / TRAIN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if "precision" in saved and "dtype" not in saved:
        saved["dtype"] = LEGACY_PRECISION.get(saved.pop("precision"), "auto")
    return saved
