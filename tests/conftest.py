"""Shared fixtures: tiny random models on disk, the reference samples, images.

Tiny models are built once per session from small configs and saved with
save_pretrained; tests load them by path through the real loading code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo beside a copy of shared/; a developer checkout has it there too.
SHARED = Path(os.environ.get("SOFTREPA_SHARED", REPO.parent / "shared"))
SAMPLES = SHARED / "reference" / "softrepa" / "samples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not (SAMPLES / "0001.png").exists():
        pytest.fail(f"reference samples not found at {SAMPLES}; set SOFTREPA_SHARED to the shared/ folder")
    return SAMPLES


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """DIR with llava/ and llama/ (tiny random, loadable with from_pretrained)."""
    from dataprep.tiny import write_tiny_llama, write_tiny_llava

    root = tmp_path_factory.mktemp("tiny_models")
    write_tiny_llava(root / "llava")
    write_tiny_llama(root / "llama")
    return root
