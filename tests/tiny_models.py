"""The one way the tests build tiny random models: each kind once per test
process, under one temporary folder, always loaded back by path.

``tests/conftest.py`` hands them to tests as session fixtures (``tiny_models``,
``tiny_pipelines``, ``official_tokens``, ``metric_models``, ``samples_dir``);
the functions are for the few helpers that run outside a fixture. The
builders are the library's own (``dataprep.tiny``, ``softrepa.tiny``,
``softrepa.metrics``), the ones ``dataprep tiny-models``/``softrepa
tiny-models`` and ``--tiny-metrics`` use, so tests load what the demo loads.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path


@functools.cache
def root() -> Path:
    """The process's folder of tiny models (removed when the process exits)."""
    path = Path(tempfile.mkdtemp(prefix="tiny_models_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def tiny_models() -> Path:
    """A folder with ``llava/`` and ``llama/`` (dataprep's captioner and rewriter)."""
    from dataprep.tiny import write_tiny_llama, write_tiny_llava

    out = root() / "text"
    write_tiny_llava(out / "llava")
    write_tiny_llama(out / "llama")
    return out


class _Pipelines(Mapping):
    """backbone -> folder of a tiny diffusers pipeline; each is built on first use
    (SDXL costs seconds; a test that needs SD3 only does not pay for it)."""

    def __getitem__(self, backbone: str) -> Path:
        from softrepa.tiny import write_tiny_pipelines

        return write_tiny_pipelines(root() / "pipelines", (backbone,))[backbone]  # reused once written

    def __iter__(self) -> Iterator[str]:
        from softrepa.tiny import BACKBONES

        return iter(BACKBONES)

    def __len__(self) -> int:
        return len(list(iter(self)))


def tiny_pipelines() -> Mapping[str, Path]:
    """backbone (sd3, sdxl, sd1.5) -> folder of a tiny random diffusers pipeline."""
    return _Pipelines()


@functools.cache
def official_tokens() -> Path:
    """``<backbone>/dc_tokens.pth`` (+ ``dc_t_tokens.pth``), pickled like the released files."""
    from softrepa.tiny import write_official_token_sets

    write_official_token_sets(root() / "official-tokens")
    return root() / "official-tokens"


@functools.cache
def metric_models() -> dict[str, Path]:
    """``clip`` (also the PickScore stand-in) and ``lpips``: tiny metric networks."""
    from softrepa.metrics import write_tiny_metric_models

    return write_tiny_metric_models(root() / "metrics")


@functools.cache
def samples_dir() -> Path:
    """A DIV2K-shaped folder: 0001.png (2040x1356), 0002.png (1356x2040) and
    prompts_editing.json in the official layout."""
    from dataprep.tiny import write_div2k_samples

    out = root() / "div2k"
    write_div2k_samples(out, n=2)
    return out
