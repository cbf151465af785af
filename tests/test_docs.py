"""The docs name files that exist: README.md and docs/ARCHITECTURE.md point readers at code paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATH = re.compile(r"\b(?:dataprep|softrepa|flows|tests|bench|prompts)/[\w/.-]*\w\.(?:py|txt|j2|md|json)\b")


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md"])
def test_every_code_path_a_doc_names_exists(doc):
    """Before: ARCHITECTURE told a new stage to add its schema to dataprep/store.py, which the
    refactor had split into the dataprep/store/ package."""
    text = (REPO / doc).read_text(encoding="utf-8")
    missing = sorted({p for p in PATH.findall(text) if not (REPO / p).exists()})
    assert not missing, f"{doc} names files that do not exist: {missing}"
