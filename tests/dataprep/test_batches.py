"""Contrastive batch builder: every batch rule, per preset, on hand-made shards."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataprep.batches import PRESETS, BatchOptions, build_batches, build_coco_batches, load_caption_index
from dataprep.errors import ConfigError, Reason
from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, ShardWriter

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
N_IMAGES = 41
OBJECTS = ["dog", "cat", "boat", "house", "tree", "car", "bird", "lamp", "chair", "horse"]


def caption_of(i: int, version: str = "new") -> str:
    return f"A {version} photo of a {OBJECTS[i % 10]} number {i} standing near a wall.\n"


def edit_of(i: int) -> str:
    return f"A new photo of a {OBJECTS[(i + 1) % 10]} number {i} standing near a wall.\n"


def write_run(root: Path) -> dict:
    """A caption store and an edit store with every awkward case the rules name.

    Returns what each rule needs to know: the caption each image must get, the
    usable edit per image, and texts that must never appear in a batch.
    """
    forbidden: set[str] = set()
    with ShardWriter(root / "captions", CAPTIONS_SCHEMA, "r1", rows_per_shard=9) as w:
        for i in range(N_IMAGES):
            w.add(dict(image_id=f"img/{i:03d}", image_uri=f"/data/{i:03d}.png", caption=caption_of(i), key=f"c{i}", created_at=T0 + dt.timedelta(hours=1)))
        # an older good row for image 0 from another model: superseded by the newer one
        w.add(dict(image_id="img/000", image_uri="/data/000.png", caption=caption_of(0, "old"), key="c0-old", created_at=T0))
        forbidden.add(caption_of(0, "old"))
        # an error row for image 1 (it also has a good row) and an image with only errors
        w.add(dict(image_id="img/001", caption=None, key="c1-err", error="decode: truncated", created_at=T0 + dt.timedelta(hours=2)))
        w.add(dict(image_id="img/broken", caption="LEAKED CAPTION OF AN ERROR ROW", key="cb", error="decode: bad", created_at=T0))
        forbidden.add("LEAKED CAPTION OF AN ERROR ROW")
    usable: dict[str, str] = {}
    with ShardWriter(root / "edits", EDITS_SCHEMA, "r1", rows_per_shard=7) as w:
        for i in range(0, N_IMAGES, 2):  # every even image has a passing edit
            w.add(dict(image_id=f"img/{i:03d}", source=caption_of(i), target=edit_of(i), passed=True, violations=[], key=f"e{i}", created_at=T0))
            usable[f"img/{i:03d}"] = edit_of(i)
        for i in range(1, N_IMAGES, 4):  # failed checker
            t = f"FAILED EDIT {i}"
            w.add(dict(image_id=f"img/{i:03d}", source=caption_of(i), target=t, passed=False, violations=["multiple_concepts"], key=f"f{i}", created_at=T0))
            forbidden.add(t)
        for i in range(3, N_IMAGES, 4):  # passed=True but the row is an error: never usable
            t = f"ERROR EDIT {i}"
            w.add(dict(image_id=f"img/{i:03d}", source=caption_of(i), target=t, passed=True, key=f"x{i}", error="engine: timeout", created_at=T0))
            forbidden.add(t)
        # an edit of image 5's superseded caption text: not this caption's edit
        w.add(dict(image_id="img/005", source="A stale caption", target="STALE EDIT", passed=True, key="s5", created_at=T0 + dt.timedelta(days=1)))
        forbidden.add("STALE EDIT")
    captions = {f"img/{i:03d}": caption_of(i) for i in range(N_IMAGES)}
    return {"captions": captions, "edits": usable, "forbidden": forbidden}


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path, write_run(tmp_path)


def read_rows(paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for p in paths:
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def assert_batch_rules(rows: list[dict], truth: dict, opts: BatchOptions) -> None:
    n, m = opts.grid
    caption_owner = {v: k for k, v in truth["captions"].items()}
    for row in rows:
        ids, prompts, kinds, owners = row["image_ids"], row["prompts"], row["prompt_kinds"], row["prompt_image_ids"]
        assert len(ids) == n and len(prompts) == m and len(kinds) == m and len(owners) == m
        assert len(set(ids)) == n
        assert len(set(prompts)) == m, "a prompt appears twice"
        # positives: each image's own (newest) caption, at its positive_index
        assert len(row["positive_index"]) == n
        for img, pi in zip(ids, row["positive_index"]):
            assert prompts[pi] == truth["captions"][img] and kinds[pi] == "positive" and owners[pi] == img
        assert kinds.count("positive") == n  # pairs: n positive, n*m - n negative
        positive_texts = {prompts[pi] for pi in row["positive_index"]}
        hard = [(p, o) for p, k, o in zip(prompts, kinds, owners) if k == "hard_negative"]
        for p, o in hard:
            assert o in ids and truth["edits"][o] == p
        with_edit = sum(1 for img in ids if img in truth["edits"])
        assert len(hard) == min(opts.max_hard_negatives, with_edit, m - n)
        for p, k, o in zip(prompts, kinds, owners):
            assert p not in truth["forbidden"]
            if k == "negative":
                assert o not in ids and caption_owner[p] == o
                assert p not in positive_texts
        assert row["seed"] == opts.seed and row["preset"] == opts.label


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_rule_per_preset(run, preset):
    root, truth = run
    opts = BatchOptions(preset=preset, epochs=2, rows_per_shard=5)
    s = build_batches(root / "captions", root / "batches", opts, edits_dir=root / "edits")
    rows = read_rows(s.shards)
    assert rows and len(rows) == s.batches
    assert_batch_rules(rows, truth, opts)
    assert {r["epoch"] for r in rows} == {0, 1}
    assert s.skipped["images_without_caption"] == 1 and s.skipped["caption_error_rows"] == 2
    assert s.skipped["edit_failed_rows"] > 0 and s.skipped["edit_error_rows"] > 0 and s.skipped["edit_stale"] == 1
    assert s.images == N_IMAGES
    if preset != "sd3":  # sd3's 4x4 grid has no free slot for an edit
        assert s.hard_negatives > 0
    # reported like a model stage: the Manifest shape, failures in the one vocabulary
    manifest = json.loads((root / "batches" / "_manifest.json").read_text())
    assert manifest["stage"] == "batches" and manifest["failures"] == s.skipped and manifest["counts"]["batches"] == s.batches
    assert set(manifest["failures"]) <= {r.value for r in Reason}
    summary = s.stage_summary()
    # rows not used (failed edits are normal) are left out, not failures of this stage
    assert summary.done == s.batches and summary.left_out == Counter(s.skipped) and not summary.failed and summary.run_id == s.run_id
    # every manifest starts with the same counts, whatever the stage
    assert manifest["counts"]["done"] == s.batches and manifest["counts"]["left_out"] == sum(s.skipped.values())
    assert {"done", "skipped", "failed", "left_out", "truncated"} <= manifest["counts"].keys()


@pytest.mark.parametrize("k", [0, 2, None])
def test_custom_grid_and_hard_negative_cap(run, k):
    root, truth = run
    opts = BatchOptions(preset="custom", images=4, prompts=9, hard_negatives=k, seed=3)
    s = build_batches(root / "captions", root / "batches", opts, edits_dir=root / "edits")
    rows = read_rows(s.shards)
    assert_batch_rules(rows, truth, opts)
    assert rows[0]["preset"] == "custom-4x9"
    per_batch = [r["prompt_kinds"].count("hard_negative") for r in rows]
    assert max(per_batch) <= (4 if k is None else k) and (sum(per_batch) > 0) == (k != 0)


def test_without_edits_there_are_no_hard_negatives(run):
    root, truth = run
    s = build_batches(root / "captions", root / "batches", BatchOptions(preset="sd1.5"))
    assert all("hard_negative" not in r["prompt_kinds"] for r in read_rows(s.shards))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_image_once_per_epoch(run, preset):
    root, _ = run
    keep = build_batches(root / "captions", root / "keep", BatchOptions(preset=preset, epochs=3, drop_last=False))
    rows = read_rows(keep.shards)
    for e in range(3):
        seen = Counter(i for r in rows if r["epoch"] == e for i in r["image_ids"])
        assert set(seen) == {f"img/{i:03d}" for i in range(N_IMAGES)} and set(seen.values()) == {1}
    drop = build_batches(root / "captions", root / "drop", BatchOptions(preset=preset, epochs=3, drop_last=True))
    rows = read_rows(drop.shards)
    n = PRESETS[preset][0]
    for e in range(3):
        seen = Counter(i for r in rows if r["epoch"] == e for i in r["image_ids"])
        assert set(seen.values()) == {1} and len(seen) == N_IMAGES - N_IMAGES % n
        assert all(len(r["image_ids"]) == n for r in rows)
    assert drop.dropped_images == 3 * (N_IMAGES % n)


def test_epochs_are_shuffled_differently(run):
    root, _ = run
    s = build_batches(root / "captions", root / "b", BatchOptions(preset="sd3", epochs=2, drop_last=False))
    rows = read_rows(s.shards)
    order = [[i for r in rows if r["epoch"] == e for i in r["image_ids"]] for e in (0, 1)]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])


def test_same_seed_gives_byte_identical_shards(run):
    root, _ = run
    opts = BatchOptions(preset="sd1.5", epochs=2, rows_per_shard=3, seed=7)
    a = build_batches(root / "captions", root / "a", opts, edits_dir=root / "edits")
    b = build_batches(root / "captions", root / "b", opts, edits_dir=root / "edits")
    assert [p.name for p in a.shards] == [p.name for p in b.shards] and len(a.shards) > 1
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a.shards, b.shards))
    assert (root / "a" / f"_run-{a.run_id}.json").exists()
    # a rerun into the same folder rewrites the same files, adds none
    again = build_batches(root / "captions", root / "a", opts, edits_dir=root / "edits")
    assert sorted(p.name for p in (root / "a").glob("part-*.parquet")) == [p.name for p in again.shards]
    other = build_batches(root / "captions", root / "c", BatchOptions(preset="sd1.5", epochs=2, rows_per_shard=3, seed=8), edits_dir=root / "edits")
    assert other.run_id != a.run_id
    assert read_rows(other.shards)[0]["image_ids"] != read_rows(a.shards)[0]["image_ids"]


def test_newest_good_caption_wins(run):
    root, _ = run
    index = load_caption_index(root / "captions")
    i = index.image_ids.index("img/000")
    assert index.captions(i) == [caption_of(0)]
    assert "img/broken" not in index.image_ids


def test_duplicate_captions_never_share_a_batch(tmp_path):
    with ShardWriter(tmp_path / "captions", CAPTIONS_SCHEMA, "r1") as w:
        for i in range(24):
            text = "A generic photo.\n" if i < 6 else caption_of(i)  # six images, one caption text
            w.add(dict(image_id=f"img/{i:03d}", caption=text, key=f"c{i}", created_at=T0))
    s = build_batches(tmp_path / "captions", tmp_path / "b", BatchOptions(preset="sd1.5", epochs=2, drop_last=False))
    rows = read_rows(s.shards)
    for r in rows:
        assert len(set(r["prompts"])) == len(r["prompts"])
        assert sum(1 for i in r["image_ids"] if int(i[-3:]) < 6) <= 1
    for e in (0, 1):
        seen = Counter(i for r in rows if r["epoch"] == e for i in r["image_ids"])
        assert len(seen) == 24 and set(seen.values()) == {1}


def test_bad_configuration_fails_before_work(run):
    root, _ = run
    with pytest.raises(ConfigError, match="--hard-negatives"):
        BatchOptions(preset="sd1.5", hard_negatives=5)
    with pytest.raises(ConfigError, match="--prompts"):
        BatchOptions(preset="custom", images=4, prompts=3)
    with pytest.raises(ConfigError, match="--preset"):
        BatchOptions(preset="sd2")
    with pytest.raises(ConfigError, match="--captions"):
        build_batches(root / "nothing", root / "b", BatchOptions())
    with pytest.raises(ConfigError, match="grid"):  # 41 images cannot fill 64 prompts
        build_batches(root / "captions", root / "b", BatchOptions(preset="custom", images=1, prompts=64))
    assert not (root / "b").exists()


# ---------------------------------------------------------------- COCO


def write_coco(root: Path, n: int = 14) -> tuple[Path, Path, dict[str, list[str]]]:
    """A COCO captions file: five captions per image, annotations listed in reverse id order."""
    images_dir = root / "train2017"
    images_dir.mkdir()
    images, anns, caps = [], [], {}
    for i in range(n):
        name = f"{i:012d}.jpg"
        images.append({"id": i, "file_name": name, "width": 64, "height": 48})
        if i != n - 1:  # the last image's file is missing
            (images_dir / name).write_bytes(b"jpeg")
        caps[f"coco/{i:012d}"] = [f"A {OBJECTS[i % 10]} in scene {i}, view {v}." for v in range(5)]
        for v, t in enumerate(caps[f"coco/{i:012d}"]):
            anns.append({"id": 1 + 5 * i + v, "image_id": i, "caption": t})
    anns.reverse()  # annotation ids, not file order, decide the rotation order
    path = root / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path, images_dir, caps


def test_coco_rotation_and_same_image_captions(tmp_path):
    path, images_dir, caps = write_coco(tmp_path)
    opts = BatchOptions(preset="sd1.5", epochs=6, drop_last=False)
    s = build_coco_batches(path, images_dir, tmp_path / "b", opts)
    assert s.skipped["image_missing"] == 1 and s.images == 13
    rows = read_rows(s.shards)
    owner = {t: img for img, ts in caps.items() for t in ts}
    for r in rows:
        e = r["epoch"]
        for img, pi in zip(r["image_ids"], r["positive_index"]):
            assert r["prompts"][pi] == caps[img][e % 5]  # one positive per epoch, rotating
        assert len(set(r["prompts"])) == len(r["prompts"])
        for p, k in zip(r["prompts"], r["prompt_kinds"]):
            if k == "negative":
                assert owner[p] not in r["image_ids"]  # never a caption of an image in the batch
    for e in range(6):
        seen = Counter(i for r in rows if r["epoch"] == e for i in r["image_ids"])
        assert len(seen) == 13 and set(seen.values()) == {1}


def test_coco_with_edits_uses_the_rotating_captions_edit(tmp_path):
    path, images_dir, caps = write_coco(tmp_path)
    with ShardWriter(tmp_path / "edits", EDITS_SCHEMA, "r1") as w:
        for img, ts in caps.items():
            for v, t in enumerate(ts):
                w.add(dict(image_id=img, source=t, target=t.replace("scene", "EDITED scene"), passed=v % 2 == 0, key=f"{img}{v}", created_at=T0))
    opts = BatchOptions(preset="custom", images=2, prompts=6, epochs=5, drop_last=False)
    rows = read_rows(build_coco_batches(path, images_dir, tmp_path / "b", opts, edits_dir=tmp_path / "edits").shards)
    hard = [(r["epoch"], p, o) for r in rows for p, k, o in zip(r["prompts"], r["prompt_kinds"], r["prompt_image_ids"]) if k == "hard_negative"]
    assert hard and all(e % 2 == 0 for e, _, _ in hard)  # only passing edits (even caption slots)
    assert all(p == caps[o][e % 5].replace("scene", "EDITED scene") for e, p, o in hard)


def test_batch_folder_reads_as_one_parquet_dataset(run):
    """Trainers may point pyarrow/pandas at the folder: side files must not look like shards."""
    root, _ = run
    s = build_batches(root / "captions", root / "b", BatchOptions(preset="sdxl", rows_per_shard=10), edits_dir=root / "edits")
    assert len(s.shards) > 1
    assert pq.read_table(root / "b").num_rows == s.batches


def test_newest_passing_edit_wins(tmp_path):
    from dataprep.batches import attach_edits

    with ShardWriter(tmp_path / "captions", CAPTIONS_SCHEMA, "r1") as w:
        for i in range(3):
            w.add(dict(image_id=f"img/{i}", caption=caption_of(i), key=f"c{i}", created_at=T0))
    with ShardWriter(tmp_path / "edits", EDITS_SCHEMA, "r1", rows_per_shard=1) as w:
        w.add(dict(image_id="img/0", source=caption_of(0), target="newer edit", passed=True, key="a", created_at=T0 + dt.timedelta(hours=2)))
        w.add(dict(image_id="img/0", source=caption_of(0), target="older edit", passed=True, key="b", created_at=T0 + dt.timedelta(hours=1)))
        w.add(dict(image_id="img/0", source=caption_of(0), target="newest but failed", passed=False, key="c", created_at=T0 + dt.timedelta(hours=3)))
        w.add(dict(image_id="img/9", source="no such caption", target="orphan edit", passed=True, key="d", created_at=T0))
    index = attach_edits(load_caption_index(tmp_path / "captions"), tmp_path / "edits")
    assert index.edits == ["newer edit", None, None]
    assert index.skipped["edit_failed_rows"] == 1 and index.skipped["edit_without_caption"] == 1


def test_cli_coco_and_source_flags(tmp_path):
    from typer.testing import CliRunner

    from dataprep.cli import app

    path, images_dir, _ = write_coco(tmp_path)
    cli = CliRunner()
    r = cli.invoke(app, ["batches", "--preset", "sd3", "--coco-captions", str(path), "--coco-images", str(images_dir), "--out", str(tmp_path / "b"), "--epochs", "5", "--keep-last"])
    assert r.exit_code == 0, r.output
    assert {row["epoch"] for row in pq.read_table(tmp_path / "b").to_pylist()} == set(range(5))
    r = cli.invoke(app, ["batches", "--coco-captions", str(path), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--coco-images" in r.output
    r = cli.invoke(app, ["batches", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--captions" in r.output


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"preset": "custom", "images": 0, "prompts": 8}, "--images"),  # was a TypeError traceback
        ({"preset": "sd3", "images": 0}, "--images"),  # was silently the preset's 4
        ({"preset": "sd1.5", "prompts": 0}, "--prompts"),  # was silently the preset's 8
    ],
)
def test_an_explicit_zero_grid_is_a_config_error(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        BatchOptions(**kw)


def test_case_and_spacing_variants_are_the_same_prompt(tmp_path):
    """'A dog.' and 'a  dog. ' are one prompt to CLIP: never both in a batch."""
    with ShardWriter(tmp_path / "captions", CAPTIONS_SCHEMA, "r1") as w:
        for i in range(8):
            text = "A dog on grass." if i == 0 else ("a  dog on GRASS. " if i == 1 else f"Scene number {i}.")
            w.add(dict(image_id=f"img/{i}", image_uri=f"/d/{i}.png", caption=text, key=f"k{i}", created_at=T0))
    for seed in range(5):
        out = tmp_path / f"b{seed}"
        s = build_batches(tmp_path / "captions", out, BatchOptions(images=2, prompts=6, seed=seed, drop_last=False))
        for row in read_rows(s.shards):
            normed = [" ".join(p.casefold().split()) for p in row["prompts"]]
            assert len(set(normed)) == len(normed), row["prompts"]


def test_coco_malformed_annotations_are_counted_not_fatal(tmp_path):
    path, images_dir, _ = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"] += [{"id": 9001, "caption": "no image id"}, {"id": 9002, "image_id": 777, "caption": "dangling"}, {"id": 9003, "image_id": 0, "caption": None}]
    path.write_text(json.dumps(data))
    s = build_coco_batches(path, images_dir, tmp_path / "b", BatchOptions(preset="sd1.5"))
    assert s.skipped["annotation_without_image"] == 2 and s.skipped["caption_empty_rows"] == 1
    assert s.images == 13


def test_the_batches_summary_rate_is_batches_per_second_not_batches_plus_left_out_rows(tmp_path):
    """Before: 'rate' was (batches written + edit rows left out) / s, printed as rows/s
    (6 batches and 14 failing edits in 2 s read '10.00 rows/s'); the train table printed steps as rows/s."""
    from rich.console import Console

    from dataprep.batches.write import BatchSummary
    from dataprep.runtime import print_summary

    s = BatchSummary(run_id="r", preset="sd3", grid=(4, 4), epochs=2, images=14, batches=6, rows=24, positives=24, hard_negatives=0,
                     negatives=0, dropped_images=4, unfillable_batches=0, duplicate_images=0, edits_available=0, edits_unused=0,
                     skipped={"edit_failed_rows": 14}, shards=[], out_dir=tmp_path, seconds=2.0).stage_summary()
    assert s.rate == pytest.approx(3.0)
    console = Console(record=True, width=200)
    print_summary(s, console)
    text = console.export_text()
    assert "3.00 batches/s" in text and "rows/s" not in text and "batches (this run)" in text
    assert "left out: edit_failed_rows" in text and "failed: edit_failed_rows" not in text
