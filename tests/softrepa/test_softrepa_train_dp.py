"""Data-parallel training under a real ``torchrun`` (2 CPU processes, gloo) on the tiny SD1.5.

Done-when (multi-process training): 2 processes x 1 row per step follow the
trajectory of 1 process x 2 rows per step (``--accumulate 2``) -- same rows,
same timesteps, losses, held-out CLIP scores and tokens equal within float32 tolerance (rtol 1e-5,
atol 1e-6: the two runs differ only in where the forward passes ran and in
gloo's summation) -- and a 2-process run killed after a step and resumed
from its last checkpoint continues that same trajectory. Both 2-process
runs go through the real CLI in one ``torchrun`` launch
(``tests/softrepa/dp_train_driver.py``): starting processes dominates the cost here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softrepa.tokens import load_tokens
from softrepa.train import TrainConfig, load_checkpoint, train
from tests.softrepa_fixtures import PROMPTS, tiny_pipelines, write_batch_shards, write_pngs

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _steps(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``softrepa train ARGS`` under torchrun: 3 steps, then killed-and-resumed to 4 (tests/softrepa/dp_train_driver.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "tests.softrepa.dp_train_driver", "--", *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")
def test_two_torchrun_processes_match_one_process_with_two_rows_per_step_and_resume(tmp_path, metric_models):
    pngs = [str(p) for p in write_pngs(tmp_path / "img", 8)]
    write_batch_shards(tmp_path / "b", "sd1.5", pngs, PROMPTS, n_rows=4, n_images=2, n_prompts=4, bad_uri_rows=(1,))
    model = str(tiny_pipelines()["sd1.5"])
    clip = str(metric_models["clip"])
    # scale 1000 / temperature 1: the tiny UNet's error differences are ~1e-3, so at the paper's 4 / 0.07
    # the contrastive logits underflow and only the denoising term would carry a gradient
    common = dict(preset="sd1.5", batches=str(tmp_path / "b"), model=model, lr=0.05, checkpoint_every=2, resolution="native",
                  progress=False, scale=1000.0, temperature=1.0, eval_holdout=2, eval_every=2, eval_steps=2, eval_batch_size=1,
                  eval_clip_model=clip)
    torch.set_num_threads(1)
    ref = train(TrainConfig(out=str(tmp_path / "ref"), steps=4, accumulate=2, **common))

    args = ["--preset", "sd1.5", "--batches", str(tmp_path / "b"), "--model", model, "--lr", "0.05", "--checkpoint-every", "2",
            "--resolution", "native", "--scale", "1000", "--temperature", "1", "--eval-holdout", "2", "--eval-every", "2",
            "--eval-steps", "2", "--eval-batch-size", "1", "--eval-clip-model", clip, "--out", str(tmp_path / "dp")]
    out = _torchrun(args, tmp_path)
    assert out.stdout.count("trained 3 steps") == 1 and out.stdout.count("trained 4 steps") == 1  # only the first process reports
    dp = tmp_path / "dp"
    state = load_checkpoint(dp / "checkpoints" / "step-0000002")
    assert len(state["generators"]) == 2 and not torch.equal(state["generators"][0], state["generators"][1])  # both processes' RNG
    assert not (dp / "checkpoints" / "step-0000003").exists()  # the resumed run went from step 2, its step 4 is a fresh checkpoint
    assert (dp / "checkpoints" / "step-0000004").exists()

    a, b = _steps(ref.log_path), _steps(dp / "train_log.jsonl")
    assert [(r["step"], r["batch_id"], r["t"]) for r in a] == [(r["step"], r["batch_id"], r["t"]) for r in b]
    assert any(len(r["batch_id"]) == 1 for r in a)  # the step whose other row was unreadable trained on one row
    assert len({round(r["contrastive"], 6) for r in a}) > 1  # the contrastive term is live, not stuck at log(P)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    ta, tb = load_tokens(ref.tokens_dir), load_tokens(dp / "tokens")
    torch.testing.assert_close(tb.tokens, ta.tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tb.t_embedding.weight, ta.t_embedding.weight, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ta.tokens, load_tokens(dp / "checkpoints" / "step-0000002").tokens)  # it did move after the resume
    assert json.loads((dp / "tokens" / "trained_images.json").read_text()) == json.loads((ref.tokens_dir / "trained_images.json").read_text())
    # held-out CLIP: each process samples its share of the prompts; the reduced mean is the 1-process one,
    # and the resumed run restored the best score so far (same "best" flags)
    ea = [json.loads(line) for line in ref.log_path.read_text().splitlines() if "eval_step" in line]
    eb = [json.loads(line) for line in (dp / "train_log.jsonl").read_text().splitlines() if "eval_step" in line]
    assert [(e["eval_step"], e["best"]) for e in eb] == [(e["eval_step"], e["best"]) for e in ea] and len(ea) == 2
    assert [e["clip"] for e in eb] == pytest.approx([e["clip"] for e in ea], rel=1e-5)
    torch.testing.assert_close(load_tokens(dp / "best").tokens, load_tokens(ref.tokens_dir.parent / "best").tokens, rtol=1e-5, atol=1e-6)
    skipped = [json.loads(line) for line in (dp / "train_log.jsonl").read_text().splitlines() if "skipped" in line]
    assert skipped and all(s["skipped"] == "b001" for s in skipped)  # one writer: each skip logged once per visit
