"""The caption stage end to end on a tiny random LLaVA loaded by path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataprep.caption import CaptionOptions, run_caption
from dataprep.engines import EngineConfig, load_engine
from dataprep.sources import div2k, folder
from dataprep.store import CAPTIONS_SCHEMA, read_table, shard_paths
from tests.images_factory import bad_images, good_images

OPTS = dict(max_new_tokens=8, workers=0)


def cfg(tiny_models: Path) -> EngineConfig:
    return EngineConfig(model=str(tiny_models / "llava"), batch_size="4")


@pytest.fixture(scope="module")
def llava(tiny_models):
    engine = load_engine(cfg(tiny_models))
    yield engine
    engine.close()


def rows(out: Path) -> list[dict]:
    return read_table(out / "captions", CAPTIONS_SCHEMA).to_pylist()


def test_samples_and_generated_images_all_caption(tmp_path, samples_dir, tiny_models, llava):
    good_images(tmp_path / "gen")
    refs = div2k(samples_dir) + folder(tmp_path / "gen")
    summary = run_caption(refs, tmp_path / "run", cfg(tiny_models), CaptionOptions(**OPTS), engine=llava, progress=False)
    out = rows(tmp_path / "run")
    assert summary.done == len(refs) == 12 and summary.n_failed == 0
    assert {r["image_id"] for r in out} == {r.image_id for r in refs}
    by_id = {r["image_id"]: r for r in out}
    # DIV2K-sized frames keep their true size in the row (the model sees a padded square)
    assert (by_id["div2k/0001"]["image_width"], by_id["div2k/0001"]["image_height"]) == (2040, 1356)
    assert (by_id["div2k/0002"]["image_width"], by_id["div2k/0002"]["image_height"]) == (1356, 2040)
    assert by_id["gen/photo_exif.jpg"]["image_width"] == 20  # EXIF rotation applied before measuring
    for r in out:
        assert r["caption"] and r["error"] is None
        assert r["model"] == str(tiny_models / "llava") and r["engine"] == "transformers"
        assert r["prompt_id"] == "caption.txt" and len(r["prompt_sha256"]) == 64
        assert len(r["image_sha256"]) == 64 and r["finish_reason"] in ("stop", "length")
        assert r["completion_tokens"] > 0 and r["prompt_tokens"] > 0 and r["created_at"] is not None
    manifest = json.loads((tmp_path / "run" / "captions" / "_manifest.json").read_text())
    assert manifest["counts"]["done"] == 12 and manifest["config"]["engine"]["engine"] == "transformers"
    # what --dtype/--device auto resolved to: it changes outputs and is not in the key
    assert manifest["config"]["engine"]["resolved_dtype"] == "float32" and manifest["config"]["engine"]["resolved_device"] == "cpu"


def test_bad_files_become_error_rows_and_the_run_completes(tmp_path, tiny_models, llava):
    d = tmp_path / "mixed"
    expected = bad_images(d)
    good_images(d / "ok")
    summary = run_caption(folder(d), tmp_path / "run", cfg(tiny_models), CaptionOptions(**OPTS), engine=llava, progress=False)
    out = {r["image_id"].split("/", 1)[1]: r for r in rows(tmp_path / "run")}
    assert summary.done == 10 and summary.n_failed == len(expected)
    for name, reasons in expected.items():
        assert out[name]["caption"] is None
        assert out[name]["error"].split(":")[0] in reasons.split("|"), out[name]["error"]
    assert all(r["error"] is None for k, r in out.items() if k.startswith("ok/"))
    assert summary.failed["too_large"] == 1 and summary.failed["empty_file"] == 1


def test_second_run_generates_nothing_and_new_settings_make_new_keys(tmp_path, samples_dir, tiny_models, llava):
    refs = div2k(samples_dir)
    run_caption(refs, tmp_path, cfg(tiny_models), CaptionOptions(**OPTS), engine=llava, progress=False)
    again = run_caption(refs, tmp_path, cfg(tiny_models), CaptionOptions(**OPTS), engine=llava, progress=False)
    assert (again.done, again.skipped) == (0, 2)
    assert len(rows(tmp_path)) == 2
    other_seed = run_caption(refs, tmp_path, cfg(tiny_models), CaptionOptions(**OPTS, seed=5, top_p=0.5), engine=llava, progress=False)
    assert (other_seed.done, other_seed.skipped) == (0, 2)  # greedy: seed and top_p change nothing
    sampled = run_caption(refs, tmp_path, cfg(tiny_models), CaptionOptions(**OPTS, temperature=0.7), engine=llava, progress=False)
    assert sampled.done == 2 and len(rows(tmp_path)) == 4
    forced = run_caption(refs, tmp_path, cfg(tiny_models), CaptionOptions(**OPTS, force=True), engine=llava, progress=False)
    assert forced.done == 2 and len(rows(tmp_path)) == 4  # recomputed rows replace, never duplicate


class _DiesAfter:
    """Wraps an engine; the n-th generate call raises, like a kill mid-run."""

    def __init__(self, engine, calls_ok: int):
        self.inner, self.left = engine, calls_ok
        self.name, self.model, self.revision, self.batch_size = engine.name, engine.model, engine.revision, 2

    def image_size(self):
        return self.inner.image_size()

    def generate(self, reqs):
        if self.left == 0:
            raise KeyboardInterrupt("killed")
        self.left -= 1
        return self.inner.generate(reqs)

    def close(self):
        pass


def test_interrupted_run_resumes_with_every_image_exactly_once(tmp_path, samples_dir, tiny_models, llava):
    good_images(tmp_path / "gen")
    refs = folder(tmp_path / "gen")
    opts = CaptionOptions(**OPTS, rows_per_shard=2)
    with pytest.raises(KeyboardInterrupt):
        run_caption(refs, tmp_path / "run", cfg(tiny_models), opts, engine=_DiesAfter(llava, 1), progress=False)
    first = rows(tmp_path / "run")
    assert len(first) == 2 and len(shard_paths(tmp_path / "run" / "captions")) == 1
    resumed = run_caption(refs, tmp_path / "run", cfg(tiny_models), opts, engine=llava, progress=False)
    assert resumed.skipped == 2 and resumed.done == len(refs) - 2
    ids = [r["image_id"] for r in rows(tmp_path / "run")]
    assert sorted(ids) == sorted(r.image_id for r in refs)  # each exactly once


def test_killed_process_leaves_no_partial_shard_and_resume_is_exact(tmp_path, tiny_models):
    """A real SIGKILL while shards are being written, then a rerun."""
    import signal
    import time

    good_images(tmp_path / "gen")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dataprep", "caption", "folder", str(tmp_path / "gen"), "--out", str(out), "--model", str(tiny_models / "llava"),
           "--max-new-tokens", "64", "--batch-size", "1", "--rows-per-shard", "1", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not shard_paths(out / "captions"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for p in shard_paths(out / "captions"):
        pq.read_table(p)  # every shard on disk is complete
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = [r["image_id"] for r in rows(out)]
    assert len(ids) == 10 and len(set(ids)) == 10


def test_shards_read_back_with_pyarrow_pandas_polars_duckdb_datasets(tmp_path, samples_dir, tiny_models, llava):
    run_caption(div2k(samples_dir), tmp_path, cfg(tiny_models), CaptionOptions(**OPTS), engine=llava, progress=False)
    folder_ = tmp_path / "captions"
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    # the folder itself reads as a dataset: the manifest's leading "_" keeps it out
    assert pq.read_table(folder_).num_rows == 2
    assert len(pd.read_parquet(folder_)) == 2
    assert pl.read_parquet(str(folder_ / "*.parquet")).height == 2
    assert duckdb.sql(f"select count(*) from read_parquet('{folder_}/*.parquet')").fetchall()[0][0] == 2
    ds = datasets.load_dataset("parquet", data_files=str(folder_ / "*.parquet"), split="train")
    assert sorted(ds["image_id"]) == ["div2k/0001", "div2k/0002"]


def test_missing_model_is_a_config_error_before_any_image_is_read(tmp_path):
    from dataprep.errors import ConfigError

    from dataprep.sources import ImageRef

    never_read = [ImageRef("x/1", "folder", str(tmp_path / "does-not-exist.png"))]  # reading it would make an error row
    with pytest.raises(ConfigError) as exc:
        run_caption(never_read, tmp_path, EngineConfig(model=str(tmp_path / "nope")), CaptionOptions(**OPTS))
    assert exc.value.flag == "--model"
    assert not (tmp_path / "captions").exists() or not shard_paths(tmp_path / "captions")


class _FakeEngine:
    """No model: every image gets the same caption (for store/key tests only)."""

    name, model, revision, batch_size = "fake", "fake-model", None, 4

    def image_size(self):
        return 32

    def generate(self, reqs):
        from dataprep.engines import ChatResult

        return [ChatResult(text="a picture") for _ in reqs]

    def close(self):
        pass


def test_identical_files_keep_one_row_each(tmp_path):
    """Two images with the same bytes (or two zero-byte files) are still two images:
    compaction keeps one row per key, so the key must not collapse them."""
    from PIL import Image

    from tests.images_factory import png_bytes

    d = tmp_path / "imgs"
    d.mkdir()
    same = png_bytes(Image.new("RGB", (40, 30), (9, 9, 9)))
    (d / "copy1.png").write_bytes(same)
    (d / "copy2.png").write_bytes(same)
    (d / "zero1.png").write_bytes(b"")
    (d / "zero2.png").write_bytes(b"")
    opts = CaptionOptions(workers=0)
    s = run_caption(folder(d), tmp_path / "run", EngineConfig(model="fake-model"), opts, engine=_FakeEngine(), progress=False)
    assert s.done == 2 and s.n_failed == 2
    out = {r["image_id"]: r for r in rows(tmp_path / "run")}
    assert sorted(out) == ["imgs/copy1.png", "imgs/copy2.png", "imgs/zero1.png", "imgs/zero2.png"]
    again = run_caption(folder(d), tmp_path / "run", EngineConfig(model="fake-model"), opts, engine=_FakeEngine(), progress=False)
    assert (again.done, again.skipped) == (0, 2) and len(rows(tmp_path / "run")) == 4


def test_corrupt_zip_member_is_an_error_row_not_an_aborted_run(tmp_path):
    import zipfile

    from PIL import Image

    from tests.images_factory import png_bytes

    good = png_bytes(Image.new("RGB", (40, 30), (9, 9, 9)))
    z = tmp_path / "DIV2K_train_HR.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("DIV2K_train_HR/0001.png", good)
        zf.writestr("DIV2K_train_HR/0002.png", png_bytes(Image.new("RGB", (30, 40), (1, 1, 1))))
    raw = bytearray(z.read_bytes())
    raw[raw.find(good) + 60] ^= 0xFF  # member 0001's stored bytes no longer match its CRC
    z.write_bytes(bytes(raw))
    s = run_caption(div2k(z), tmp_path / "run", EngineConfig(model="fake-model"), CaptionOptions(workers=0), engine=_FakeEngine(), progress=False)
    out = {r["image_id"]: r for r in rows(tmp_path / "run")}
    assert s.done == 1 and out["div2k/0002"]["error"] is None
    assert out["div2k/0001"]["error"].startswith("read_error:") and "CRC" in out["div2k/0001"]["error"]


@pytest.mark.parametrize("kw,flag", [({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"), ({"rows_per_shard": 0}, "--rows-per-shard")])
def test_bad_options_are_config_errors_before_work(tmp_path, kw, flag):
    from dataprep.errors import ConfigError

    with pytest.raises(ConfigError, match=flag):
        run_caption([], tmp_path, EngineConfig(model="fake-model"), CaptionOptions(temperature=0.7, **kw), engine=_FakeEngine(), progress=False)
    assert not (tmp_path / "captions").exists()


def test_quantized_model_is_another_model_for_resume(tmp_path, samples_dir):
    """--quantize 4bit loads other weights: full-precision rows must not be skipped as done."""
    refs = div2k(samples_dir)
    opts = CaptionOptions(workers=0)
    run_caption(refs, tmp_path, EngineConfig(model="fake-model"), opts, engine=_FakeEngine(), progress=False)
    q = run_caption(refs, tmp_path, EngineConfig(model="fake-model", quantize="4bit"), opts, engine=_FakeEngine(), progress=False)
    assert (q.done, q.skipped) == (2, 0) and len(rows(tmp_path)) == 4
    again = run_caption(refs, tmp_path, EngineConfig(model="fake-model", quantize="4bit"), opts, engine=_FakeEngine(), progress=False)
    assert (again.done, again.skipped) == (0, 2)


def test_hf_dataset_images_are_read_by_the_worker_processes(tmp_path, tiny_models):
    """Embedded dataset images travel as row references, and spawned workers fetch them."""
    import datasets
    from PIL import Image

    from dataprep.sources import hf_dataset

    imgs = [Image.new("RGB", (20 + i, 10), (i * 60, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs}).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "d.parquet"))
    summary = run_caption(hf_dataset(str(tmp_path / "d.parquet")), tmp_path / "run", cfg(tiny_models), CaptionOptions(max_new_tokens=4, workers=1), progress=False)
    out = rows(tmp_path / "run")
    assert summary.done == 3 and sorted(r["image_width"] for r in out) == [20, 21, 22]
