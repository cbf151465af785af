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
a truncated file). Scores are recomputed from the images on every run. One
OUT holds the evaluation of one ``--pairs`` input: rerunning into it with
other pairs is a ConfigError naming ``--pairs`` (the new scores would
replace the earlier ones); evaluate another input into another ``--out``.

The pieces: :mod:`softrepa.eval_pairs` (pairs, leakage),
:mod:`softrepa.eval_run` (editing and scoring passes),
:mod:`softrepa.eval_table` (summary tables), :mod:`softrepa.images`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from dataprep.errors import ConfigError, reason_of
from dataprep.runtime import StageSummary, check_device, check_dtype
from dataprep.store import Manifest, new_run_id, utcnow, write_table_atomic
from softrepa import paper
from softrepa.edit import EditConfig
from softrepa.eval_pairs import TRAINED_IMAGES_FILE, Leakage, Pair, find_leakage, load_pairs, pairs_from_json, pairs_from_run, read_trained_images, short_hash
from softrepa.eval_run import edit_all, score_all
from softrepa.eval_table import METHOD_LABELS, METRIC_LABELS, SCORES_SCHEMA, summarize, table_markdown, write_csv
from softrepa.grids import write_grids
from softrepa.images import open_image, save_image_atomic
from softrepa.metrics import ALL_METRICS, LPIPS_PACKAGE_NETS, MetricConfig

METHODS = ("flowedit", "flowedit+tokens")
#: paper defaults per method (Tables 5 and 6; see softrepa.paper)
DEFAULT_N_MAX = dict(paper.N_MAX)
DEFAULT_TGT_CFG = dict(paper.ROWS["table5"])
ROW_SETS = tuple(paper.ROWS)
CONFIG_FILE = "config.json"

# The pieces live in their own modules (pairs and leakage, the two passes,
# the tables, image files); their public names stay importable from here.
__all__ = [
    "EvalConfig", "EvalResult", "Setting", "evaluate_edit", "METHODS", "DEFAULT_N_MAX", "DEFAULT_TGT_CFG", "ROW_SETS",
    "Pair", "Leakage", "load_pairs", "pairs_from_json", "pairs_from_run", "find_leakage", "read_trained_images", "TRAINED_IMAGES_FILE",
    "edit_all", "score_all", "summarize", "table_markdown", "write_csv", "SCORES_SCHEMA", "METHOD_LABELS", "METRIC_LABELS",
    "open_image", "save_image_atomic",
]


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
                fp = short_hash(json.dumps([e.to_dict(), self.model, self.revision or "", tokens], sort_keys=True))[:8]
                out.append(Setting(m, n_max, float(w), fp))
        return out

    @property
    def source_folder(self) -> str:
        """Sources are stored at the edit size, so the folder is per size."""
        return f"source_{self.size}" if self.size else "source_native"

    def edit_config(self, s: Setting) -> EditConfig:
        return EditConfig(steps=self.steps, n_max=s.n_max, n_min=self.n_min, src_cfg=self.src_cfg, tgt_cfg=s.tgt_cfg, seed=self.seed, size=self.size, cfg_rule=self.cfg_rule)

    def __post_init__(self) -> None:
        for name in ("methods", "tgt_cfgs"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        self.check_values()

    def check_values(self) -> None:
        """Every check that needs only the values (run when the config is built)."""
        bad = [m for m in self.resolved_methods() if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown method(s) {bad}", flag="--methods", fix=f"choose from {', '.join(METHODS)}")
        if self.rows not in ROW_SETS:
            raise ConfigError(f"unknown rows {self.rows!r}", flag="--rows", fix=f"one of {', '.join(ROW_SETS)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit must be >= 1", flag="--limit", fix="omit --limit to edit every pair")
        check_dtype(self.dtype)
        check_device(self.device)
        for m in self.resolved_methods():
            n_max = self.n_max if self.n_max is not None else DEFAULT_N_MAX[m]
            for w in self.tgt_cfgs or paper.ROWS[self.rows][m]:
                self.edit_config(Setting(m, n_max, float(w)))  # EditConfig checks itself when built

    def validate(self) -> "EvalConfig":
        """The value checks plus what must hold when the run starts: the input exists, the tokens are given and are a folder.

        Apart from the values because the recipe builds this config before
        training has written the tokens.
        """
        self.check_values()
        if not Path(self.pairs).exists():
            raise ConfigError(f"{self.pairs} does not exist", flag="--pairs", fix="pass a run directory (with edits/) or a prompts_editing.json")
        if "flowedit+tokens" in self.resolved_methods() and not self.tokens:
            raise ConfigError("method flowedit+tokens needs soft tokens", flag="--tokens", fix="pass --tokens DIR (written by softrepa train)")
        if self.tokens and not Path(self.tokens).is_dir():
            raise ConfigError(f"{self.tokens} is not a folder", flag="--tokens", fix="pass the folder softrepa train wrote (tokens.safetensors + tokens.json)")
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
    summary: StageSummary | None = None  # the stage summary, as every stage prints it (dataprep.runtime.print_summary)


def _dir_digest(folder: str) -> str:
    """Content hash of the files in a folder (soft tokens: a few MB)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()



def evaluate_edit(cfg: EvalConfig) -> EvalResult:
    """Edit all pairs under all settings, score them, write scores and the summary table.

    One ``--out`` folder holds the evaluation of one ``--pairs`` input: a
    rerun with other pairs is refused (:func:`check_same_pairs`) rather than
    replacing the earlier scores.
    """
    cfg.validate()
    out = Path(cfg.out)
    check_same_pairs(cfg, out)
    pairs = load_pairs(cfg.pairs, cfg.limit, cfg.passed_only)
    uses_tokens = cfg.tokens is not None and "flowedit+tokens" in cfg.resolved_methods()
    leakage = find_leakage(pairs, cfg.tokens) if uses_tokens else None
    if leakage is not None and leakage.overlap:
        logging.getLogger("softrepa.evaluate").warning("leakage: %s", leakage.message())
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    manifest = Manifest(stage="evaluate-edit", config=cfg.to_dict(), run_id=new_run_id())
    summary = StageSummary("evaluate-edit", out, manifest.run_id, unit="edits")

    errors, n_edited, n_reused = edit_all(cfg, pairs, out)
    rows, fid, unavailable = score_all(cfg, pairs, out, errors)

    write_table_atomic(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), out / "scores.parquet")
    table = summarize(rows, cfg.settings(), fid, cfg.metrics.metrics)
    for m in ALL_METRICS:
        if m not in cfg.metrics.metrics:
            unavailable.setdefault(m, "not requested (--metrics)")
    md = _summary_markdown(cfg, pairs, rows, table, fid, unavailable, leakage)
    (out / "summary.md").write_text(md)
    write_csv(table, out / "summary.csv")

    failures = Counter(reason_of(r["error"]) for r in rows if r["error"] is not None)
    n_failed = sum(failures.values())
    summary.done, summary.skipped, summary.failed = n_edited, n_reused, failures
    # the counts every manifest has (done = edited, skipped = reused), then this stage's own
    manifest.counts = summary.counts() | {"pairs": len(pairs), "settings": len(cfg.settings()), "edited": n_edited, "reused": n_reused}
    if leakage is not None:
        manifest.counts["images_in_training"] = len(leakage.overlap)
    manifest.failures = dict(failures)
    manifest.finished_at = utcnow().isoformat()
    manifest_path = manifest.write(out)
    write_grids(out, rows, cfg.settings())  # OUT/grids: one page + a PNG per pair (see softrepa.grids)

    summary.finish()
    summary.extra = {"pairs": len(pairs), "settings": len(cfg.settings()), "scores": str(out / "scores.parquet")}
    if leakage is not None:
        summary.extra["images in the tokens' training set"] = len(leakage.overlap)
    return EvalResult(out, out / "scores.parquet", out / "summary.md", out / "summary.csv", table, unavailable,
                      len(pairs), n_edited, n_reused, n_failed, md, manifest_path, leakage, summary)


def check_same_pairs(cfg: EvalConfig, out: Path) -> None:
    """Refuse to score other ``--pairs`` into an ``--out`` that holds scores of an earlier input.

    ``scores.parquet`` and the summary are rewritten by every run from the
    pairs of that run, so a rerun with another input would silently drop the
    earlier scores (their edited images stay, unscored). A researcher
    comparing two pair sets wants both tables: one folder per input keeps
    them apart. The same input rerun (resumed, more settings, another
    --limit) is fine.
    """
    path = out / CONFIG_FILE
    if not (out / "scores.parquet").exists() or not path.is_file():
        return
    try:
        before = json.loads(path.read_text()).get("pairs")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable record says nothing about the input
    if before is None or before == cfg.pairs or Path(before).resolve() == Path(cfg.pairs).resolve():
        return
    raise ConfigError(f"{out} already holds the scores of --pairs {before}; this run evaluates {cfg.pairs}, and its scores would replace them",
                      "--pairs", f"write this evaluation to a new --out (or rerun with --pairs {before} to continue that one)")


def _summary_markdown(cfg: EvalConfig, pairs: list[Pair], rows: list[dict[str, Any]], table: list[dict[str, Any]], fid: dict[str, Any],
                      unavailable: dict[str, str], leakage: Leakage | None) -> str:
    """summary.md: the table, a line per missing metric and per caveat, and the table over passed pairs."""
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
    return md
