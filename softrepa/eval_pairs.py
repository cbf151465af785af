"""What ``softrepa evaluate-edit`` edits: caption/target pairs, and the leakage guard over them.

Pairs come from an official ``prompts_editing.json`` (:func:`pairs_from_json`)
or a dataprep run's ``edits`` shards (:func:`pairs_from_run`); a pair's id is
stable across runs (same image and prompts, same id), so edited images on
disk are found again. :func:`find_leakage` compares the pairs' images with
the ``trained_images.json`` the trainer writes beside the tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dataprep.errors import ConfigError, Reason, failure
from dataprep.store import EDITS_SCHEMA, edit_skip, iter_rows

#: written by the trainer beside the tokens (softrepa.checkpoints.TRAINED_IMAGES)
TRAINED_IMAGES_FILE = "trained_images.json"


@dataclass
class Pair:
    """One source image with its source and target prompts."""

    pair_id: str  # stable, filename-safe: same image + prompts -> same id across runs
    image_id: str
    image_path: str
    source: str
    target: str
    error: str | None = None  # the input item itself is unusable (wrong types): every setting of it is an error row
    passed: bool | None = None  # the rule checker's verdict (None: not checked, e.g. a prompts_editing.json)


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:10]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def pairs_from_json(path: Path) -> list[Pair]:
    """Official ``prompts_editing.json`` -> pairs; ``img_path`` is relative to the JSON."""
    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", flag="--pairs", fix="pass a JSON list of {prompt, img_path, tgt_prompt}") from exc
    if not isinstance(items, list):
        raise ConfigError(f"{path} is not a JSON list", flag="--pairs", fix="pass a JSON list of {prompt, img_path, tgt_prompt}")
    out = []
    for i, it in enumerate(items):
        bad = _bad_item(it)
        if bad is not None:  # str(None) would edit towards the prompt "None"
            out.append(Pair(f"item{i}-{short_hash(repr(it))}", f"item{i}", "", "", "", error=failure(Reason.BAD_TYPE, f"item {i}: {bad}")))
            continue
        img = it["img_path"]
        src, tgt = it["prompt"], it["tgt_prompt"]
        image_id = Path(img).stem or f"item{i}"
        full = img if os.path.isabs(img) else str(path.parent / img)
        out.append(Pair(f"{_safe(image_id)}-{short_hash(img, src, tgt)}", image_id, full, src, tgt))
    return out


def _bad_item(item: Any) -> str | None:
    """Why an item of prompts_editing.json cannot be edited, or None."""
    if not isinstance(item, dict):
        return f"{type(item).__name__}, not an object"
    for key in ("img_path", "prompt", "tgt_prompt"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            return f"{key} is {'missing' if item.get(key) is None else type(item[key]).__name__ if not isinstance(item[key], str) else 'empty'}"
    return None


def pairs_from_run(run_dir: Path, passed_only: bool = False) -> list[Pair]:
    """``RUN/edits`` (or the edits folder itself) -> error-free pairs with a target, one per
    (image, source, target), each with the checker's verdict; ``passed_only`` keeps passed ones."""
    folder = run_dir / "edits" if (run_dir / "edits").is_dir() else run_dir
    seen: dict[str, Pair] = {}
    cols = ["key", "image_id", "image_uri", "source", "target", "passed", "error"]
    for row in iter_rows(folder, EDITS_SCHEMA, columns=cols):
        if edit_skip(row, require_passed=False) is not None:  # the verdict is kept as a column, not a filter
            continue
        uri = row["image_uri"] or ""
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        image_id = row["image_id"] or Path(path).stem
        pid = f"{_safe(image_id)}-{short_hash(image_id, row['source'] or '', row['target'])}"
        passed = None if row["passed"] is None else bool(row["passed"])
        # one pair per row key, later shards win: a rewrite rerun with more attempts
        # writes a new row under the same key, and only that newer edit is evaluated
        seen[row["key"] or pid] = Pair(pid, image_id, path, row["source"] or "", row["target"], passed=passed)
    out = list(seen.values())
    return [p for p in out if p.passed] if passed_only else out


def load_pairs(pairs: str | Path, limit: int | None = None, passed_only: bool = False) -> list[Pair]:
    p = Path(pairs)
    if p.is_file():
        out = pairs_from_json(p)
    elif p.is_dir():
        out = pairs_from_run(p, passed_only)
        if not out and not any((p / "edits").glob("part-*.parquet")) and not any(p.glob("part-*.parquet")):
            raise ConfigError(f"{p} has no edits shards", flag="--pairs", fix="pass a run directory written by dataprep (RUN/edits/part-*.parquet) or a prompts_editing.json")
    else:
        raise ConfigError(f"{p} does not exist", flag="--pairs", fix="pass a run directory or a prompts_editing.json")
    return out[:limit] if limit else out


# ------------------------------------------------------------------ leakage guard


@dataclass
class Leakage:
    """Evaluation images that the soft tokens were trained on."""

    n_images: int  # distinct evaluation images
    n_trained: int  # images listed in trained_images.json
    overlap: list[str]  # evaluation image ids found in training, sorted
    by_sha256: int  # of which matched by file content
    by_id: int  # of which matched only by image id / file stem

    @property
    def n_pairs_affected(self) -> int:
        return len(self.overlap)

    def message(self) -> str:
        return (f"{len(self.overlap)} of {self.n_images} evaluation images were in the tokens' training set "
                f"({self.by_sha256} by file sha256, {self.by_id} by image id / file stem; {self.n_trained} images trained on): "
                "their scores measure memorisation, not editing. Train on another set (COCO train2017 or DIV2K valid) "
                "to evaluate on DIV2K train pairs (README, Reproducing the paper)")


def read_trained_images(tokens_dir: str | Path) -> tuple[set[str], set[str]] | None:
    """``TOKENS/trained_images.json`` -> (image ids, sha256s), or None when absent.

    The file is ``{"image_ids": [...], "sha256": [...]}``; empty sha256 strings
    (unknown) are ignored. An unreadable file is a ConfigError naming ``--tokens``.
    """
    path = Path(tokens_dir) / TRAINED_IMAGES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        ids = {str(i) for i in data.get("image_ids", []) if i}
        shas = {str(h).lower() for h in data.get("sha256", []) if h}
    except (OSError, json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", flag="--tokens", fix='the trainer writes {"image_ids": [...], "sha256": [...]}; fix or remove the file') from exc
    return ids, shas


def _file_sha256(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as fh:
                h.update(fh.read())
        else:
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    except OSError:
        return None  # a missing image is that pair's error later, not a leakage question
    return h.hexdigest()


def find_leakage(pairs: Sequence[Pair], tokens_dir: str | Path) -> Leakage | None:
    """Compare the evaluation images with the images the tokens were trained on.

    A pair's image counts as trained on when its file's sha256 is listed, or
    its image id is, or its file stem equals the last path part of a listed id
    (``0001.png`` vs ``div2k/0001``). None when the tokens carry no record.
    """
    record = read_trained_images(tokens_dir)
    if record is None:
        return None
    ids, shas = record
    stems = {i.rsplit("/", 1)[-1] for i in ids}
    images: dict[str, Pair] = {}
    for p in pairs:
        images.setdefault(p.image_path, p)
    overlap, by_sha, by_id = [], 0, 0
    for path, p in images.items():
        sha = _file_sha256(path) if shas else None
        if sha is not None and sha in shas:
            by_sha += 1
        elif p.image_id in ids or Path(path).stem in stems or p.image_id.rsplit("/", 1)[-1] in ids:
            by_id += 1
        else:
            continue
        overlap.append(p.image_id)
    return Leakage(len(images), max(len(ids), len(shas)), sorted(overlap), by_sha, by_id)
