"""What to build: the grid (presets of the paper's appendix Table 3) and the run's knobs."""

from __future__ import annotations

from dataclasses import dataclass

from dataprep import clusters
from dataprep.errors import ConfigError
from dataprep.runtime import at_least, option

# Paper, appendix Table 3: (images, prompts) per batch.
PRESETS: dict[str, tuple[int, int]] = {"sd3": (4, 4), "sdxl": (1, 16), "sd1.5": (4, 8)}


@dataclass(frozen=True)
class BatchOptions:
    """What to build; the fields are `dataprep batches`' flags. Invalid values cannot be built.

    ``images`` / ``prompts`` override the preset's grid (``preset="custom"``
    needs both). ``hard_negatives``: at most this many edits per batch; None
    means as many as fit (``min(images, prompts - images)``).
    """

    preset: str = option("sd3", "Grid of paper Table 3: sd3 = 4 images x 4 prompts (4 pos, 12 neg), sdxl = 1 x 16 (1, 15), sd1.5 = 4 x 8 (4, 28); or custom with --images/--prompts.", panel="Grid")
    images: int | None = option(None, "Images per batch (overrides the preset's).", panel="Grid")
    prompts: int | None = option(None, "Prompts per batch, positives included (overrides the preset's); must be >= --images.", panel="Grid")
    hard_negatives: int | None = option(None, "At most K edits (hard negatives) per batch; default as many as fit: min(images, prompts - images).", panel="Grid")
    epochs: int = option(1, "Passes over the images; each image once per epoch, reshuffled each epoch.", panel="Run")
    drop_last: bool = option(True, "Drop the last partial batch of an epoch (fixed grid shape, default) or keep it with fewer images.", flag="--drop-last/--keep-last", panel="Run")
    seed: int = option(0, "Shuffle and negative-sampling seed; same inputs + seed give byte-identical shards.", panel="Run")
    rows_per_shard: int = option(1024, "Batches per Parquet shard (memory holds at most this many beyond the caption index).", panel="Run")
    # leave out images whose caption row has one of these image_flags
    drop_image_flags: tuple[str, ...] = option((), "Leave out images whose caption row has any of these image checks, comma-separated: small,blank,aspect (see `dataprep caption ... --min-side/--blank-std/--max-aspect`).", panel="Input")
    # hard negatives only from edits the judge graded good (OUT/judge)
    require_judge: bool = option(False, "Use only edits the judge graded good as hard negatives (run `dataprep judge` first).", panel="Quality")
    dedup: str = option("separate", "Duplicate clusters of `dataprep dedup`: separate (never two members of a cluster in one batch; default, when records exist), keep-one (one image per cluster), off.", panel="Quality")

    @property
    def grid(self) -> tuple[int, int]:
        """(images per batch, prompts per batch)."""
        base = PRESETS.get(self.preset, (None, None))
        # `is None`, not `or`: an explicit 0 must reach __post_init__'s check, not become the preset's value
        return (base[0] if self.images is None else self.images, base[1] if self.prompts is None else self.prompts)  # type: ignore[return-value]

    @property
    def label(self) -> str:
        """The preset name written into each row: the preset, or custom-NxM."""
        n, m = self.grid
        if self.preset in PRESETS and PRESETS[self.preset] == (n, m):
            return self.preset
        return f"custom-{n}x{m}"

    @property
    def max_hard_negatives(self) -> int:
        n, m = self.grid
        fit = min(n, m - n)
        return fit if self.hard_negatives is None else self.hard_negatives

    def __post_init__(self) -> None:
        if self.preset not in PRESETS and self.preset != "custom":
            raise ConfigError(f"unknown preset {self.preset!r}", "--preset", f"use one of {', '.join(PRESETS)} or custom with --images/--prompts")
        if self.preset == "custom" and (self.images is None or self.prompts is None):
            raise ConfigError("preset custom needs a grid", "--images/--prompts", "pass both, e.g. --images 4 --prompts 8")
        n, m = self.grid
        if n < 1:
            raise ConfigError(f"images per batch must be >= 1, got {n}", "--images", "pass a positive number")
        if m < n:
            raise ConfigError(f"{m} prompts cannot hold the positives of {n} images", "--prompts", f"pass --prompts >= {n} (each image needs its own caption in the batch)")
        if self.hard_negatives is not None:
            fit = min(n, m - n)
            if self.hard_negatives < 0 or self.hard_negatives > fit:
                raise ConfigError(
                    f"--hard-negatives {self.hard_negatives} does not fit a {n}x{m} grid (at most {fit}: one edit per image, {m - n} free prompt slots)",
                    "--hard-negatives",
                    f"pass 0..{fit}, or a grid with more prompts than images (e.g. --images {n} --prompts {2 * n})",
                )
        at_least(self.epochs, 1, "--epochs", "pass a positive number")
        at_least(self.rows_per_shard, 1, "--rows-per-shard", "pass a positive number")
        if self.drop_image_flags:
            from dataprep.imagecheck import parse_flags  # inside: imagecheck imports Pillow, which options alone never need

            parse_flags(",".join(self.drop_image_flags))
        if self.dedup not in clusters.DEDUP_MODES:
            raise ConfigError(f"unknown --dedup mode {self.dedup!r}", "--dedup", f"use one of {', '.join(clusters.DEDUP_MODES)}")
