"""Shared fixtures: tiny random models on disk, DIV2K-shaped samples.

Every tiny model is built once per session by :mod:`tests.tiny_models` (from
small configs, saved with save_pretrained) and tests load it by path through
the real loading code. Ask for the fixture; don't build models in a test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests import tiny_models as tiny

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """A DIV2K-shaped folder the tests make themselves: 0001.png (2040x1356),
    0002.png (1356x2040) and prompts_editing.json in the official layout."""
    return tiny.samples_dir()


@pytest.fixture(scope="session")
def editing_pairs(samples_dir) -> Path:
    """The samples' caption/target pairs, as the official editing script reads them."""
    return samples_dir / "prompts_editing.json"


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """DIR with llava/ and llama/ (tiny random, loadable with from_pretrained)."""
    return tiny.tiny_models()


@pytest.fixture(scope="session")
def tiny_pipelines() -> Mapping[str, Path]:
    """backbone (sd3, sdxl, sd1.5) -> tiny random diffusers pipeline folder, each built on first use."""
    return tiny.tiny_pipelines()


@pytest.fixture(scope="session")
def official_tokens() -> Path:
    """DIR/<backbone>/dc_tokens.pth (+ dc_t_tokens.pth), pickled like the released files."""
    return tiny.official_tokens()


@pytest.fixture(scope="session")
def metric_models() -> dict[str, Path]:
    """clip (also the PickScore stand-in) and lpips: tiny metric networks, name -> folder."""
    return tiny.metric_models()
