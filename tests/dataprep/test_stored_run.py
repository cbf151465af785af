"""A run folder written by an earlier release resumes with nothing recomputed.

``tests/fixtures/stored_run`` was written by ``tests/fixtures/make_stored_run.py``
with the code of that time and is committed. Rerunning the same commands on
a copy must skip every row and leave every shard as it was: row keys,
schemas and the resume rule are what make a half-finished GPU run
resumable, and a refactor that changes any of them would silently redo it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "stored_run"
sys.path.insert(0, str(FIXTURE.parent))
from make_stored_run import CAPTION, REWRITE  # noqa: E402  the commands that wrote the fixture


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture
def stored_run(tmp_path, tiny_models) -> Path:
    run = tmp_path / "stored_run"
    shutil.copytree(FIXTURE, run, symlinks=False)
    (run / "models").symlink_to(tiny_models)
    return run


def _rerun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "dataprep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stage,args,n", [("captions", CAPTION, 3), ("edits", REWRITE, 3)])
def test_stored_run_resumes_with_nothing_recomputed(stored_run, stage, args, n):
    folder = stored_run / "run" / stage
    before = _digests(folder)
    rows_before = pq.read_table(folder).num_rows
    assert before and rows_before == n

    _rerun(args, stored_run)

    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["counts"]["skipped"] == n, manifest["counts"]
    assert manifest["counts"]["done"] == 0 and manifest["counts"]["failed"] == 0, manifest["counts"]
    assert _digests(folder) == before  # no shard rewritten, none added
