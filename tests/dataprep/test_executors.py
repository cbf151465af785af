"""Executors: the local loop, and Ray Data on a real Ray cluster started on loopback.

The Ray tests start their own cluster (``ray start --head --block`` in a new
process group, its own temp dir and ports) and stop exactly that group after;
they drive the real CLI with ``--executor ray --ray-address 127.0.0.1:PORT``
and compare with the local executor on the tiny models.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataprep.engines import ChatResult, EngineConfig
from dataprep.errors import ConfigError
from dataprep.executors import ExecutorConfig, LocalExecutor, Work, resolve_gpus

REPO = Path(__file__).resolve().parents[2]
DATAPREP = [sys.executable, "-m", "dataprep"]
# The test cluster and its clients: offline, no usage stats, and no token
# authentication (Ray 2.5x would otherwise write a token to ~/.ray; the
# cluster lives for one test module on this machine).
RAY_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


# ------------------------------------------------------------ config (no Ray needed)


def test_local_is_the_default_and_ray_flags_need_ray_executor():
    assert ExecutorConfig().executor == "local" and not ExecutorConfig().is_ray
    with pytest.raises(ConfigError, match="--replicas.*--executor ray"):
        ExecutorConfig(replicas=2)
    with pytest.raises(ConfigError, match="--ray-address"):
        ExecutorConfig(ray_address="auto")
    with pytest.raises(ConfigError, match="--executor"):
        ExecutorConfig(executor="dask")
    with pytest.raises(ConfigError, match="--replicas"):
        ExecutorConfig(executor="ray", replicas=0)


def test_ray_executor_without_ray_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install "softrepa-dataprep\[ray\]"'):
        ExecutorConfig(executor="ray")


def test_cli_refuses_ray_flags_with_the_local_executor_before_loading(tmp_path):
    (tmp_path / "imgs").mkdir()
    r = subprocess.run([*DATAPREP, "caption", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path), "--model", "nope", "--replicas", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "--replicas" in r.stderr and "--executor ray" in r.stderr


def test_the_local_path_never_imports_ray():
    code = "import sys, dataprep.cli, dataprep.caption, dataprep.rewrite, dataprep.pipeline, dataprep.executors; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("args", [["caption", "folder", "--help"], ["rewrite", "--help"], ["pipeline", "div2k", "--help"]])
def test_model_commands_offer_the_executor_flags(args):
    out = subprocess.run([*DATAPREP, *args], capture_output=True, text=True, env=dict(os.environ, COLUMNS="200")).stdout
    for flag in ("--executor", "--ray-address", "--replicas", "--gpus-per-replica", "--cpus-per-replica"):
        assert flag in out, (args, flag)


def test_gpus_per_replica_defaults():
    from types import SimpleNamespace

    ex = SimpleNamespace(gpus_per_replica=None)
    assert resolve_gpus(ex, EngineConfig(engine="openai", model="m", base_url="http://127.0.0.1:9/v1"), cluster_gpus=8) == 0
    assert resolve_gpus(ex, EngineConfig(engine="vllm", model="m", tensor_parallel_size=4), cluster_gpus=8) == 4
    assert resolve_gpus(ex, EngineConfig(model="m"), cluster_gpus=8) == 1
    assert resolve_gpus(ex, EngineConfig(model="m"), cluster_gpus=0) == 0
    ex.gpus_per_replica = 1
    with pytest.raises(ConfigError, match="--gpus-per-replica"):
        resolve_gpus(ex, EngineConfig(engine="vllm", model="m", tensor_parallel_size=2), cluster_gpus=8)


class _Echo:
    """An engine stand-in for the executor loop alone: records the batches it gets."""

    def __init__(self):
        self.batches: list[list[int]] = []


def _infer(engine: _Echo, items: list[int]) -> list[ChatResult]:
    engine.batches.append(list(items))
    return [ChatResult(text=f"out-{i}") for i in items]


def test_local_executor_batches_model_items_and_passes_the_rest_through():
    engine = _Echo()
    out = list(LocalExecutor(engine).run(range(10), Work(_infer, batch_size=3, prepare=lambda i: i * 10, wants_model=lambda p: p % 30 != 0)))
    assert len(out) == 10
    assert {p: (r.text if r else None) for p, r in out} == {p: (None if p % 30 == 0 else f"out-{p}") for p in range(0, 100, 10)}
    assert engine.batches == [[10, 20, 40], [50, 70, 80]]  # 0, 30, 60, 90 never reach the model


# ------------------------------------------------------------ a real Ray cluster on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str  # HOST:PORT for --ray-address
    tmp: Path  # its --temp-dir, also the marker in its processes' environment


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray head on 127.0.0.1, stopped (its whole process group) after the module."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    # a short temp dir: Ray's unix sockets live under it (108-byte path limit)
    tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    port = _free_port()
    env = dict(os.environ, **RAY_ENV, DATAPREP_TEST_RAY=str(tmp))
    cmd = [
        str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--object-store-memory", str(100 * 1024 * 1024), "--include-dashboard=false", "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", str(tmp), "--dashboard-agent-listen-port", str(_free_port()),
        "--disable-usage-stats",
    ]
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (tmp / "ray-start.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{(tmp / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield Cluster(f"127.0.0.1:{port}", tmp)
    finally:
        _stop_group(proc)
        log.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL to the cluster's process group (only what this test started)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    for pid in _cluster_pids(Path(proc.args[proc.args.index("--temp-dir") + 1])):  # workers Ray moved out of the group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cluster_pids(tmp: Path) -> list[int]:
    """Processes of the cluster started with this temp dir (its environment carries the marker)."""
    marker = f"DATAPREP_TEST_RAY={tmp}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _replica_pids(tmp: Path) -> list[int]:
    """The engine replicas' actor processes (Ray titles them after the class)."""
    out = []
    for pid in _cluster_pids(tmp):
        try:
            if b"EngineReplica" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, **RAY_ENV)
    return subprocess.run([*DATAPREP, *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def _store(folder: Path, schema, value) -> dict[str, object]:
    from dataprep.store import read_table

    rows = read_table(folder, schema).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a key was written twice"
    return {r["key"]: value(r) for r in rows}


RAY_FLAGS = ("--device", "cpu", "--executor", "ray", "--replicas", "2", "--cpus-per-replica", "0.5")


def _div2k_like(folder: Path, n: int) -> Path:
    """NNNN.png images of different sizes and noise (distinct captions), plus an empty one (an error row)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    (folder / f"{n + 1:04d}.png").write_bytes(b"")
    return folder


@pytest.mark.server
@pytest.mark.slow
def test_ray_pipeline_captions_and_rewrites_like_the_local_executor(tmp_path, tiny_models, ray_cluster):
    """`dataprep pipeline div2k --executor ray --replicas 2` on a real cluster: same keys, same greedy texts."""
    from dataprep.caption import CaptionOptions
    from dataprep.pipeline import run_pipeline
    from dataprep.rewrite import RewriteOptions
    from dataprep.sources import div2k
    from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA

    data = _div2k_like(tmp_path / "DIV2K_train_HR", 8)
    llava, llama = str(tiny_models / "llava"), str(tiny_models / "llama")
    # batch size 1: every row sees the same unpadded input whatever batch Ray
    # groups it into, so greedy outputs must agree token for token
    run_pipeline(div2k(data), tmp_path / "local", EngineConfig(device="cpu", batch_size="1"), llava, llama,
                 CaptionOptions(max_new_tokens=8, workers=0), RewriteOptions(max_new_tokens=12, max_attempts=1), progress=False)
    ray_out = tmp_path / "ray"
    r = _cli("pipeline", "div2k", "--data", str(data), "--out", str(ray_out), "--caption-model", llava, "--rewrite-model", llama,
             "--batch-size", "1", "--caption-max-new-tokens", "8", "--rewrite-max-new-tokens", "12", "--max-attempts", "1",
             "--rows-per-shard", "3", "--ray-address", ray_cluster.address, *RAY_FLAGS)
    assert r.returncode == 0, r.stderr[-3000:]

    caption = lambda row: (row["image_id"], row["caption"], row["error"] and row["error"].split(":")[0])  # noqa: E731
    local_caps = _store(tmp_path / "local" / "captions", CAPTIONS_SCHEMA, caption)
    assert len(local_caps) == 9 and sum(v[2] == "empty_file" for v in local_caps.values()) == 1
    assert len({v[1] for v in local_caps.values()}) > 2  # the comparison below compares different texts
    assert _store(ray_out / "captions", CAPTIONS_SCHEMA, caption) == local_caps
    edit = lambda row: (row["image_id"], row["raw_output"], row["target"], row["attempts"], row["passed"], row["error"])  # noqa: E731
    local_edits = _store(tmp_path / "local" / "edits", EDITS_SCHEMA, edit)
    assert len(local_edits) == 8
    assert _store(ray_out / "edits", EDITS_SCHEMA, edit) == local_edits
    for stage in ("captions", "edits"):
        manifest = json.loads((ray_out / stage / "_manifest.json").read_text())
        assert manifest["config"]["executor"] == {"executor": "ray", "ray_address": ray_cluster.address, "replicas": 2, "gpus_per_replica": None, "cpus_per_replica": 0.5}
        assert manifest["counts"]["done"] == 8


@pytest.mark.server
@pytest.mark.slow
def test_a_killed_replica_loses_and_duplicates_no_row(tmp_path, tiny_models, ray_cluster):
    from dataprep.store import EDITS_SCHEMA

    n = 96
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"c{i:03d}", "caption": f"A red bird sits on a branch number {i} in the sun."}) + "\n" for i in range(n)))
    out = tmp_path / "run"
    args = ["rewrite", "--input", str(captions), "--out", str(out), "--model", str(tiny_models / "llama"), "--batch-size", "2",
            "--max-new-tokens", "24", "--max-attempts", "1", "--rows-per-shard", "1", "--ray-address", ray_cluster.address, *RAY_FLAGS]
    env = dict(os.environ, **RAY_ENV)
    proc = subprocess.Popen([*DATAPREP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    try:
        deadline = time.monotonic() + 600
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            if list((out / "edits").glob("part-*.parquet")):  # rows are coming back: the replicas are mid-run
                pids = _replica_pids(ray_cluster.tmp)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed = pids[0]
                    break
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, f"no replica was running when rows came back (exit {proc.returncode}): {stderr[-2000:]}"
    first = json.loads((out / "edits" / "_manifest.json").read_text())["counts"]
    if proc.returncode != 0:  # Ray gave up on the batch: the rerun finishes what is missing
        r = _cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        second = json.loads((out / "edits" / "_manifest.json").read_text())["counts"]
        assert first["done"] + second["done"] == n
    else:
        assert first["done"] == n and first["failed"] == 0  # each item yielded once: a duplicate would count twice
    ids = _store(out / "edits", EDITS_SCHEMA, lambda r: r["image_id"])
    assert sorted(ids.values()) == [f"c{i:03d}" for i in range(n)]


def test_a_missing_model_stops_before_ray_starts(tmp_path):
    pytest.importorskip("ray")
    (tmp_path / "in.jsonl").write_text('{"caption": "a dog"}\n')
    r = subprocess.run([*DATAPREP, "rewrite", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path), "--model", str(tmp_path / "no-model"), "--executor", "ray"],
                       capture_output=True, text=True, env=dict(os.environ, **RAY_ENV, COLUMNS="300"))
    assert r.returncode == 2 and "--model" in r.stderr and "config.json missing" in r.stderr
    assert not (tmp_path / "edits").exists()  # nothing started, nothing written


def test_an_address_where_nothing_listens_is_a_config_error_not_a_hang(tmp_path, tiny_models):
    """ray.init retried an unreachable GCS for minutes (a typo'd --ray-address hung a run)."""
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "in.jsonl").write_text('{"caption": "a dog"}\n')
    r = subprocess.run([*DATAPREP, "rewrite", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path), "--model", str(tiny_models / "llama"),
                        "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, env=dict(os.environ, **RAY_ENV, COLUMNS="300"), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--ray-address" in r.stderr and f"127.0.0.1:{port}" in r.stderr
    assert not (tmp_path / "edits").exists()
