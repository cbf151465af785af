"""Flows: task functions called directly, flows under prefect_test_harness.

The harness runs one temporary Prefect server (SQLite) for the session; the
tiny LLaVA and Llama stand in for the real models; the two reference DIV2K
samples are the data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from dataprep.engines import EngineConfig
from dataprep.errors import ConfigError
from dataprep.runtime import StageSummary
from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, shard_paths, write_table_atomic

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------ pure helpers (no server)


def _caption_rows(ids, errors=None, keys=None):
    errors = errors or [None] * len(ids)
    keys = keys or [f"k-{i}" for i in ids]
    cols = {n: [None] * len(ids) for n in CAPTIONS_SCHEMA.names}
    cols.update(image_id=list(ids), key=keys, error=errors, caption=["c"] * len(ids))
    return pa.Table.from_pydict(cols, schema=CAPTIONS_SCHEMA)


def test_store_fingerprint_needs_every_id_and_tracks_keys(tmp_path):
    from flows.tasks import store_fingerprint

    folder = tmp_path / "captions"
    folder.mkdir()
    assert store_fingerprint(folder, ["a", "b"]) is None  # empty store: no cache key
    write_table_atomic(_caption_rows(["a", "b"], errors=[None, "decode_error: bad"]), folder / "part-1-00000.parquet")
    assert store_fingerprint(folder, ["a", "b"]) is None  # b has only an error row
    fp_a = store_fingerprint(folder, ["a"])
    assert fp_a is not None
    write_table_atomic(_caption_rows(["b"]), folder / "part-2-00000.parquet")
    fp_ab = store_fingerprint(folder, ["a", "b"])
    assert fp_ab is not None and fp_ab != fp_a
    assert store_fingerprint(folder, ["a"]) == fp_a  # rows of other ids do not matter
    # a changed row (another model, another prompt: another key) changes the key
    write_table_atomic(_caption_rows(["b"], keys=["k-b-new-model"]), folder / "part-2-00000.parquet")
    assert store_fingerprint(folder, ["a", "b"]) not in (None, fp_ab)


def test_chunks_and_bad_size():
    from flows.tasks import chunks

    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunks([], 3) == []
    with pytest.raises(ConfigError, match="--shard-size"):
        chunks([1], 0)


def test_build_rejects_unknown_options_by_name():
    from dataprep.caption import CaptionOptions
    from flows.flows import build

    opts = build(CaptionOptions, {"workers": 0}, "caption_options")
    assert opts.workers == 0
    with pytest.raises(ConfigError, match="wokers"):
        build(CaptionOptions, {"wokers": 0}, "caption_options")


def test_build_takes_train_options_saved_with_precision():
    """A deployment's train options written before --precision became --dtype still run.
    Before: 'unknown train option(s) ['precision']' (build knew only dataclass fields, not the InitVar)."""
    from flows.flows import build
    from softrepa.train import TrainConfig

    cfg = build(TrainConfig, {"precision": "bf16"}, "train", preset="sd3", batches=".", model="m", out="o")
    assert cfg.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="precison"):
        build(TrainConfig, {"precison": "bf16"}, "train", preset="sd3", batches=".", model="m", out="o")


def test_merge_summaries_counts_cached_shards_as_skipped(tmp_path):
    from collections import Counter

    from flows.artifacts import counts_rows, merge_summaries

    a = StageSummary("caption", tmp_path, "r1", done=3, skipped=1, failed=Counter({"decode_error": 1}), wall_s=2.0, extra={"kept failing": 2, "pass rate": 0.5})
    stale = StageSummary("caption", tmp_path, "old", done=99)  # what the cache returns: an old run's figures
    total = merge_summaries("caption", tmp_path, [(a, 5, False), (stale, 4, True)])
    assert (total.done, total.skipped, total.n_failed) == (3, 5, 1)
    rows = {r["metric"]: r["value"] for r in counts_rows(total)}
    assert rows["failed: decode_error"] == 1 and rows["cached shards"] == 1
    assert rows["kept failing"] == 2 and "pass rate" not in rows  # a rate of one shard is not the run's
    assert rows["throughput (rows/s)"] == pytest.approx(2.0)


def test_rule_rows_pass_rate_per_rule(tmp_path):
    from flows.artifacts import rule_rows

    folder = tmp_path / "edits"
    folder.mkdir()
    n = 4
    cols = {c: [None] * n for c in EDITS_SCHEMA.names}
    cols.update(key=[f"k{i}" for i in range(n)], passed=[True, False, False, None], violations=[[], ["color_change"], ["color_change", "added_content"], None], error=[None, None, None, "engine_error: x"])
    write_table_atomic(pa.Table.from_pydict(cols, schema=EDITS_SCHEMA), folder / "part-1-00000.parquet")
    rows = {r["rule"]: r for r in rule_rows(folder)}
    assert rows["all rules (passed)"]["rows"] == 3  # the error row is not a checker verdict
    assert rows["all rules (passed)"]["pass_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert rows["color_change"]["violations"] == 2
    assert rows["added_content"]["pass_rate"] == pytest.approx(2 / 3, abs=1e-4)


def test_artifact_key_is_valid():
    from flows.artifacts import artifact_key

    assert artifact_key("DIV2K", "batches", "sd1.5", "counts") == "div2k-batches-sd1-5-counts"


def test_shards_event_names_dataset_preset_and_paths(tmp_path):
    from flows.flows import SHARDS_EVENT, shards_event

    shards = [tmp_path / "b" / "part-x-00000.parquet"]
    name, resource, payload = shards_event("div2k", "sd3", shards, tmp_path, {"steps": 3}, None)
    assert name == SHARDS_EVENT == "softrepa.shards.written"
    assert resource["prefect.resource.id"] == "softrepa.shards.div2k.sd3"
    assert payload["shards"] == [str(shards[0].resolve())] and payload["train"] == {"steps": 3}


def test_shard_folder_links_exactly_the_given_shards(tmp_path):
    from flows.flows import shard_folder

    src = tmp_path / "batches"
    src.mkdir()
    a, b, other = (src / f"part-{n}-00000.parquet" for n in ("a", "b", "c"))
    for p in (a, b, other):
        p.write_bytes(b"x")
    folder = shard_folder([str(b), str(a)], tmp_path / "inputs")
    assert sorted(p.resolve() for p in shard_paths(folder)) == sorted([a.resolve(), b.resolve()])
    assert shard_folder([str(a), str(b)], tmp_path / "inputs") == folder  # same set, same folder
    with pytest.raises(ConfigError, match="shards"):
        shard_folder([str(src / "missing.parquet")], tmp_path / "inputs")


def test_engine_cache_loads_once_and_releases(monkeypatch):
    import flows.tasks as t

    loaded, closed = [], []

    class Fake:
        def __init__(self, cfg):
            loaded.append(cfg.model)

        def close(self):
            closed.append(1)

    monkeypatch.setattr(t, "load_engine", Fake)
    t.release_engines()
    a, b = EngineConfig(model="a"), EngineConfig(model="b")
    assert t.engine_for(a) is t.engine_for(EngineConfig(model="a"))
    t.engine_for(b)  # a second model: the first leaves the card before it loads
    assert loaded == ["a", "b"] and len(closed) == 1
    assert t.release_engines() == 1 and len(closed) == 2


def test_retry_condition_skips_config_errors():
    from flows.tasks import retry_engine_errors

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert retry_engine_errors(None, None, State(RuntimeError("CUDA out of memory"))) is True
    assert retry_engine_errors(None, None, State(ConfigError("bad", "--model"))) is False


def test_deployments_schedule_and_triggers():
    from flows.deployments import EVALUATE, PREPARE, TRAIN, deployments, validate_cron

    deps = {d.name: d for d in deployments(cron="*/5 * * * *", prepare_params={"data": "d", "out": "o"})}
    assert set(deps) == {PREPARE, TRAIN, EVALUATE}
    assert deps[PREPARE].schedules[0].schedule.cron == "*/5 * * * *"
    assert deps[PREPARE].parameters == {"data": "d", "out": "o"}
    (trig,) = deps[TRAIN].triggers
    assert trig.expect == {"softrepa.shards.written"}
    assert trig.parameters["shards"] == "{{ event.payload.shards }}"
    (etrig,) = deps[EVALUATE].triggers
    assert etrig.expect == {"softrepa.tokens.written"}
    assert deps[TRAIN].entrypoint == "flows.flows.train"  # importable from any working directory
    with pytest.raises(ConfigError, match="--cron"):
        validate_cron("every night")


# ------------------------------------------------------------ tasks and flows under the harness


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """One temporary Prefect server for the session, with the ``gpu`` limit created."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=180), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name("gpu", 1)
        yield


def test_caption_shard_task_runs_the_stage(harness, tiny_models, samples_dir, tmp_path):
    """The task function called directly (.fn): one shard, rows written, then skipped."""
    from dataprep.caption import CaptionOptions
    from dataprep.sources import div2k
    from flows.tasks import caption_shard, release_engines

    refs = div2k(samples_dir, ids="1-2")
    cfg = EngineConfig(model=str(tiny_models / "llava"), device="cpu", batch_size="2")
    opts = CaptionOptions(workers=0, max_new_tokens=8)
    first = caption_shard.fn(refs, tmp_path, cfg, opts, "sha")
    second = caption_shard.fn(refs, tmp_path, cfg, opts, "sha")
    release_engines()
    assert first.done == 2 and first.n_failed == 0
    assert (second.done, second.skipped) == (0, 2)


def _shard_state(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("part-*.parquet"))}


def test_prepare_flow_then_rerun_recomputes_nothing(harness, tiny_models, samples_dir, tmp_path):
    from flows.flows import prepare

    run = tmp_path / "run"
    params = dict(
        data=str(samples_dir), out=str(run), ids="1-2",
        caption_model=str(tiny_models / "llava"), rewrite_model=str(tiny_models / "llama"),
        engine={"device": "cpu", "batch_size": "2"},
        caption_options={"workers": 0, "max_new_tokens": 8}, rewrite_options={"max_new_tokens": 8},
        preset="sdxl", batch_options={"prompts": 2},  # a 1 x 2 grid: two samples are enough
        shard_size=1,
    )
    first = prepare(**params)
    assert first["caption"].done == 2
    assert first["rewrite"].done + first["rewrite"].n_failed == 2
    assert shard_paths(run / "captions") and shard_paths(run / "edits") and shard_paths(run / "batches" / "sdxl")
    assert first["batches"]["event"] is not None
    assert first["batches"]["event"].payload["shards"] == [str(p) for p in first["batches"]["shards"]]
    assert first["report"] == str(run / "report" / "index.html") and (run / "report" / "data" / "chunk-0000.js").exists()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        views = [a for a in client.read_artifacts() if a.key == "div2k-views"]
    assert views and (run / "report" / "index.html").resolve().as_uri() in views[-1].data  # the UI links the report
    before = _shard_state(run)

    second = prepare(**params)  # the store skips every key; no new shards, so no event
    assert (second["caption"].done, second["caption"].skipped) == (0, 2)
    assert second["rewrite"].done == 0 and second["rewrite"].skipped == 2
    assert second["batches"]["new_shards"] == [] and second["batches"]["event"] is None
    assert _shard_state(run) == before  # not one shard rewritten

    third = prepare(**params)  # now the Prefect cache answers: the model is not even loaded
    assert third["caption"].extra.get("cached shards") == 2
    assert _shard_state(run) == before


def test_caption_and_batches_flows(harness, tiny_models, samples_dir, tmp_path):
    """caption + batches without the rewrite stage: artifacts, event on new shards only."""
    from prefect.client.orchestration import get_client

    from flows.flows import batches, caption

    run = tmp_path / "run"
    engine = {"device": "cpu", "batch_size": "2"}
    cap = caption(data=str(samples_dir), out=str(run), ids="1-2", model=str(tiny_models / "llava"), engine=engine, caption_options={"workers": 0, "max_new_tokens": 8}, shard_size=1)
    assert cap.done == 2 and len(shard_paths(run / "captions")) >= 1
    out = batches(out=str(run), preset="sdxl", batch_options={"prompts": 2}, use_edits=False)
    assert out["new_shards"] and out["event"] is not None
    assert out["event"].resource.id == "softrepa.shards.div2k.sdxl"
    again = batches(out=str(run), preset="sdxl", batch_options={"prompts": 2}, use_edits=False)
    assert again["new_shards"] == [] and again["event"] is None
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert {"div2k-caption-counts", "div2k-caption-progress", "div2k-caption-shards", "div2k-batches-sdxl-counts"} <= keys


def test_caption_flow_rejects_bad_config_before_work(harness, tmp_path):
    from flows.flows import caption

    with pytest.raises(ConfigError, match="--data"):
        caption(data=str(tmp_path / "nope"), out=str(tmp_path / "run"), model="x")


# ------------------------------------------------------------ judge agreement and dedup counts


def _quality_run(run: Path) -> None:
    """A run dir with captions of 8 generated pictures (two near-copies), no edits."""
    import datetime as dt

    import numpy as np
    from PIL import Image

    from dataprep.store import ShardWriter

    run.mkdir(parents=True, exist_ok=True)
    with ShardWriter(run / "captions", CAPTIONS_SCHEMA, "r1") as w:
        for i in range(8):
            base = i if i < 6 else i - 6  # images 6 and 7 are resized copies of 0 and 1
            pixels = np.random.default_rng(base).integers(0, 256, (5, 5, 3), dtype=np.uint8)
            img = Image.fromarray(pixels).resize((96 - 16 * (i >= 6),) * 2, Image.Resampling.BICUBIC)
            img.save(run / f"{i}.png")
            w.add(dict(image_id=f"img/{i}", image_uri=str(run / f"{i}.png"), caption=f"Caption number {i} of a picture.", key=f"c{i}", created_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)))


def test_quality_artifact_rows(tmp_path):
    pytest.importorskip("imagehash")
    from dataprep.dedup import DedupOptions, run_dedup
    from dataprep.store import JUDGE_SCHEMA, ShardWriter
    from flows.artifacts import dedup_rows, judge_agreement_rows

    assert judge_agreement_rows(tmp_path / "judge") == [] and dedup_rows(tmp_path / "dedup") == []
    with ShardWriter(tmp_path / "judge", JUDGE_SCHEMA, "r1") as w:
        for i, (passed, verdict) in enumerate([(True, "good"), (True, "good"), (True, "bad"), (False, "bad")]):
            w.add(dict(image_id=f"img/{i}", source=f"s{i}", target=f"t{i}", edit_passed=passed, verdict=verdict, key=f"j{i}"))
    rows = {r["checker"]: r for r in judge_agreement_rows(tmp_path / "judge")}
    assert (rows["passed"]["judge_good"], rows["passed"]["judge_bad"], rows["passed"]["share"]) == (2, 1, pytest.approx(2 / 3, abs=1e-4))
    assert rows["agreement"]["share"] == 0.75
    _quality_run(tmp_path)
    run_dedup(tmp_path, DedupOptions(workers=0))
    counts = {r["metric"]: r["value"] for r in dedup_rows(tmp_path / "dedup")}
    assert counts["image_clusters"] == 2 and counts["images_in_clusters"] == 4


def test_dedup_flow_then_batches_flow_publish_quality_artifacts(harness, tmp_path):
    pytest.importorskip("imagehash")
    import pyarrow.parquet as pq
    from prefect.client.orchestration import get_client

    from flows.flows import batches, dedup

    run = tmp_path / "run"
    _quality_run(run)
    summary = dedup(out=str(run), dataset="qa", dedup_options={"workers": 0})
    assert summary.image_clusters == 2
    out = batches(out=str(run), dataset="qa", preset="sdxl", batch_options={"prompts": 4}, use_edits=False)
    # the two copies of a picture never meet in a batch
    for path in out["shards"]:
        for row in pq.read_table(path).to_pylist():
            owners = set(row["image_ids"]) | set(row["prompt_image_ids"])
            assert not ({"img/0", "img/6"} <= owners or {"img/1", "img/7"} <= owners)
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.key}
    assert "qa-dedup-counts" in keys


def test_prepare_deployment_runs_one_at_a_time():
    from flows.deployments import PREPARE, deployments

    deps = {d.name: d for d in deployments(prepare_params={"data": "d", "out": "o"})}
    assert deps[PREPARE].concurrency_limit == 1  # two nightly runs never write one store at once


def test_caption_flow_submits_its_shards_to_the_task_runner_with_a_timeout(harness, tiny_models, tmp_path):
    """A task runner given to the flow really runs the shards (``.submit``), each with the timeout."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.flows import caption
    from tests.images_factory import good_images

    submitted: list[tuple[str, float | None]] = []

    class Recording(ThreadPoolTaskRunner):
        def submit(self, task, *args, **kwargs):
            submitted.append((task.name, task.timeout_seconds))
            return super().submit(task, *args, **kwargs)

        def duplicate(self):
            return Recording(max_workers=1)

    good_images(tmp_path / "imgs")  # ten images
    flow = caption.with_options(task_runner=Recording(max_workers=1))
    summary = flow(
        data=str(tmp_path / "imgs"), source="folder", out=str(tmp_path / "run"), model=str(tiny_models / "llava"),
        engine={"device": "cpu", "batch_size": "4"}, caption_options={"workers": 0, "max_new_tokens": 4}, shard_size=4, task_timeout_s=120.0,
    )
    assert summary.done == 10
    assert submitted == [("caption-shard", 120.0)] * 3
