"""Image checks (small, blank, aspect): the pure function, the caption rows, the batch filter."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from dataprep.batches import BatchOptions, build_batches, load_caption_index
from dataprep.errors import ConfigError
from dataprep.imagecheck import FLAGS, ImageChecks, image_flags, parse_flags
from dataprep.images import PrepOptions, prepare
from dataprep.store import CAPTIONS_SCHEMA, ShardWriter
from dataprep.tiny import encode_image

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_flags_of_each_kind_and_none_for_a_normal_image():
    checks = ImageChecks()
    assert image_flags(noise(300, 200), checks) == []
    assert image_flags(noise(100, 300), checks) == ["small"]
    assert image_flags(Image.new("RGB", (300, 300), (120, 30, 200)), checks) == ["blank"]
    assert image_flags(noise(1000, 200), checks) == ["aspect"]
    assert image_flags(Image.new("L", (40, 400), 0), checks) == ["small", "blank", "aspect"]  # FLAGS order
    # a faint gradient is near-uniform; strong structure on a flat background is not
    grad = Image.fromarray(np.tile(np.linspace(100, 104, 300).astype(np.uint8), (300, 1)), "L")
    assert image_flags(grad, checks) == ["blank"]
    text_like = Image.new("RGB", (300, 300), "white")
    text_like.paste(Image.new("RGB", (150, 40), "black"), (70, 130))
    assert image_flags(text_like, checks) == []
    # thresholds come from the config; 0 turns a check off
    assert image_flags(noise(100, 300), ImageChecks(min_side=0)) == []
    assert image_flags(noise(1000, 200), ImageChecks(max_aspect=6)) == []
    assert list(FLAGS) == ["small", "blank", "aspect"]


@pytest.mark.parametrize("kw,flag", [({"min_side": -1}, "--min-side"), ({"blank_std": -1}, "--blank-std"), ({"max_aspect": 0.5}, "--max-aspect")])
def test_bad_thresholds_name_the_flag(kw, flag):
    with pytest.raises(ConfigError) as exc:
        ImageChecks(**kw)
    assert exc.value.flag == flag


def test_parse_flags():
    assert parse_flags("small, blank") == {"small", "blank"} and parse_flags(None) == frozenset()
    with pytest.raises(ConfigError) as exc:
        parse_flags("small,tiny")
    assert exc.value.flag == "--drop-image-flags" and "tiny" in str(exc.value)


def test_prepare_checks_the_full_image_not_the_padded_square():
    # a 1000x200 noise strip padded to a square is 80 % flat padding: still not "blank"
    p = prepare(encode_image(noise(1000, 200)), PrepOptions(size=30, checks=ImageChecks()))
    assert p.error is None and p.flags == ["aspect"] and p.image.size == (30, 30)
    assert prepare(encode_image(noise(1000, 200)), PrepOptions(size=30)).flags is None  # not checked


def test_caption_rows_carry_image_flags_and_thresholds_are_not_in_the_key(tmp_path, tiny_models):
    from dataprep.caption import CaptionOptions, run_caption
    from dataprep.engines import EngineConfig, load_engine
    from dataprep.sources import folder
    from dataprep.store import read_table

    d = tmp_path / "imgs"
    d.mkdir()
    noise(300, 200).save(d / "normal.png")
    noise(60, 60, 1).save(d / "small.png")
    Image.new("RGB", (300, 300), (30, 30, 30)).save(d / "blank.png")
    noise(900, 150, 2).save(d / "strip.png")
    (d / "broken.png").write_bytes(b"not an image")
    cfg = EngineConfig(model=str(tiny_models / "llava"), batch_size="4")
    engine = load_engine(cfg)
    try:
        opts = CaptionOptions(max_new_tokens=4, workers=0)
        s = run_caption(folder(d), tmp_path / "run", cfg, opts, engine=engine, progress=False)
        assert s.done == 4 and s.n_failed == 1
        rows = {r["image_id"]: r for r in read_table(tmp_path / "run" / "captions", CAPTIONS_SCHEMA).to_pylist()}
        assert {k: v["image_flags"] for k, v in rows.items()} == {
            "imgs/normal.png": [], "imgs/small.png": ["small"], "imgs/blank.png": ["blank"], "imgs/strip.png": ["aspect"], "imgs/broken.png": None,
        }
        # other thresholds: same keys, nothing recomputed
        again = run_caption(folder(d), tmp_path / "run", cfg, CaptionOptions(max_new_tokens=4, workers=0, min_side=10, max_aspect=10), engine=engine, progress=False)
        assert (again.done, again.skipped) == (0, 4)
    finally:
        engine.close()


def caption_store(root: Path, flags: dict[str, list[str] | None], legacy: int = 0) -> Path:
    """A caption store: one row per image with the given flags, plus ``legacy``
    rows in a shard written before the image_flags column existed."""
    with ShardWriter(root, CAPTIONS_SCHEMA, "r1") as w:
        for n, (image_id, f) in enumerate(flags.items()):
            w.add(dict(image_id=image_id, image_uri=f"/x/{n}.png", caption=f"A photo of thing {n}.", key=f"c{n}", created_at=T0, image_flags=f))
    if legacy:
        old = pa.schema([f for f in CAPTIONS_SCHEMA if f.name != "image_flags"])
        rows = [dict(image_id=f"old/{i}", image_uri=f"/y/{i}.png", caption=f"An old photo {i}.", key=f"o{i}", created_at=T0) for i in range(legacy)]
        pq.write_table(pa.Table.from_pylist(rows, schema=old), root / "part-r0-00000.parquet")
    return root


def test_batches_drop_flagged_images_and_count_them(tmp_path):
    flags = {f"img/{i:02d}": [] for i in range(12)}
    flags.update({"img/00": ["blank"], "img/01": ["small", "aspect"], "img/02": ["aspect"], "img/03": None})
    caps = caption_store(tmp_path / "captions", flags, legacy=4)
    index = load_caption_index(caps, drop_image_flags={"blank", "small"})
    assert "img/00" not in index.image_ids and "img/01" not in index.image_ids
    assert {"img/02", "img/03", "old/0"} <= set(index.image_ids) and len(index) == 14
    assert index.skipped["image_flagged"] == 2 and index.skipped["image_flag_blank"] == 1 and index.skipped["image_flag_small"] == 1
    assert len(load_caption_index(caps)) == 16  # no filter: every image
    from dataprep import stats

    assert stats.collect(tmp_path)["captions"]["image_flags"] == {"aspect": 2, "blank": 1, "small": 1}  # rows per flag
    s = build_batches(caps, tmp_path / "batches", BatchOptions(preset="sd3", drop_image_flags=("aspect",)))
    used = {i for p in (tmp_path / "batches").glob("part-*.parquet") for ids in pq.read_table(p)["image_ids"].to_pylist() for i in ids}
    assert not used & {"img/01", "img/02"} and s.skipped["image_flagged"] == 2
    # a run without the filter keeps the run id it always had
    plain = build_batches(caps, tmp_path / "b2", BatchOptions(preset="sd3"))
    assert plain.run_id != s.run_id and "drop_image_flags" not in plain.run_id


def test_cli_drop_image_flags(tmp_path):
    from dataprep.cli import app

    caps = caption_store(tmp_path / "captions", {f"img/{i:02d}": (["blank"] if i < 3 else []) for i in range(12)})
    res = CliRunner().invoke(app, ["batches", "--out", str(tmp_path / "b"), "--captions", str(caps), "--drop-image-flags", "blank"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "image_flag_blank" in res.output
    bad = CliRunner().invoke(app, ["batches", "--out", str(tmp_path / "b"), "--captions", str(caps), "--drop-image-flags", "blurry"])
    assert bad.exit_code == 2 and "--drop-image-flags" in bad.output and "small, blank, aspect" in bad.output
