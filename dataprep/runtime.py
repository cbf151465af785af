"""What every command of the project shares at run time: device, dtype, progress bar.

One vocabulary across ``dataprep`` and ``softrepa``: ``--device`` is
``auto|cpu|cuda|cuda:N|mps`` and ``--dtype`` is ``auto|float32|bfloat16|float16``.
torch and rich are imported inside the functions, so ``--help`` never loads them.
"""

from __future__ import annotations

from dataprep.errors import ConfigError

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
