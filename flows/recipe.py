"""The paper's recipe in one call: COCO batches -> soft tokens -> FlowEdit on DIV2K pairs.

``run_recipe`` wires three existing stages, nothing else:

1. ``dataprep.batches.build_coco_batches``: contrastive batch shards from COCO
   captions (the official trainer's data, ``train.py --dataset coco``; five
   captions per image, one positive per epoch), optionally with the DIV2K
   single-concept edits as hard negatives;
2. ``softrepa.train.train`` on those shards;
3. ``softrepa.evaluate.evaluate_edit`` on the DIV2K caption/target pairs with
   the new tokens, with the paper's Table 5 rows by default;

and writes ``OUT/paper_table.md``: our rows with the paper's numbers beside
them (``softrepa.paper``). Training on COCO and evaluating on DIV2K keeps
training images out of the evaluation (the evaluator's leakage guard checks).

Output folders: ``OUT/batches``, ``OUT/train`` (``tokens/``), ``OUT/eval``.
Every step resumes: identical batch inputs give the same shards, training
resumes from its checkpoints with ``resume``, edited images are reused.

``paper_recipe`` is the same as a Prefect flow (``prefect.yaml``: the
``paper-recipe`` deployment, run on demand); ``softrepa recipe`` is the
command line.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from prefect import flow

from dataprep.errors import ConfigError
from dataprep.runtime import option
from softrepa.paper import SD3_MODEL
from softrepa import paper
from softrepa.metrics import MetricConfig


@dataclass
class RecipeConfig:
    """What the recipe needs (``softrepa recipe``'s flags and the flow's parameters); the ``*_options`` dicts map onto ``BatchOptions``,
    ``TrainConfig`` and ``EvalConfig`` fields (``eval_options["metrics"]`` onto
    ``MetricConfig``), so every flag of the three commands is reachable. Paths that do not exist cannot be built."""

    coco_captions: str = option(help="COCO annotations/captions_train2017.json (the official trainer's data).")
    coco_images: str = option(help="COCO train2017/ image folder.")
    pairs: str = option(help="DIV2K caption/target pairs: a dataprep run directory (RUN/edits) or a prompts_editing.json.")
    out: str = option("runs/paper", "Output folder: batches/, train/, eval/, paper_table.md.")
    model: str = option(SD3_MODEL, "SD3 diffusers pipeline (hub id or folder).")
    hard_negatives: str | None = option(None, "An edits store (RUN/edits) whose single-concept edits join the batches as hard negatives (optional; the official recipe has none).")
    rows: str = option("table5", "table5 (DIV2K) or table6 (Cat2Dog rows).")
    batch_options: dict[str, Any] = field(default_factory=dict)
    train_options: dict[str, Any] = field(default_factory=dict)
    eval_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        for value, flag, fix in ((self.coco_captions, "--coco-captions", "pass annotations/captions_train2017.json"),
                                 (self.coco_images, "--coco-images", "pass the train2017/ folder"),
                                 (self.pairs, "--pairs", "pass a DIV2K run directory (RUN/edits) or a prompts_editing.json")):
            if not Path(value).exists():
                raise ConfigError(f"{value} does not exist", flag, fix)
        local = Path(self.model)
        if (local.exists() or self.model.startswith((".", "/"))) and not (local / "model_index.json").exists():
            raise ConfigError(f"{self.model} is not a diffusers pipeline folder (no model_index.json)", "--model", "pass an SD3 pipeline folder or hub id")
        if self.hard_negatives is not None and not Path(self.hard_negatives).is_dir():
            raise ConfigError(f"{self.hard_negatives} is not a folder", "--hard-negatives", "pass an edits store (RUN/edits) or omit it")


@dataclass
class RecipeResult:
    batches: Any  # dataprep.batches.BatchSummary
    train: Any  # softrepa.train.TrainResult
    evaluation: Any  # softrepa.evaluate.EvalResult
    table_md: Path  # OUT/paper_table.md
    markdown: str


def _build(cls: type, options: dict[str, Any] | None, flag: str, **fixed: Any) -> Any:
    """:func:`flows.flows.build` with the recipe's own fields locked."""
    from flows.flows import build

    return build(cls, options, flag, locked="they are set by the recipe: drop them (use its own flags: --model, --pairs, --out)", **fixed)


def recipe_configs(cfg: RecipeConfig) -> tuple[Any, Any, Any, Path]:
    """(BatchOptions, TrainConfig without its batch run yet, EvalConfig without tokens yet, OUT), all checked before any work."""
    from dataprep.batches import BatchOptions
    from softrepa.evaluate import EvalConfig

    out = Path(cfg.out)
    with recipe_flags("batch_options"):
        batch_opts = _build(BatchOptions, {"preset": "sd3", **cfg.batch_options}, "batch_options")
    if batch_opts.preset != "sd3":
        raise ConfigError("the recipe trains SD3 tokens (FlowEdit runs on SD3)", "batch_options.preset", "use preset sd3")
    with recipe_flags("eval_options"):
        eval_opts = dict(cfg.eval_options)
        metrics = _build(MetricConfig, eval_opts.pop("metrics", None), "eval_options.metrics")
        eval_opts.setdefault("rows", cfg.rows)
        eval_opts.setdefault("progress", cfg.progress)
        # the tokens folder does not exist yet: validate with a placeholder, the real one is set after training
        eval_cfg = _build(EvalConfig, eval_opts, "eval_options", pairs=cfg.pairs, model=cfg.model, out=str(out / "eval"), tokens=None,
                          methods=("flowedit", "flowedit+tokens"), metrics=metrics)
        replace(eval_cfg, methods=("flowedit",)).validate()
    return batch_opts, train_config(cfg, out), eval_cfg, out


def train_config(cfg: RecipeConfig, out: Path) -> Any:
    """The training config, every value checked now, though its batches are written later.

    An error names the recipe's flag (``--train-steps``, or ``--options``
    with the field), not the trainer's: the trainer's flags are not on this
    command line.
    """
    from softrepa.train import TrainConfig

    options = dict(cfg.train_options)
    options.setdefault("progress", cfg.progress)
    with recipe_flags("train_options", {"--steps": "--train-steps"}):
        train_cfg = _build(TrainConfig, options, "train_options", preset="sd3", batches=str(out / "batches"), model=cfg.model, out=str(out / "train"))
        with tempfile.TemporaryDirectory() as empty:  # the batches folder does not exist yet; it is checked again before training
            replace(train_cfg, batches=empty).validate()
    return train_cfg


RECIPE_FLAGS = ("--coco-captions", "--coco-images", "--pairs", "--out", "--model", "--hard-negatives", "--rows", "--train-steps")


@contextmanager
def recipe_flags(section: str, renamed: dict[str, str] | None = None):
    """Re-raise a stage's ConfigError naming this command's flag: the stage's own flag, where the recipe
    has it, else ``--options`` and the field of ``section`` (the stages' flags are not on this command line)."""
    try:
        yield
    except ConfigError as exc:
        flag = (renamed or {}).get(exc.flag, exc.flag)
        if flag in RECIPE_FLAGS or not (flag or "").startswith("--"):
            if flag == exc.flag:
                raise
            raise ConfigError(exc.message, flag, exc.fix) from None
        fields = ", ".join(f.removeprefix("--").replace("-", "_") for f in flag.split("/"))
        raise ConfigError(exc.message, f"--options ({section}: {fields})", exc.fix) from None


def run_recipe(cfg: RecipeConfig, on_stage: Callable[[str], None] | None = None) -> RecipeResult:
    """Batches, training, evaluation, and the side-by-side table. ConfigError before any work for a bad option."""
    from dataprep.batches import build_coco_batches
    from softrepa.evaluate import evaluate_edit
    from softrepa.train import train

    say = on_stage or (lambda msg: None)
    # the batch run id is known only after writing; every option is checked before any work
    batch_opts, probe, eval_cfg, out = recipe_configs(cfg)
    batches_dir = out / "batches"

    say(f"batches: COCO {cfg.coco_captions} -> {batches_dir}")
    summary = build_coco_batches(cfg.coco_captions, cfg.coco_images, batches_dir, batch_opts, edits_dir=cfg.hard_negatives)
    tcfg = replace(probe, batch_run=summary.run_id)
    tcfg.validate()
    say(f"train: {summary.rows} batch rows -> {out / 'train'}")
    tres = train(tcfg)
    say(f"evaluate: {cfg.pairs} -> {out / 'eval'}")
    eres = evaluate_edit(replace(eval_cfg, tokens=str(tres.tokens_dir)))
    table = paper.side_by_side_markdown(eres.table, eval_cfg.rows)
    notes = []
    if eres.leakage is not None and eres.leakage.overlap:
        notes.append(f"- WARNING, leakage: {eres.leakage.message()}")
    for metric, why in eres.unavailable.items():
        notes.append(f"- {paper.LABELS.get(metric, metric)}: {why}")
    md = table + ("\n" + "\n".join(notes) + "\n" if notes else "")
    path = out / "paper_table.md"
    path.write_text(md)
    return RecipeResult(summary, tres, eres, path, md)


@flow(name="paper-recipe", log_prints=True)
def paper_recipe(coco_captions: str, coco_images: str, pairs: str, out: str = RecipeConfig.out, model: str = RecipeConfig.model,
                 hard_negatives: str | None = None, rows: str = RecipeConfig.rows, batch_options: dict[str, Any] | None = None,
                 train_options: dict[str, Any] | None = None, eval_options: dict[str, Any] | None = None) -> Any:
    """The recipe as a Prefect flow; publishes the side-by-side table as an artifact."""
    from flows import artifacts

    cfg = RecipeConfig(coco_captions, coco_images, pairs, out, model, hard_negatives, rows, dict(batch_options or {}),
                       dict(train_options or {}), dict(eval_options or {}), progress=False)
    result = run_recipe(cfg, on_stage=print)
    artifacts.publish_markdown("paper-recipe-table", result.markdown, "our Table 5 rows with the paper's numbers beside them")
    return result
