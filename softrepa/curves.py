"""Training curves (loss, accuracy, learning rate, held-out CLIP) as a PNG, from ``train_log.jsonl``.

The trainer calls :func:`write_curves` at every checkpoint and at the end,
so the picture always matches the log on disk. matplotlib is a dependency
but imported lazily; where it is missing nothing is drawn and the caller
gets the reason to print (training goes on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dataprep.store import atomic_file


@dataclass
class Curves:
    """The series drawn, read from one log: ``step`` aligned with ``loss``/``accuracy``/``lr``."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    clip: list[float] = field(default_factory=list)


def read_curves(log_path: str | Path) -> Curves:
    """Parse a trainer log: step records (``step``) and held-out evaluations (``eval_step``).

    Lines that are not JSON objects (a line cut by a kill) are ignored.
    """
    c = Curves()
    path = Path(log_path)
    if not path.exists():
        return c
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if "step" in rec and "loss" in rec:
            c.step.append(int(rec["step"]))
            c.loss.append(float(rec["loss"]))
            c.accuracy.append(float(rec.get("accuracy", float("nan"))))
            c.lr.append(float(rec.get("lr", float("nan"))))
        elif "eval_step" in rec and rec.get("clip") is not None:
            c.eval_step.append(int(rec["eval_step"]))
            c.clip.append(float(rec["clip"]))
    return c


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_curves(log_path: str | Path, png_path: str | Path) -> tuple[Curves, str | None]:
    """Draw the log's curves into ``png_path`` (written to a temp name, then renamed).

    Returns the series drawn and ``None``, or the series and the reason no
    PNG was written (matplotlib missing, or no step in the log yet).
    """
    curves = read_curves(log_path)
    if not curves.step:
        return curves, "no training steps in the log yet"
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window, works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        return curves, "matplotlib is not installed: pip install matplotlib to get curves.png"

    n_panels = 4 if curves.clip else 3
    fig, axes = plt.subplots(n_panels, 1, figsize=(7, 2.2 * n_panels), sharex=True)
    window = max(1, len(curves.step) // 50)
    panels = [("loss", curves.loss), ("accuracy", curves.accuracy), ("learning rate", curves.lr)]
    for ax, (name, values) in zip(axes, panels):
        ax.plot(curves.step, values, lw=0.6, alpha=0.4 if window > 1 else 1.0, label=name)
        if window > 1 and name != "learning rate":
            ax.plot(curves.step, _smooth(values, window), lw=1.4, label=f"{name} (mean of {window})")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if curves.clip:
        ax = axes[3]
        ax.plot(curves.eval_step, curves.clip, marker="o", lw=1.2)
        best = max(range(len(curves.clip)), key=curves.clip.__getitem__)
        ax.plot([curves.eval_step[best]], [curves.clip[best]], marker="*", ms=14, color="tab:red", label="best")
        ax.set_ylabel("held-out CLIP")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"softrepa train: {curves.step[-1]} steps")
    fig.tight_layout()
    try:
        with atomic_file(png_path, suffix=".tmp.png", fsync=False) as tmp:  # savefig picks the format by extension
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return curves, None
