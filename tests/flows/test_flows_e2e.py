"""End to end: a real `prefect server start`, `dataprep serve`, the
scheduled prepare run started by hand, and the event-triggered training.

Everything runs on loopback with a temporary PREFECT_HOME and tiny models;
every process the test starts is stopped by it (checked at the end).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


def _post(api: str, path: str, body: dict | None = None) -> list[dict]:
    r = httpx.post(f"{api}{path}", json=body or {}, timeout=30)
    r.raise_for_status()
    return r.json()


def _stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout_s: float = 60) -> bool:
    """Signal the process group we started (SIGTERM, as a service manager would).

    Returns whether it exited on its own; kills it otherwise. Either way no
    process of the group is left afterwards.
    """
    graceful = True
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            graceful = False
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while True:  # flow-run subprocesses of the runner share its group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return graceful
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            graceful = False
        time.sleep(0.5)


@pytest.fixture
def server(tmp_path):
    from dataprep import server

    home = tmp_path / "prefect-home"
    state = server.start(home, server.free_port(), timeout_s=240, ui=False)
    try:
        yield state
    finally:
        server.stop(home)
        time.sleep(1)
        assert not server._alive(state.pid), "prefect server still running after stop()"


def div2k_folder(samples: Path, out: Path) -> Path:
    """The two reference samples as DIV2K 0001/0002 plus their colour negatives as 0003/0004.

    The smallest paper grid (SD3, 4 images x 4 prompts, Table 3) needs four
    images with four distinct captions, and the trainer accepts only
    paper-preset shards. (The tiny LLaVA captions a mirror image like its
    original; a negative it does not.)
    """
    from PIL import Image, ImageOps

    out.mkdir()
    for n in (1, 2):
        (out / f"{n:04d}.png").symlink_to(samples / f"{n:04d}.png")
        ImageOps.invert(Image.open(samples / f"{n:04d}.png").convert("RGB")).save(out / f"{n + 2:04d}.png")
    return out


def test_serve_schedule_trigger_and_event_driven_training(server, tmp_path, tiny_models, samples_dir, tiny_pipelines, metric_models):
    from dataprep.server import client_env

    api = server.api_url
    data = div2k_folder(samples_dir, tmp_path / "DIV2K_train_HR")
    sd3 = tiny_pipelines["sd3"]
    run = tmp_path / "run"
    env = client_env(server) | {"PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        serve = subprocess.Popen(
            [sys.executable, "-m", "dataprep", "serve", "--home", server.home, "--cron", "30 1 * * *", "--data", str(samples_dir), "--out", str(run)],
            env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deployments = _wait(lambda: (d := _post(api, "/deployments/filter")) and len(d) == 3 and d, 180, "three deployments", serve, log)
        by_name = {d["name"]: d for d in deployments}
        assert set(by_name) == {"prepare-div2k", "train-on-new-shards", "evaluate-edit"}
        assert [s["schedule"]["cron"] for s in by_name["prepare-div2k"]["schedules"]] == ["30 1 * * *"]
        assert by_name["prepare-div2k"]["parameters"]["data"] == str(samples_dir)
        automations = _post(api, "/automations/filter")
        triggers = {a["actions"][0]["deployment_id"]: a["trigger"] for a in automations if a["actions"] and a["actions"][0].get("deployment_id")}
        assert triggers[by_name["train-on-new-shards"]["id"]]["expect"] == ["softrepa.shards.written"]
        assert triggers[by_name["evaluate-edit"]["id"]]["expect"] == ["softrepa.tokens.written"]

        # start the scheduled deployment now, on the samples with the tiny models
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        params = {
            "data": str(data), "out": str(run), "ids": "1-4",
            "caption_model": str(tiny_models / "llava"), "rewrite_model": str(tiny_models / "llama"),
            "engine": {"device": "cpu", "batch_size": "2"},
            "caption_options": {"workers": 0, "max_new_tokens": 8}, "rewrite_options": {"max_new_tokens": 8, "max_attempts": 1},
            "preset": "sd3",
            "train_options": {"model": str(sd3), "steps": 2, "device": "cpu", "checkpoint_every": 1, "resolution": "native", "best_by": "none"},
            "eval_options": {"steps": 4, "size": 32, "n_max": 3, "tgt_cfgs": [5.0], "device": "cpu",
                             "metrics": {"metrics": ["clip", "lpips"], "clip_model": str(metric_models["clip"]), "lpips_model": str(metric_models["lpips"]), "device": "cpu", "batch_size": 2}},
        }
        with temporary_settings({PREFECT_API_URL: api}):
            prep = run_deployment("prepare/prepare-div2k", parameters=params, timeout=600)
        assert prep.state.is_completed(), f"prepare ended {prep.state}\n{log.read_text()[-3000:]}"
        shards = sorted(str(p) for p in (run / "batches" / "sd3").glob("part-*.parquet"))
        assert shards

        def finished_runs(deployment: str):
            runs = _post(api, "/flow_runs/filter", {"deployments": {"id": {"any_": [by_name[deployment]["id"]]}}})
            return runs if runs and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs) else None

        (train_run,) = _wait(lambda: finished_runs("train-on-new-shards"), 600, "the event-triggered training run", serve, log)
        assert train_run["state_type"] == "COMPLETED", log.read_text()[-3000:]
        assert sorted(train_run["parameters"]["shards"]) == shards  # exactly the new shards
        tokens = list((run / "train").glob("*/tokens/tokens.safetensors"))  # the final tokens (checkpoints hold their own)
        assert len(tokens) == 1 and (tokens[0].parent / "tokens.json").is_file(), f"no final token files under {run / 'train'}"

        # the tokens event starts the evaluator on the run's pairs with those tokens
        (eval_run,) = _wait(lambda: finished_runs("evaluate-edit"), 600, "the event-triggered evaluation run", serve, log)
        assert eval_run["state_type"] == "COMPLETED", log.read_text()[-3000:]
        assert Path(eval_run["parameters"]["tokens"]) == tokens[0].parent
        assert Path(eval_run["parameters"]["pairs"]) == run
        assert list(run.rglob("summary.md")), "the evaluator wrote no summary table"
    finally:
        stopped_cleanly = _stop_group(serve)
    assert stopped_cleanly, f"dataprep serve did not stop on SIGTERM within 60 s\n{log.read_text()[-2000:]}"


def test_server_start_is_idempotent_and_guards_its_port(server, tmp_path):
    from dataprep import server as srv
    from dataprep.errors import ConfigError

    state, ok = srv.status(server.home)
    assert ok and state.pid == server.pid
    assert srv.start(server.home, server.port).pid == server.pid  # already running: same server
    limit = httpx.get(f"{server.api_url}/v2/concurrency_limits/gpu", timeout=10).json()
    assert limit["limit"] == 1 and limit["active"]
    with pytest.raises(ConfigError, match="--port"):  # another home, same port
        srv.start(tmp_path / "other-home", server.port)
    assert srv.status(tmp_path / "other-home") == (None, False)
