"""What every command of the project shares at run time: device, dtype, progress bar, summary.

One vocabulary across ``dataprep`` and ``softrepa``: ``--device`` is
``auto|cpu|cuda|cuda:N|mps`` and ``--dtype`` is ``auto|float32|bfloat16|float16``.
torch and rich are imported inside the functions, so ``--help`` never loads them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataprep.errors import ConfigError, reason_of

DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", "--device", "use --device cpu, or install a CUDA build of torch")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def progress_bar(description: str, total: int | None, enabled: bool = True):
    """A rich progress bar with items/s; a no-op object when disabled."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class _Rate(TextColumn):
        def render(self, task):  # items/s, the figure researchers compare across engines
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f}/s" if speed else "-/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


@dataclass
class StageSummary:
    stage: str
    out_dir: Path
    run_id: str
    done: int = 0  # rows generated good in this run
    skipped: int = 0  # already had a good row
    failed: Counter = field(default_factory=Counter)  # reason -> rows
    truncated: int = 0  # good rows that hit --max-new-tokens
    wall_s: float = 0.0
    shards: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific figures (e.g. pass rate)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def rate(self) -> float:
        """Rows processed by the model or the decoder per second of wall time."""
        n = self.done + self.n_failed
        return n / self.wall_s if self.wall_s > 0 else 0.0

    def fail(self, error: str) -> None:
        self.failed[reason_of(error)] += 1

    def finish(self) -> "StageSummary":
        self.wall_s = time.perf_counter() - self._t0
        return self

    def counts(self) -> dict[str, int]:
        return {"done": self.done, "skipped": self.skipped, "failed": self.n_failed, "truncated": self.truncated}


def print_summary(summary: StageSummary, console=None, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title or f"{summary.stage}: summary", show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row(f"{summary.stage} (this run)", str(summary.done))
    t.add_row("skipped (already done)", str(summary.skipped))
    t.add_row("failed", str(summary.n_failed))
    for reason, n in sorted(summary.failed.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(f"  failed: {reason}", str(n))
    if summary.truncated:
        t.add_row("hit --max-new-tokens (finish_reason=length)", str(summary.truncated))
    for k, v in summary.extra.items():
        t.add_row(k, v if isinstance(v, str) else f"{v:.3g}" if isinstance(v, float) else str(v))
    t.add_row("wall time", f"{summary.wall_s:.1f} s")
    t.add_row("rate", f"{summary.rate:.2f} rows/s")
    t.add_row("shards", str(summary.out_dir))
    console.print(t)
