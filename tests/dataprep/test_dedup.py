"""Dedup: exact and near-duplicate images (resized, JPEG-recompressed, shifted copies),
near-duplicate captions, the records, and the batch rule that never puts two
members of one cluster in one batch."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("imagehash")
pytest.importorskip("datasketch")

from dataprep import clusters, stats  # noqa: E402
from dataprep.batches import BatchOptions, build_batches, load_caption_index  # noqa: E402
from dataprep.dedup import (  # noqa: E402
    DedupOptions,
    UnionFind,
    caption_clusters,
    caption_signatures,
    hash_images,
    image_clusters,
    lsh_params,
    near_image_pairs,
    popcount64,
    run_dedup,
)
from dataprep.errors import ConfigError  # noqa: E402
from dataprep.store import CAPTIONS_SCHEMA, DEDUP_SCHEMA, ShardWriter, read_table  # noqa: E402

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


# ------------------------------------------------------------ generated pictures


def picture(seed: int, size: int = 160) -> Image.Image:
    """A smooth random picture with a few shapes: structure at every scale, like a photo."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(base)
    for _ in range(4):
        x, y = rng.integers(0, size - 40, 2)
        w, h = rng.integers(15, 40, 2)
        d.ellipse([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return base


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def shifted(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """Moved by (dx, dy) pixels inside the same frame, the uncovered edge repeated."""
    a = np.asarray(img)
    a = np.pad(a, ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0)), mode="edge")
    h, w = img.height, img.width
    return Image.fromarray(a[max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w])


def copies(img: Image.Image) -> dict[str, bytes]:
    """The near-duplicates a web or COCO set holds of one picture."""
    return {
        "resized": encode(img.resize((112, 112), Image.Resampling.LANCZOS)),
        "jpeg": encode(img, "JPEG", quality=40),
        "shifted": encode(shifted(img, 2, 1)),
        "exact": encode(img),
    }


def write_images(folder: Path, n_distinct: int = 12, with_copies: int = 4) -> tuple[dict[str, str], dict[str, set[str]]]:
    """{image_id: path}, and the expected clusters {original id: member ids} for the first ``with_copies`` pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, expected = {}, {}
    for i in range(n_distinct):
        img = picture(i)
        p = folder / f"p{i:02d}.png"
        p.write_bytes(encode(img))
        paths[f"img/p{i:02d}"] = str(p)
        if i < with_copies:
            members = {f"img/p{i:02d}"}
            for kind, data in copies(img).items():
                q = folder / f"p{i:02d}-{kind}.{'jpg' if kind == 'jpeg' else 'png'}"
                q.write_bytes(data)
                paths[f"img/p{i:02d}-{kind}"] = str(q)
                members.add(f"img/p{i:02d}-{kind}")
            expected[f"img/p{i:02d}"] = members
    return paths, expected


LONG = (
    "The image shows a {a} standing in a grassy field next to a wooden fence, with tall trees and a cloudy blue sky"
    " in the background, and a small red barn far behind it on a hill. The grass is green and freshly cut, a narrow"
    " dirt path runs along the fence towards a gate, and a few white flowers grow near the posts. The light is soft"
    " and warm, as in the late afternoon, and long shadows fall across the field."
)


def write_captions(run: Path, paths: dict[str, str], texts: dict[str, str] | None = None) -> None:
    words = ["dog", "horse", "tractor", "scarecrow", "bicycle", "goat", "kite", "bench", "sheep", "cow", "boy", "girl", "lamp", "pig", "duck", "cart"]
    with ShardWriter(run / "captions", CAPTIONS_SCHEMA, "r1") as w:
        for n, (image_id, path) in enumerate(sorted(paths.items())):
            text = (texts or {}).get(image_id) or f"Picture {n}: a {words[n % len(words)]} number {n} photographed on day {n * 7} in room {n * 3}."
            w.add(dict(image_id=image_id, image_uri=path, caption=text, key=f"c{n}", created_at=T0))


# ------------------------------------------------------------ pure parts


def test_multi_index_hashing_finds_exactly_the_pairs_within_the_distance():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 400, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 400, dtype=np.uint64)
    for k in range(0, 60, 3):  # plant near pairs at distances 0..8
        flips = rng.choice(64, size=k % 9, replace=False)
        h[k + 1] = h[k] ^ np.uint64(sum(1 << int(b) for b in flips))
    for d in (0, 3, 6):
        found = {(i, j) for i, j, _ in near_image_pairs(h, d)}
        dist = popcount64(h[:, None] ^ h[None, :])
        brute = {(i, j) for i, j in zip(*np.nonzero(dist <= d)) if i < j}
        assert found == brute and len(brute) >= 3


def test_union_find_components():
    uf = UnionFind(6)
    for a, b in ((0, 3), (3, 5), (1, 2)):
        uf.union(a, b)
    assert uf.components() == [[0, 3, 5], [1, 2]]


def test_image_clusters_catch_resized_recompressed_shifted_and_exact_copies(tmp_path):
    paths, expected = write_images(tmp_path / "img", n_distinct=12, with_copies=4)
    ids = sorted(paths)
    hashes, shas, pixels, errors = hash_images([paths[i] for i in ids], DedupOptions(workers=0))
    assert errors == [None] * len(ids)
    found = image_clusters(ids, hashes, shas, pixels, errors, DedupOptions().image_distance)
    got = {ids[c.representative]: {ids[m] for m in c.members} for c in found}
    # every copy joins its original, no two different pictures are merged; the representative
    # is the largest copy (the 160 px original; its exact copy ties and loses on the id)
    assert got == expected


def test_caption_minhash_clusters_near_copies_only():
    texts = {
        "a": LONG.format(a="brown horse"),
        "b": LONG.format(a="brown horse").upper().replace(",", " ;"),  # case and punctuation only
        "c": LONG.format(a="brown horse").replace("cloudy", "clouded"),  # one word of ~75
        # another picture: its object and background differ, the boilerplate is the same
        "d": LONG.format(a="yellow tractor with a trailer").replace("a small red barn far behind it on a hill", "a row of houses along a road"),
        "e": "A bowl of soup on a kitchen table.",
        "f": "A bowl of soup on a kitchen table!",
    }
    opts = DedupOptions()
    ids = sorted(texts)
    sigs = caption_signatures([texts[i] for i in ids], opts)
    assert sigs.shape == (6, 128) and sigs.dtype == np.uint32
    bands, rows = lsh_params(opts.caption_threshold, opts.num_perm)
    assert bands * rows <= opts.num_perm
    got = sorted(sorted(ids[m] for m in c.members) for c in caption_clusters(ids, sigs, opts.caption_threshold, bands, rows))
    assert got == [["a", "b", "c"], ["e", "f"]]


def test_captions_sharing_boilerplate_keep_their_near_copies():
    """LLaVA captions share whole clauses; a one-word copy (Jaccard ~0.91) must still be found.

    datasketch's default 1:1 band choice (b=8, r=16 at 0.85) found fewer than
    half of these pairs.
    """
    rng = np.random.default_rng(1)
    words = "dog cat boat house tree car bird lamp chair horse bicycle mountain river bridge tower".split()

    def text(i: int) -> str:
        a, b, c = (words[k] for k in rng.integers(0, len(words), 3))
        return (
            f"The image features a {a} number {i} near a {b}, photographed from {i % 7 + 2} metres away. The background shows"
            f" item {i * 7 % 1000} beside a {c} with tag {i * 13 % 997}. The light is soft and even, the colours are muted,"
            f" and the scene, catalogued as entry {i * 17 % 9973}, looks calm and natural overall. A {b} rests on the left"
            f" next to marker {i * 31 % 1009}, and a {a} stands in the far corner behind a low wall."
        )

    texts = [text(i) for i in range(400)]
    for i in range(0, 400, 10):
        texts[i + 1] = texts[i].replace("soft", "gentle")
    opts = DedupOptions(workers=0)
    sigs = caption_signatures(texts, opts)
    bands, rows = lsh_params(opts.caption_threshold, opts.num_perm)
    got = sorted(tuple(c.members) for c in caption_clusters([f"{i:03d}" for i in range(400)], sigs, opts.caption_threshold, bands, rows))
    assert got == [(i, i + 1) for i in range(0, 400, 10)]


# ------------------------------------------------------------ the stage


def test_run_dedup_records_clusters_errors_and_replaces_the_previous_run(tmp_path):
    run = tmp_path / "run"
    paths, expected = write_images(tmp_path / "img", n_distinct=8, with_copies=2)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths["img/zz-broken"] = str(tmp_path / "img" / "broken.png")
    texts = {"img/p05": LONG.format(a="goat"), "img/p06": LONG.format(a="goat") + " Nice."}
    write_captions(run, paths, texts)
    s = run_dedup(run, DedupOptions(workers=2))
    assert (s.image_clusters, s.images_in_clusters, s.exact_image_duplicates) == (2, 10, 2)
    assert (s.caption_clusters, s.captions_in_clusters) == (1, 2)
    assert dict(s.image_errors) == {"not_an_image": 1} or dict(s.image_errors) == {"corrupt_image": 1}
    rows = read_table(run / "dedup", DEDUP_SCHEMA).to_pylist()
    by = {(r["kind"], r["item_id"]): r for r in rows}
    assert by[("image", "img/p00-exact")]["method"] == "sha256" and by[("image", "img/p00-exact")]["distance"] == 0
    assert by[("image", "img/p00-jpeg")]["method"] == "phash" and by[("image", "img/p00-jpeg")]["cluster_id"] == "image:img/p00"
    assert by[("image", "img/p00")]["representative"] and not by[("image", "img/p00-resized")]["representative"]
    assert by[("image", "img/zz-broken")]["error"] and by[("image", "img/zz-broken")]["cluster_id"] is None
    cap = by[("caption", "img/p06")]
    assert cap["method"] == "minhash" and cap["cluster_id"] == "caption:img/p05" and 0 < cap["distance"] < 0.2
    assert {(r["kind"], r["item_id"]) for r in rows if r["error"] is None} == {("image", m) for g in expected.values() for m in g} | {("caption", "img/p05"), ("caption", "img/p06")}
    manifest = json.loads((run / "dedup" / "_manifest.json").read_text())
    assert manifest["counts"]["images_removed_by_keep_one"] == 8 and manifest["config"]["lsh_bands_rows"]
    # a rerun with images only replaces the records (no caption rows left behind)
    s2 = run_dedup(run, DedupOptions(captions=False, workers=0))
    assert s2.caption_clusters == 0
    assert {r["kind"] for r in read_table(run / "dedup", DEDUP_SCHEMA).to_pylist()} == {"image"}
    st = stats.collect(run)
    assert st["dedup"]["counts"]["image_clusters"] == 2


def test_options_and_inputs_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="--no-images/--no-texts"):
        DedupOptions(images=False, captions=False)
    with pytest.raises(ConfigError, match="--image-distance"):
        DedupOptions(image_distance=40)
    with pytest.raises(ConfigError, match="no caption shards"):
        run_dedup(tmp_path)
    with pytest.raises(ConfigError, match="--dedup"):
        BatchOptions(dedup="some")


# ------------------------------------------------------------ the batch rule


def clustered_run(root: Path, n_groups: int = 10, per_group: int = 3, singles: int = 14) -> dict[str, int]:
    """Captions + hand-written dedup records: image clusters and caption clusters, some chained."""
    group_of: dict[str, int] = {}
    ids = []
    for g in range(n_groups):
        for m in range(per_group):
            ids.append(f"img/g{g:02d}-{m}")
            group_of[ids[-1]] = g
    ids += [f"img/s{i:02d}" for i in range(singles)]
    with ShardWriter(root / "captions", CAPTIONS_SCHEMA, "r1") as w:
        for n, i in enumerate(ids):
            w.add(dict(image_id=i, image_uri=f"/data/{n}.png", caption=f"Caption {n} of {i}.", key=f"c{n}", created_at=T0))
    with ShardWriter(root / "dedup", DEDUP_SCHEMA, "r1") as w:
        for g in range(n_groups):
            members = [f"img/g{g:02d}-{m}" for m in range(per_group)]
            if g % 2:  # odd groups: member 0~1 by image, 1~2 by caption text: one chained group
                for kind, pair in (("image", members[:2]), ("caption", members[1:])):
                    for k, m in enumerate(pair):
                        w.add(dict(kind=kind, item_id=m, cluster_id=f"{kind}:{pair[0]}", representative=k == 0, method="phash", distance=0.0))
            else:
                for k, m in enumerate(members):
                    w.add(dict(kind="image", item_id=m, cluster_id=f"image:{members[-1]}", representative=k == per_group - 1, method="phash", distance=1.0))
        w.add(dict(kind="image", item_id="img/s00", error="corrupt_image: x"))
    return group_of


@pytest.mark.parametrize("preset, seed", [("sd3", 0), ("sd1.5", 1), ("sdxl", 2)])
def test_batches_never_hold_two_members_of_one_cluster(tmp_path, preset, seed):
    group_of = clustered_run(tmp_path)
    s = build_batches(tmp_path / "captions", tmp_path / "b", BatchOptions(preset=preset, seed=seed, epochs=3, drop_last=False))
    assert s.batches > 0
    seen_pairs = 0
    for path in (tmp_path / "b").glob("part-*.parquet"):
        for row in pq.read_table(path).to_pylist():
            owners = set(row["image_ids"]) | set(row["prompt_image_ids"])
            groups = [group_of[o] for o in owners if o in group_of]
            assert len(groups) == len(set(groups)), (row["image_ids"], row["prompt_image_ids"])
            seen_pairs += len(groups)
    assert seen_pairs > 0  # clustered images were used, just never together
    # without the rule the same inputs do put cluster members together
    build_batches(tmp_path / "captions", tmp_path / "off", BatchOptions(preset=preset, seed=seed, epochs=3, drop_last=False, dedup="off"))
    clashes = 0
    for path in (tmp_path / "off").glob("part-*.parquet"):
        for row in pq.read_table(path).to_pylist():
            groups = [group_of[o] for o in set(row["image_ids"]) | set(row["prompt_image_ids"]) if o in group_of]
            clashes += len(groups) != len(set(groups))
    assert clashes > 0


def test_keep_one_keeps_the_representative_of_each_cluster(tmp_path):
    group_of = clustered_run(tmp_path)
    index = clusters.attach_groups(load_caption_index(tmp_path / "captions"), tmp_path / "dedup", "keep-one")
    kept = [i for i in index.image_ids if i in group_of]
    assert len(kept) == 10 and index.skipped["dedup_duplicate"] == 20
    # even groups: the flagged image representative (member 2); chained odd groups: the image cluster's (member 0)
    assert kept == [f"img/g{g:02d}-{2 if g % 2 == 0 else 0}" for g in range(10)]
    s = build_batches(tmp_path / "captions", tmp_path / "b", BatchOptions(preset="sd3", dedup="keep-one"))
    assert s.images == 24 and s.skipped["dedup_duplicate"] == 20
    with pytest.raises(ConfigError, match="--dedup keep-one"):
        build_batches(tmp_path / "captions", tmp_path / "c", BatchOptions(preset="sd3", dedup="keep-one"), dedup_dir=tmp_path / "none")


def test_run_ids_stay_the_same_without_dedup_records_and_change_with_them(tmp_path):
    clustered_run(tmp_path)
    shutil.move(tmp_path / "dedup", tmp_path / "dedup-later")
    a = build_batches(tmp_path / "captions", tmp_path / "b", BatchOptions(preset="sd3"))
    # the id a build had before the judge, dedup and image-flag options existed: options without them
    old_fields = {k: v for k, v in dataclasses.asdict(BatchOptions(preset="sd3")).items() if k not in ("require_judge", "dedup", "drop_image_flags")}
    payload = json.dumps([old_fields, load_caption_index(tmp_path / "captions").fingerprint()], sort_keys=True)
    assert a.run_id == f"sd3-s0-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"
    shutil.move(tmp_path / "dedup-later", tmp_path / "dedup")
    c = build_batches(tmp_path / "captions", tmp_path / "b", BatchOptions(preset="sd3"))
    assert c.run_id != a.run_id
    cfg = json.loads((tmp_path / "b" / f"_run-{c.run_id}.json").read_text())
    assert cfg["inputs"]["dedup"] == str(tmp_path / "dedup")


def test_cli_dedup_then_batches_and_stats(tmp_path):
    from dataprep.cli import app

    run = tmp_path / "run"
    paths, _ = write_images(tmp_path / "img", n_distinct=10, with_copies=2)
    write_captions(run, paths)
    r = CliRunner().invoke(app, ["dedup", str(run), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "image clusters" in r.output
    r = CliRunner().invoke(app, ["batches", "--captions", str(run / "captions"), "--out", str(run / "batches"), "--preset", "sd3", "--dedup", "keep-one"])
    assert r.exit_code == 0, r.output
    assert "dedup_duplicate" in r.output
    r = CliRunner().invoke(app, ["stats", str(run)])
    assert r.exit_code == 0 and "image clusters / images in them" in r.output and "2 / 10" in r.output
    r = CliRunner().invoke(app, ["dedup", str(run), "--image-distance", "99"])
    assert r.exit_code == 2 and "--image-distance" in r.output


def test_coco_captions_are_items_of_their_image_and_batches_keep_the_groups_apart(tmp_path):
    """COCO: five captions an image; a caption repeated across two images links them."""
    from dataprep.batches import build_coco_batches

    images_dir = tmp_path / "train2017"
    images_dir.mkdir()
    images, annotations = [], []
    for i in range(16):
        name = f"{i:012d}.jpg"
        picture(100 + i, 96).save(images_dir / name, quality=90)
        images.append({"id": i, "file_name": name})
        for k in range(5):
            annotations.append({"id": 10 * i + k, "image_id": i, "caption": f"Caption {k} of picture {i}: a {['dog', 'cat', 'cow', 'owl', 'fox'][k]} beside object {i * 5 + k}."})
    # images 3 and 9 share (up to case) one caption: COCO is full of such pairs
    annotations.append({"id": 999, "image_id": 3, "caption": "A man riding a wave on top of a surfboard."})
    annotations.append({"id": 998, "image_id": 9, "caption": "a man riding a wave on top of a surfboard"})
    coco = tmp_path / "captions_train2017.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations}))
    run = tmp_path / "run"
    s = run_dedup(run, DedupOptions(workers=0), coco_captions=coco, coco_images=images_dir)
    assert s.captions == 16 * 5 + 2 and (s.caption_clusters, s.captions_in_clusters) == (1, 2)
    rows = [r for r in read_table(run / "dedup", DEDUP_SCHEMA).to_pylist() if r["kind"] == "caption"]
    assert {r["item_id"] for r in rows} == {"coco/000000000003", "coco/000000000009"}
    assert {r["cluster_id"] for r in rows} == {"caption:coco/000000000003#5"}  # the 6th caption of image 3
    b = build_coco_batches(coco, images_dir, run / "batches", BatchOptions(preset="sd1.5", epochs=5, drop_last=False))
    assert b.batches > 0
    for path in (run / "batches").glob("part-*.parquet"):
        for row in pq.read_table(path).to_pylist():
            assert not {"coco/000000000003", "coco/000000000009"} <= set(row["image_ids"]) | set(row["prompt_image_ids"])
    cfg = json.loads(next((run / "batches").glob("_run-*.json")).read_text())
    assert cfg["inputs"]["dedup"] == str(run / "dedup")


def test_an_image_over_pillows_bomb_limit_is_a_too_large_error_not_a_crash():
    """dedup opened images without the caption stage's guard: Pillow's own check
    (above ~179 MP) raised DecompressionBombError, which no error row catches."""
    import io

    from PIL import Image

    from dataprep.dedup import image_fingerprint

    buf = io.BytesIO()
    Image.new("1", (15000, 15000)).save(buf, format="PNG")  # 225 MP, a few KB on disk
    with pytest.raises(ValueError, match="too_large"):
        image_fingerprint(buf.getvalue(), max_pixels=64_000_000)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG")
    digest, _, pixels = image_fingerprint(buf.getvalue(), max_pixels=64_000_000)
    assert pixels == 1200 and len(digest) == 64  # the stored size, not the draft's


def test_a_named_dedup_dir_that_is_missing_or_another_store_is_exit_2(tmp_path):
    """A missing --dedup-dir was ignored in the default mode (no dedup, no word);
    a caption store given as --dedup-dir ended in a pyarrow schema dump, exit 1."""
    from dataprep.cli import app

    clustered_run(tmp_path)
    base = ["batches", "--captions", str(tmp_path / "captions"), "--preset", "sd3"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b1"), "--dedup-dir", str(tmp_path / "nowhere")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "--dedup-dir" in r.output and "not a folder" in r.output
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b2"), "--dedup", "keep-one", "--dedup-dir", str(tmp_path / "captions")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "--dedup-dir" in r.output and "does not hold this stage's rows" in r.output


def test_two_dedup_runs_on_one_run_folder_do_not_write_it_at_once(tmp_path):
    """The second run deleted the first's shards as 'old' (FileNotFoundError, mixed records)."""
    import subprocess
    import sys

    from dataprep.dedup import DedupOptions, run_dedup

    clustered_run(tmp_path)
    holder = subprocess.Popen(  # another process is writing RUN/dedup
        [sys.executable, "-c", "import sys, time; from dataprep.store import stage_lock; stage_lock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)", str(tmp_path / "dedup")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="being written by another run"):
            run_dedup(tmp_path, DedupOptions(workers=0))
    finally:
        holder.kill()
        holder.wait()
