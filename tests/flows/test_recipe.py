"""The paper's recipe end to end on tiny models: COCO-shaped data -> batches -> tokens -> Table 5 beside the paper's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.softrepa_fixtures import tiny_pipelines

pytestmark = pytest.mark.slow

WORDS = ["cat", "dog", "fox", "car", "boat", "tree", "house", "cup"]
REPO = Path(__file__).resolve().parents[2]


def softrepa_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``softrepa ARGS`` in a child process. In this one, prefect's logging would keep the
    stream a CliRunner captured and fail later flow tests with 'I/O operation on closed file'."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", COLUMNS="300")
    return subprocess.run([sys.executable, "-m", "softrepa.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _recipe(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    cap, imgs = _coco(tmp_path / "coco")
    pairs = _div2k_pairs(tmp_path / "div2k")
    return softrepa_cli("recipe", "--coco-captions", str(cap), "--coco-images", str(imgs), "--pairs", str(pairs), "--out", str(tmp_path / "out"), *extra)


def _coco(root):
    """A COCO-shaped folder: train2017/*.jpg and annotations/captions_train2017.json (five captions per image)."""
    imgs = root / "train2017"
    imgs.mkdir(parents=True)
    rng = np.random.RandomState(0)
    images, anns = [], []
    for i, word in enumerate(WORDS):
        name = f"{i + 1:012d}.jpg"
        Image.fromarray((rng.rand(40, 48, 3) * 255).astype("uint8")).save(imgs / name)
        images.append({"id": i + 1, "file_name": name, "width": 48, "height": 40})
        for k, adj in enumerate(["a red", "a small", "a photo of a", "the", "one"]):
            anns.append({"id": 100 * (i + 1) + k, "image_id": i + 1, "caption": f"{adj} {word} on a table"})
    (root / "annotations").mkdir()
    cap = root / "annotations" / "captions_train2017.json"
    cap.write_text(json.dumps({"images": images, "annotations": anns}))
    return cap, imgs


def _div2k_pairs(root):
    root.mkdir(parents=True)
    rng = np.random.RandomState(1)
    items = []
    for i, (src, tgt) in enumerate([("a yellow building with a green door", "a red building with a green door"),
                                    ("a brown squirrel on a branch", "a grey rabbit on a branch")]):
        name = f"{i + 1:04d}.png"
        Image.fromarray((rng.rand(36, 44, 3) * 255).astype("uint8")).save(root / name)
        items.append({"prompt": src, "img_path": name, "tgt_prompt": tgt})
    path = root / "prompts_editing.json"
    path.write_text(json.dumps(items))
    return path


def test_recipe_runs_end_to_end_and_prints_the_paper_numbers_beside_ours(tmp_path, metric_models):

    model = tiny_pipelines()["sd3"]
    cap, imgs = _coco(tmp_path / "coco")
    pairs = _div2k_pairs(tmp_path / "div2k")
    options = {
        "train_options": {"resolution": 32, "device": "cpu", "checkpoint_every": 100,
                          # 8 COCO images are too few to hold 50 out for the best-by-CLIP pick (a real run keeps it)
                          "best_by": "none"},
        # tiny models: 2 steps, edit over the last one; the table's target CFG rows stay the paper's
        "eval_options": {"steps": 2, "n_max": 1, "size": 32, "device": "cpu",
                         "metrics": {"metrics": ["clip", "lpips"], "clip_model": str(metric_models["clip"]),
                                     "pickscore_processor": None, "lpips_model": str(metric_models["lpips"]), "device": "cpu"}},
    }
    (tmp_path / "options.json").write_text(json.dumps(options))
    out = tmp_path / "paper"
    res = softrepa_cli("recipe", "--coco-captions", str(cap), "--coco-images", str(imgs), "--pairs", str(pairs),
                       "--model", str(model), "--out", str(out), "--train-steps", "1", "--options", str(tmp_path / "options.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    res.output = res.stdout

    # trained on COCO: the tokens record COCO images; the batches hold COCO ids only
    assert (out / "train" / "tokens" / "tokens.json").exists()
    import pyarrow.parquet as pq

    ids = {i for f in (out / "batches").glob("part-*.parquet") for row in pq.read_table(f, columns=["image_ids"]).to_pylist() for i in row["image_ids"]}
    assert ids and all(i.startswith("coco/") for i in ids)

    table = (out / "paper_table.md").read_text()
    assert table in res.output
    lines = table.splitlines()
    ours = [ln for ln in lines if "| ours (" in ln]
    paper = [ln for ln in lines if "| paper |" in ln]
    assert len(ours) == 6 and len(paper) == 6  # Table 5: 3 FlowEdit + 3 FlowEdit + tokens rows
    assert "| FlowEdit | 1 | 13.5 | ours (2 pairs) |" in table
    assert "|  | 33 | 13.5 | paper | 0.380 | 21.749 | 0.261 | 0.255 | 52.038 | 0.154 |" in table
    assert "|  | 30 | 9 | paper | 0.466 | 21.884 | 0.263 | 0.260 | 52.633 | 0.149 |" in table
    # every "ours" row has real CLIP / LPIPS values; COCO training, DIV2K evaluation: no leakage
    for ln in ours:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[6] != "n/a" and cells[9] != "n/a"
    assert "leakage" not in table


def test_recipe_bad_option_fails_before_any_work(tmp_path):
    (tmp_path / "o.json").write_text(json.dumps({"eval_options": {"nmax": 3}}))
    res = _recipe(tmp_path, "--options", str(tmp_path / "o.json"))
    assert res.returncode == 2 and "eval_options" in res.stderr and "nmax" in res.stderr
    assert not (tmp_path / "out" / "batches").exists()
    # a field the recipe sets itself is refused, not silently overridden
    (tmp_path / "o.json").write_text(json.dumps({"eval_options": {"methods": ["flowedit"]}}))
    res = _recipe(tmp_path / "2", "--options", str(tmp_path / "o.json"))
    assert res.returncode == 2 and "set by the recipe" in res.stderr
    res = _recipe(tmp_path / "3", "--model", str(tmp_path))
    assert res.returncode == 2 and "--model" in res.stderr
    assert not (tmp_path / "3" / "out" / "batches").exists()


@pytest.mark.parametrize("extra,flag", [
    (["--train-steps", "0"], "--train-steps"),
    ({"train_options": {"min_t": 500, "max_t": 100}}, "--options (train_options: min_t, max_t)"),
])
def test_recipe_checks_the_training_options_before_the_batches_and_names_its_own_flags(tmp_path, extra, flag):
    """Before: the batches were built first, then the trainer's error named --steps / --min-t/--max-t, flags this command does not have."""
    if isinstance(extra, dict):
        (tmp_path / "o.json").write_text(json.dumps(extra))
        extra = ["--options", str(tmp_path / "o.json")]
    res = _recipe(tmp_path, *extra)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"(flag {flag})" in " ".join(res.stderr.split())
    assert not (tmp_path / "out" / "batches").exists()
