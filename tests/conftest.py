"""Shared fixtures: tiny random models on disk, DIV2K-shaped samples, images.

Tiny models are built once per session from small configs and saved with
save_pretrained; tests load them by path through the real loading code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory) -> Path:
    """A DIV2K-shaped folder the tests make themselves: 0001.png (2040x1356),
    0002.png (1356x2040) and prompts_editing.json in the official layout."""
    from dataprep.tiny import write_div2k_samples

    root = tmp_path_factory.mktemp("div2k_samples")
    write_div2k_samples(root, n=2)
    return root


@pytest.fixture(scope="session")
def editing_pairs(samples_dir) -> Path:
    """The samples' caption/target pairs, as the official editing script reads them."""
    return samples_dir / "prompts_editing.json"


@pytest.fixture(scope="session")
def official_tokens(tmp_path_factory) -> Path:
    """DIR/<backbone>/dc_tokens.pth (+ dc_t_tokens.pth), pickled like the released files."""
    from softrepa.tiny import write_official_token_sets

    root = tmp_path_factory.mktemp("official_tokens")
    write_official_token_sets(root)
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """DIR with llava/ and llama/ (tiny random, loadable with from_pretrained)."""
    from dataprep.tiny import write_tiny_llama, write_tiny_llava

    root = tmp_path_factory.mktemp("tiny_models")
    write_tiny_llava(root / "llava")
    write_tiny_llama(root / "llama")
    return root
