"""What to build: the grid (presets of the paper's appendix Table 3) and the run's knobs."""

from __future__ import annotations

from dataclasses import dataclass

from dataprep import clusters
from dataprep.errors import ConfigError

# Paper, appendix Table 3: (images, prompts) per batch.
PRESETS: dict[str, tuple[int, int]] = {"sd3": (4, 4), "sdxl": (1, 16), "sd1.5": (4, 8)}


@dataclass(frozen=True)
class BatchOptions:
    """What to build. CLI flags map one-to-one to these fields.

    ``images`` / ``prompts`` override the preset's grid (``preset="custom"``
    needs both). ``hard_negatives``: at most this many edits per batch; None
    means as many as fit (``min(images, prompts - images)``).
    """

    preset: str = "sd3"
    images: int | None = None
    prompts: int | None = None
    hard_negatives: int | None = None
    epochs: int = 1
    drop_last: bool = True
    seed: int = 0
    rows_per_shard: int = 1024
    drop_image_flags: tuple[str, ...] = ()  # leave out images whose caption row has one of these image_flags
    require_judge: bool = False  # hard negatives only from edits the judge graded good (OUT/judge)
    dedup: str = "separate"  # dedup clusters (OUT/dedup): separate | keep-one | off

    @property
    def grid(self) -> tuple[int, int]:
        """(images per batch, prompts per batch)."""
        base = PRESETS.get(self.preset, (None, None))
        # `is None`, not `or`: an explicit 0 must reach validate(), not become the preset's value
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

    def validate(self) -> "BatchOptions":
        """Raise ConfigError naming the flag and the fix; return self."""
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
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}", "--epochs", "pass a positive number")
        if self.rows_per_shard < 1:
            raise ConfigError(f"rows per shard must be >= 1, got {self.rows_per_shard}", "--rows-per-shard", "pass a positive number")
        if self.drop_image_flags:
            from dataprep.imagecheck import parse_flags  # inside: imagecheck imports Pillow, which options alone never need

            parse_flags(",".join(self.drop_image_flags))
        if self.dedup not in clusters.DEDUP_MODES:
            raise ConfigError(f"unknown --dedup mode {self.dedup!r}", "--dedup", f"use one of {', '.join(clusters.DEDUP_MODES)}")
        return self
