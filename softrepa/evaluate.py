"""The editing evaluator: caption/edit pairs in, edited images, per-image scores and a summary out.

Pairs come from either

- an official-format ``prompts_editing.json`` (a list of ``{"prompt",
  "img_path", "tgt_prompt"}``, ``img_path`` relative to the JSON), or
- a run directory of this pipeline (``RUN/edits`` Parquet shards, schema
  ``dataprep.store.EDITS_SCHEMA``): every row with a target and no ``error``,
  as the paper evaluates every DIV2K caption/target pair; the rule checker's
  verdict is kept as the ``passed`` column of the scores so a table can be
  split by it (``passed_only`` restores the filter); the source image is
  ``image_uri``.

Every pair is edited under every *setting* (method x n_max x target CFG).
Default rows are the paper's Table 5 (``softrepa.paper``): ``flowedit`` at
NMAX 33, target CFG 13.5/16.5/19.5 and, with ``--tokens``, ``flowedit+tokens``
at NMAX 30, target CFG 9/11/13; ``rows="table6"`` adds tokens at CFG 7
(Cat2Dog). Target guidance follows the official editing script
(``softrepa.edit.CFG_RULES``).

Leakage guard: when the tokens folder has ``trained_images.json``
(``{"image_ids": [...], "sha256": [...]}``, written by the trainer), pairs
whose image was trained on (same file sha256, same image id or file stem) are
counted and reported as a warning in the summary, the manifest and the CLI.
Output folder::

    OUT/config.json                      the EvalConfig, as run
    OUT/images/source_<size>/<pair>.png  the source at the edit size (what LPIPS/FID compare)
    OUT/images/<setting>/<pair>.png      one edited image per pair and setting; <setting> =
                                         method_n<NMAX>_cfg<CFG>-<hash of model, tokens, steps, seed, ...>
    OUT/scores.parquet                   one row per pair x setting (scores or error)
    OUT/summary.md, OUT/summary.csv      Tables 5/6 layout: rows method x CFG, columns metrics
    OUT/<manifest>                       dataprep.store.Manifest: counts, failures, versions

Editing is resumable: an edited image already on disk is not recomputed
(images are written to a temp name and renamed, so a killed run never leaves
a truncated file). Scores are recomputed from the images on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from dataprep.errors import ConfigError, Reason, failure, reason_of
from dataprep.store import SCORES_SCHEMA, atomic_file
from softrepa import paper
from softrepa.edit import EditConfig
from softrepa.metrics import ALL_METRICS, LOWER_IS_BETTER, LPIPS_PACKAGE_NETS, TABLE_ORDER, MetricConfig

METHODS = ("flowedit", "flowedit+tokens")
METHOD_LABELS = {"flowedit": "FlowEdit", "flowedit+tokens": "FlowEdit + soft tokens"}
#: paper defaults per method (Tables 5 and 6; see softrepa.paper)
DEFAULT_N_MAX = dict(paper.N_MAX)
DEFAULT_TGT_CFG = dict(paper.ROWS["table5"])
ROW_SETS = tuple(paper.ROWS)
TRAINED_IMAGES_FILE = "trained_images.json"
METRIC_LABELS = {"imagereward": "ImageReward", "pickscore": "PickScore", "clip": "CLIP", "hpsv2": "HPS", "fid": "FID", "lpips": "LPIPS"}


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


@dataclass(frozen=True)
class Setting:
    """One row of the summary table. ``fingerprint`` hashes everything else
    that changes the edited pixels (model, tokens, steps, seed, size, ...), so
    a rerun with other settings never reuses stale images from the same OUT."""

    method: str
    n_max: int
    tgt_cfg: float
    fingerprint: str = ""

    @property
    def setting_id(self) -> str:
        base = f"{self.method.replace('+', '-')}_n{self.n_max}_cfg{self.tgt_cfg:g}"
        return f"{base}-{self.fingerprint}" if self.fingerprint else base


@dataclass
class EvalConfig:
    """Everything one evaluation needs; CLI flags map one-to-one onto these fields.

    ``methods`` None: ``flowedit``, plus ``flowedit+tokens`` when ``tokens`` is set.
    ``tgt_cfgs`` / ``n_max`` None: each method's paper default for the table
    ``rows`` (``table5``, or ``table6`` with tokens at CFG 7 as well); when
    given they apply to every method.
    ``passed_only``: edit only pairs that passed the rule checker (default: every
    pair with a target, as the paper; the verdict is a column either way).
    """

    pairs: str
    model: str
    out: str
    tokens: str | None = None
    methods: tuple[str, ...] | None = None
    tgt_cfgs: tuple[float, ...] | None = None
    n_max: int | None = None
    rows: str = "table5"
    passed_only: bool = False
    # FlowEdit's defaults live once, in EditConfig (paper: 50 steps, source CFG 3.5)
    steps: int = EditConfig.steps
    n_min: int = EditConfig.n_min
    src_cfg: float = EditConfig.src_cfg
    seed: int = EditConfig.seed
    size: int = EditConfig.size
    cfg_rule: str = EditConfig.cfg_rule
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    metrics: MetricConfig = field(default_factory=MetricConfig)
    progress: bool = True

    def resolved_methods(self) -> tuple[str, ...]:
        return self.methods or (("flowedit", "flowedit+tokens") if self.tokens else ("flowedit",))

    def settings(self) -> list[Setting]:
        out = []
        for m in self.resolved_methods():
            n_max = self.n_max if self.n_max is not None else DEFAULT_N_MAX[m]
            for w in self.tgt_cfgs or paper.ROWS.get(self.rows, DEFAULT_TGT_CFG)[m]:
                e = self.edit_config(Setting(m, n_max, float(w)))
                tokens = _dir_digest(self.tokens) if m == "flowedit+tokens" and self.tokens else ""
                fp = _short_hash(json.dumps([e.to_dict(), self.model, self.revision or "", tokens], sort_keys=True))[:8]
                out.append(Setting(m, n_max, float(w), fp))
        return out

    @property
    def source_folder(self) -> str:
        """Sources are stored at the edit size, so the folder is per size."""
        return f"source_{self.size}" if self.size else "source_native"

    def edit_config(self, s: Setting) -> EditConfig:
        return EditConfig(steps=self.steps, n_max=s.n_max, n_min=self.n_min, src_cfg=self.src_cfg, tgt_cfg=s.tgt_cfg, seed=self.seed, size=self.size, cfg_rule=self.cfg_rule)

    def validate(self) -> "EvalConfig":
        if not Path(self.pairs).exists():
            raise ConfigError(f"{self.pairs} does not exist", flag="--pairs", fix="pass a run directory (with edits/) or a prompts_editing.json")
        bad = [m for m in self.resolved_methods() if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown method(s) {bad}", flag="--methods", fix=f"choose from {', '.join(METHODS)}")
        if "flowedit+tokens" in self.resolved_methods() and not self.tokens:
            raise ConfigError("method flowedit+tokens needs soft tokens", flag="--tokens", fix="pass --tokens DIR (written by softrepa train)")
        if self.tokens and not Path(self.tokens).is_dir():
            raise ConfigError(f"{self.tokens} is not a folder", flag="--tokens", fix="pass the folder softrepa train wrote (tokens.safetensors + tokens.json)")
        if self.rows not in ROW_SETS:
            raise ConfigError(f"unknown rows {self.rows!r}", flag="--rows", fix=f"one of {', '.join(ROW_SETS)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit must be >= 1", flag="--limit", fix="omit --limit to edit every pair")
        for s in self.settings():
            self.edit_config(s).validate()
        self.metrics.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    out_dir: Path
    scores_path: Path
    summary_md: Path
    summary_csv: Path
    table: list[dict[str, Any]]  # one dict per summary row
    unavailable: dict[str, str]  # metric -> why it is missing (with install hint)
    n_pairs: int
    n_edited: int  # newly edited this run
    n_reused: int  # already on disk (resumed)
    n_failed: int  # pair x setting rows with an error
    markdown: str = ""
    manifest_path: Path | None = None
    leakage: Leakage | None = None  # set when the tokens record their training images


# ------------------------------------------------------------------ pairs


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:10]


def _dir_digest(folder: str) -> str:
    """Content hash of the files in a folder (soft tokens: a few MB)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


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
            out.append(Pair(f"item{i}-{_short_hash(repr(it))}", f"item{i}", "", "", "", error=failure(Reason.BAD_TYPE, f"item {i}: {bad}")))
            continue
        img = it["img_path"]
        src, tgt = it["prompt"], it["tgt_prompt"]
        image_id = Path(img).stem or f"item{i}"
        full = img if os.path.isabs(img) else str(path.parent / img)
        out.append(Pair(f"{_safe(image_id)}-{_short_hash(img, src, tgt)}", image_id, full, src, tgt))
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
    """``RUN/edits`` (or the edits folder itself) -> usable pairs (dataprep.store.edit_skip), one per
    (image, source, target), each with the checker's verdict; ``passed_only`` keeps passed ones."""
    from dataprep.store import EDITS_SCHEMA, edit_skip, iter_rows

    folder = run_dir / "edits" if (run_dir / "edits").is_dir() else run_dir
    seen: dict[str, Pair] = {}
    cols = ["key", "image_id", "image_uri", "source", "target", "passed", "error"]
    for row in iter_rows(folder, EDITS_SCHEMA, columns=cols):
        if edit_skip(row, require_passed=False) is not None:  # the verdict is kept as a column, not a filter
            continue
        uri = row["image_uri"] or ""
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        image_id = row["image_id"] or Path(path).stem
        pid = f"{_safe(image_id)}-{_short_hash(image_id, row['source'] or '', row['target'])}"
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


def open_image(path: str) -> "Any":
    """Open a local path or any fsspec URL as an RGB PIL image."""
    from PIL import Image

    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    with Image.open(path) as im:
        return im.convert("RGB")


def save_image_atomic(image: "Any", path: Path) -> None:
    with atomic_file(path, fsync=False) as tmp:
        image.save(tmp, format="PNG")


# ------------------------------------------------------------------ summary (pure)


def summarize(rows: Sequence[dict[str, Any]], settings: Sequence[Setting], fid: dict[str, float | None], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image score rows -> one summary row per setting (means over scored pairs).

    A metric with no value for a setting (not requested, unavailable, every
    row failed) is None there.
    """
    table = []
    for s in settings:
        mine = [r for r in rows if r["setting"] == s.setting_id]
        row: dict[str, Any] = {"method": METHOD_LABELS[s.method], "method_id": s.method, "n_max": s.n_max, "tgt_cfg": s.tgt_cfg,
                               "pairs": sum(1 for r in mine if r["error"] is None), "failed": sum(1 for r in mine if r["error"] is not None)}
        for m in TABLE_ORDER:
            if m == "fid":
                row[m] = fid.get(s.setting_id) if m in metrics else None
                continue
            vals = [r[m] for r in mine if r.get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals else None
        table.append(row)
    return table


def table_markdown(table: Sequence[dict[str, Any]], unavailable: dict[str, str], notes: Sequence[str] = ()) -> str:
    """The summary in the paper's Tables 5/6 layout, plus a line per missing metric."""
    arrows = {m: ("↓" if m in LOWER_IS_BETTER else "↑") for m in TABLE_ORDER}
    head = ["Model", "NMAX", "target CFG", "pairs"] + [f"{METRIC_LABELS[m]}{arrows[m]}" for m in TABLE_ORDER]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["method"], str(r["n_max"]), f"{r['tgt_cfg']:g}", f"{r['pairs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")]
        cells += ["n/a" if r[m] is None else f"{r[m]:.3f}" for m in TABLE_ORDER]
        lines.append("| " + " | ".join(cells) + " |")
    bullets = [f"- {METRIC_LABELS.get(m, m)}: {why}" for m, why in unavailable.items()] + [f"- {n}" for n in notes]
    if bullets:
        lines += [""] + bullets
    return "\n".join(lines) + "\n"


def write_csv(table: Sequence[dict[str, Any]], path: Path) -> None:
    import csv

    cols = ["method", "n_max", "tgt_cfg", "pairs", "failed", *TABLE_ORDER]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in table:
            w.writerow({c: ("" if r.get(c) is None else r[c]) for c in cols})


# ------------------------------------------------------------------ the run


def _batches(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not enabled, transient=False)


def edit_all(cfg: EvalConfig, pairs: Sequence[Pair], out: Path) -> tuple[dict[tuple[str, str], str], int, int]:
    """Edit every pair under every setting; returns ({(pair, setting): error}, n_edited, n_reused).

    Writes ``images/source/<pair>.png`` (the source at the edit size) and
    ``images/<setting>/<pair>.png``; existing edited images are kept.
    """
    settings = cfg.settings()
    todo = [(p, s) for p in pairs for s in settings if not (out / "images" / s.setting_id / f"{p.pair_id}.png").exists()]
    missing_sources = [p for p in pairs if not (out / "images" / cfg.source_folder / f"{p.pair_id}.png").exists()]
    errors: dict[tuple[str, str], str] = {}
    n_reused = len(pairs) * len(settings) - len(todo)
    if not todo and not missing_sources:
        return errors, 0, n_reused

    import torch

    from softrepa.edit import SD3FlowEditor, load_sd3

    tokens = None
    project_later = False  # 4096-wide official tokens: projected once the model (its context_embedder) is loaded
    if cfg.tokens and any(s.method == "flowedit+tokens" for s in settings):
        from softrepa.token_files import NeedsContextEmbedder, read_official
        from softrepa.tokens import load_tokens

        try:
            # the official release ships torch pickles (dc_tokens.pth); ours is safetensors + JSON
            official = (Path(cfg.tokens) / "dc_tokens.pth").exists() and not (Path(cfg.tokens) / "tokens.json").exists()
            tokens = read_official(cfg.tokens, "sd3") if official else load_tokens(cfg.tokens)
        except NeedsContextEmbedder:
            project_later = True
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load soft tokens from {cfg.tokens}: {exc}", flag="--tokens", fix="pass a folder written by softrepa train") from exc
    if tokens is not None and getattr(tokens.config, "backbone", "sd3") != "sd3":
        raise ConfigError(f"{cfg.tokens} holds {tokens.config.backbone} tokens; FlowEdit here runs on SD3", flag="--tokens", fix="pass tokens trained with softrepa train --preset sd3")
    pipe = load_sd3(cfg.model, device=cfg.device, dtype=cfg.dtype, revision=cfg.revision)
    if project_later:
        from softrepa.token_files import read_official

        try:
            tokens = read_official(cfg.tokens, "sd3", pipe.transformer.context_embedder)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load soft tokens from {cfg.tokens}: {exc}", flag="--tokens", fix="pass tokens made for this --model") from exc
    editor = SD3FlowEditor(pipe, tokens)
    n_edited = 0
    by_pair: dict[str, list[Setting]] = {}
    for p, s in todo:
        by_pair.setdefault(p.pair_id, []).append(s)
    with _progress(cfg.progress) as bar:
        task = bar.add_task("FlowEdit", total=len(todo))
        for p in pairs:
            wanted = by_pair.get(p.pair_id, [])
            src_png = out / "images" / cfg.source_folder / f"{p.pair_id}.png"
            if not wanted and src_png.exists():
                continue
            if p.error is not None:
                for s in settings:
                    errors[(p.pair_id, s.setting_id)] = p.error
                bar.advance(task, len(wanted))
                continue
            try:
                image = open_image(p.image_path)
            except Exception as exc:  # noqa: BLE001 -- bad input is a per-row error (corrupt, missing, unreadable)
                for s in settings:
                    errors[(p.pair_id, s.setting_id)] = failure(Reason.IMAGE, f"{type(exc).__name__}: {exc}")
                bar.advance(task, len(wanted))
                continue
            w, h = editor.target_size(*image.size, cfg.size)
            if not src_png.exists():
                from PIL import Image

                save_image_atomic(image.resize((w, h), Image.BICUBIC), src_png)
            try:
                x_src = editor.encode_image(image, cfg.size)
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory at size 0 on a huge image
                for s in wanted:
                    errors[(p.pair_id, s.setting_id)] = failure(Reason.ENCODE, f"{type(exc).__name__}: {exc}")
                bar.advance(task, len(wanted))
                continue
            for s in wanted:
                try:
                    z = editor.edit_latent(x_src, p.source, p.target, cfg.edit_config(s), use_tokens=s.method == "flowedit+tokens")
                    save_image_atomic(editor.decode(z)[0], out / "images" / s.setting_id / f"{p.pair_id}.png")
                    n_edited += 1
                except (RuntimeError, ValueError) as exc:  # e.g. out of memory on one huge image: record, go on
                    errors[(p.pair_id, s.setting_id)] = failure(Reason.EDIT, f"{type(exc).__name__}: {exc}")
                bar.advance(task)
    del editor, pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the metric models come next
    return errors, n_edited, n_reused


def score_all(cfg: EvalConfig, pairs: Sequence[Pair], out: Path, errors: dict[tuple[str, str], str]) -> tuple[list[dict[str, Any]], dict[str, float | None], dict[str, str]]:
    """Score every edited image; returns (per-image rows, FID per setting, unavailable metrics).

    Images are opened one batch at a time (an 800-pair DIV2K run at 1024 px
    would not fit in memory at once); FID features accumulate per batch.
    """
    import torch

    from softrepa.metrics import PER_IMAGE, TAKES_PATHS, frechet_distance, load_scorers

    scorers = load_scorers(cfg.metrics)
    per_image = [m for m in PER_IMAGE if m in cfg.metrics.metrics and m in scorers.per_image]
    unavailable = dict(scorers.unavailable)
    rows: list[dict[str, Any]] = []
    fid: dict[str, float | None] = {}
    src_feats: list[torch.Tensor] = []
    fid_failed = False
    settings = cfg.settings()
    with _progress(cfg.progress) as bar:
        task = bar.add_task("scoring", total=len(pairs) * len(settings))
        for si, s in enumerate(settings):
            edit_feats: list[torch.Tensor] = []
            mine = []
            for p in pairs:
                row: dict[str, Any] = {"pair_id": p.pair_id, "image_id": p.image_id, "passed": p.passed, "setting": s.setting_id, "method": s.method,
                                       "n_max": s.n_max, "tgt_cfg": s.tgt_cfg, "source_prompt": p.source, "target_prompt": p.target,
                                       "source_image": str(out / "images" / cfg.source_folder / f"{p.pair_id}.png"),
                                       "edited_image": str(out / "images" / s.setting_id / f"{p.pair_id}.png"),
                                       "error": errors.get((p.pair_id, s.setting_id)), **{m: None for m in PER_IMAGE}}
                rows.append(row)
                mine.append(row)
            for batch in _batches(mine, cfg.metrics.batch_size):
                ready, eds, srcs = [], [], []
                for r in batch:
                    if r["error"] is not None:
                        continue
                    try:
                        eds.append(open_image(r["edited_image"]))
                        srcs.append(open_image(r["source_image"]))
                        ready.append(r)
                    except Exception as exc:  # noqa: BLE001 -- a missing/corrupt file is this row's error
                        del eds[len(ready):], srcs[len(ready):]
                        r["error"] = failure(Reason.IMAGE, f"{type(exc).__name__}: {exc}")
                for m in per_image if ready else []:
                    try:
                        prompts = [r["target_prompt"] for r in ready]
                        if m == "lpips":
                            vals = scorers.per_image[m](srcs, eds)
                        elif m in TAKES_PATHS:
                            vals = scorers.per_image[m]([r["edited_image"] for r in ready], prompts)
                        else:
                            vals = scorers.per_image[m](eds, prompts)
                    except (RuntimeError, ValueError) as exc:
                        for r in ready:
                            r["error"] = r["error"] or f"{m}: {type(exc).__name__}: {exc}"
                        continue
                    for r, v in zip(ready, vals):
                        r[m] = float(v)
                if scorers.fid is not None and ready:
                    try:
                        edit_feats.append(scorers.fid(eds))
                        if si == 0:  # the source set is the same for every setting
                            src_feats.append(scorers.fid(srcs))
                    except (RuntimeError, ValueError) as exc:  # FID over a partial set would mislead: drop it
                        unavailable.setdefault("fid", f"feature extraction failed: {type(exc).__name__}: {exc}")
                        fid_failed = True
                bar.advance(task, len(batch))
            if scorers.fid is not None and not fid_failed:
                try:
                    fid[s.setting_id] = frechet_distance(torch.cat(src_feats), torch.cat(edit_feats)) if edit_feats else None
                except (RuntimeError, ValueError) as exc:
                    fid[s.setting_id] = None
                    unavailable.setdefault("fid", f"not computed for {s.setting_id}: {exc}")
    return rows, fid, unavailable


def evaluate_edit(cfg: EvalConfig) -> EvalResult:
    """Edit all pairs under all settings, score them, write scores and the summary table."""
    import pyarrow as pa

    from dataprep.store import Manifest, new_run_id, write_table_atomic

    cfg.validate()
    pairs = load_pairs(cfg.pairs, cfg.limit, cfg.passed_only)
    uses_tokens = cfg.tokens is not None and "flowedit+tokens" in cfg.resolved_methods()
    leakage = find_leakage(pairs, cfg.tokens) if uses_tokens else None
    if leakage is not None and leakage.overlap:
        import logging

        logging.getLogger("softrepa.evaluate").warning("leakage: %s", leakage.message())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    manifest = Manifest(stage="evaluate-edit", config=cfg.to_dict(), run_id=new_run_id())

    errors, n_edited, n_reused = edit_all(cfg, pairs, out)
    rows, fid, unavailable = score_all(cfg, pairs, out, errors)

    scores = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
    write_table_atomic(scores, out / "scores.parquet")
    table = summarize(rows, cfg.settings(), fid, cfg.metrics.metrics)
    for m in ALL_METRICS:
        if m not in cfg.metrics.metrics:
            unavailable.setdefault(m, "not requested (--metrics)")
    notes = []
    if leakage is not None and leakage.overlap:
        notes.append(f"WARNING, leakage: {leakage.message()}")
    if not pairs:
        notes.append("no pairs to evaluate: the input has no error-free edits with a target (see dataprep check / the edits manifest)")
    checked = [p for p in pairs if p.passed is not None]
    n_pass = sum(1 for p in checked if p.passed)
    if checked and not cfg.passed_only:
        notes.append(f"{n_pass} of {len(checked)} pairs passed the rule checker; scores.parquet has the verdict "
                     "(column passed) to split the table by it")
    if cfg.metrics.lpips_model not in LPIPS_PACKAGE_NETS and "lpips" in cfg.metrics.metrics:
        notes.append(f"LPIPS: uncalibrated form on {cfg.metrics.lpips_model} features (no learned weights); not comparable with published LPIPS")
    if "fid" in cfg.metrics.metrics and len(pairs) < 2048 and fid:
        notes.append(f"FID over {len(pairs)} pairs (< 2048 features): biased upward, compare only runs of the same size")
    md = table_markdown(table, unavailable, notes)
    if checked and not cfg.passed_only and 0 < n_pass < len(pairs):
        # the same table over the pairs the checker passed (FID needs the whole set: not split)
        passed_rows = [r for r in rows if r["passed"]]
        md += (f"\nOnly the {n_pass} pairs that passed the rule checker (FID not split):\n\n"
               + table_markdown(summarize(passed_rows, cfg.settings(), {}, cfg.metrics.metrics), {}))
    (out / "summary.md").write_text(md)
    write_csv(table, out / "summary.csv")

    n_failed = sum(1 for r in rows if r["error"] is not None)
    failures: dict[str, int] = {}
    for r in rows:
        if r["error"] is not None:
            reason = reason_of(r["error"])
            failures[reason] = failures.get(reason, 0) + 1
    manifest.counts = {"pairs": len(pairs), "settings": len(cfg.settings()), "edited": n_edited, "reused": n_reused, "failed": n_failed}
    if leakage is not None:
        manifest.counts["images_in_training"] = len(leakage.overlap)
    manifest.failures = failures
    from dataprep.store import utcnow

    manifest.finished_at = utcnow().isoformat()
    manifest_path = manifest.write(out)
    from softrepa.grids import write_grids  # OUT/grids: one page + a PNG per pair (see softrepa.grids)

    write_grids(out, rows, cfg.settings())
    return EvalResult(out, out / "scores.parquet", out / "summary.md", out / "summary.csv", table, unavailable,
                      len(pairs), n_edited, n_reused, n_failed, md, manifest_path, leakage)
