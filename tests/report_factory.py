"""A small run directory that looks like a real one, for the report and grid tests.

Images are drawn (a shape on a background), captions and rewrites are
hand-written, and every rewrite is judged by the real rule checker exactly
as the rewrite stage stores it (passed, violations, spans). ``judge=True`` /
``dedup=True`` add the optional stage folders the report reads generically.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dataprep.rules import check
from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, ShardWriter
from softrepa.evaluate import Setting

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

# (image id, shape colour, caption, rewrite): passing and failing rewrites of several rules
PAIRS = [
    ("div2k/0001", "orange", "A brown dog sleeps on a green sofa in a bright living room.", "A brown fox sleeps on a green sofa in a bright living room."),
    ("div2k/0002", "red", "A red car is parked in front of a small wooden house.", "A blue car is parked in front of a small wooden house."),
    ("div2k/0003", "gray", "A cat sits on a stone wall next to a tall tree.", "A rabbit sits on a stone wall next to a tall palm."),
    ("div2k/0004", "blue", "A sailboat floats on a calm lake under a cloudy sky.", "A canoe floats on a calm lake under a cloudy sky."),
    ("div2k/0005", "green", "A church stands at the end of a narrow street.", "A castle stands at the end of a narrow street."),
    ("div2k/0006", "purple", "A woman holds an umbrella on a rainy street.", "Here is the modified text: A woman holds a newspaper on a rainy street."),
    ("div2k/0007", "yellow", "A bowl of apples rests on a wooden table.", "A bowl of lemons rests on a wooden table."),
    ("div2k/0008", "teal", "A horse grazes in a field of tall grass.", "A horse grazes in a field of tall grass."),
    ("div2k/0009", "orange", "A brown dog sleeps on a green sofa in a bright living room.", "A brown cat sleeps on a green sofa in a bright living room."),
    ("div2k/0010", "black", "A lighthouse stands on a rocky coast at sunset.", "A windmill stands on a rocky coast at sunset."),
]


def draw(path: Path, colour: str, size: tuple[int, int] = (480, 320), seed: int = 0) -> Path:
    img = Image.new("RGB", size, (235, 230, 220))
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle([0, int(h * 0.7), w, h], fill=(120, 160, 90))
    x = (seed * 37) % (w // 2) + w // 6
    d.ellipse([x, h // 4, x + w // 3, h // 4 + h // 2], fill=colour, outline="black", width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_run(root: Path, judge: bool = False, dedup: bool = False) -> Path:
    """Write RUN/captions and RUN/edits (and optionally RUN/judge, RUN/dedup); returns RUN."""
    run = root
    images = root / "images"
    with ShardWriter(run / "captions", CAPTIONS_SCHEMA, "20260101T000000000000-aaaaaa", rows_per_shard=4) as w:
        for i, (iid, colour, caption, _) in enumerate(PAIRS):
            uri = draw(images / f"{iid.split('/')[1]}.png", colour, seed=i)
            w.add(dict(image_id=iid, image_uri=str(uri), image_width=480, image_height=320, caption=caption, key=f"cap-{iid}", engine="transformers",
                       model="llava-hf/llava-1.5-13b-hf", prompt_id="caption.txt", sampling='{"temperature": 0}', seed=0, finish_reason="stop",
                       prompt_tokens=600, completion_tokens=20, run_id="r1", created_at=T0))
        # a broken image: caption error row, no edit
        (images / "0011.png").write_bytes(b"not a png")
        w.add(dict(image_id="div2k/0011", image_uri=str(images / "0011.png"), key="cap-div2k/0011", error="not_an_image: cannot identify image file", run_id="r1", created_at=T0))
    with ShardWriter(run / "edits", EDITS_SCHEMA, "20260101T000000000000-aaaaaa", rows_per_shard=4) as w:
        for iid, _, caption, target in PAIRS:
            v = check(caption, target)
            w.add(dict(image_id=iid, image_uri=str(images / f"{iid.split('/')[1]}.png"), source=caption, target=target, raw_output=target,
                       passed=v.passed, violations=list(v.violations), source_span=v.source_span, target_span=v.target_span, attempts=1 if v.passed else 3,
                       key=f"edit-{iid}", engine="transformers", model="meta-llama/Llama-3.1-8B-Instruct", prompt_id="edit.txt",
                       sampling='{"temperature": 0}', seed=0, finish_reason="stop", prompt_tokens=900, completion_tokens=25, run_id="r1", created_at=T0))
        w.add(dict(image_id="div2k/0012", source="A kite flies above a beach.", key="edit-div2k/0012", error="engine: timeout after 120 s", run_id="r1", created_at=T0))
    if judge:  # rows as `dataprep judge` writes them (JUDGE_SCHEMA)
        from dataprep.store import JUDGE_SCHEMA

        rows = [{"image_id": iid, "key": f"j-{iid}", "verdict": "bad" if iid == "div2k/0004" else "good",
                 "rule2_reason": "rule 2: a canoe is fine" if iid != "div2k/0004" else "rule 2: a canoe is not a sailboat-sized change", "error": None,
                 "created_at": T0}
                for iid, *_ in PAIRS[:6]]
        rows.append({"image_id": "div2k/0001", "key": "j-late", "verdict": None, "error": "engine: timeout", "created_at": T0})  # a later failed judgement
        with ShardWriter(run / "judge", JUDGE_SCHEMA, "r1") as w:
            for r in rows:
                w.add(r)
    if dedup:  # rows as `dataprep dedup` writes them (DEDUP_SCHEMA)
        from dataprep.store import DEDUP_SCHEMA

        rows = [
            {"kind": "image", "item_id": "div2k/0001", "cluster_id": "c1", "representative": True, "method": "phash", "distance": 0.0},
            {"kind": "image", "item_id": "div2k/0009", "cluster_id": "c1", "representative": False, "method": "phash", "distance": 2.0},
            {"kind": "caption", "item_id": "cap-div2k/0002", "cluster_id": "c2", "representative": True, "method": "minhash", "distance": 0.0},
            {"kind": "image", "item_id": "div2k/0005", "cluster_id": "c3", "representative": True, "method": "phash", "distance": 0.0},  # singleton: no duplicate
        ]
        with ShardWriter(run / "dedup", DEDUP_SCHEMA, "r1") as w:
            for r in rows:
                w.add(r)
    return run


def make_big_run(root: Path, n: int) -> Path:
    """``n`` caption + edit rows, all pointing at one small image (one thumbnail), written with pyarrow directly."""
    img = draw(root / "images" / "one.png", "orange", size=(64, 48))
    ids = [f"coco/{i:06d}" for i in range(n)]
    src = [f"A photo of object number {i} on a table." for i in range(n)]
    tgt = [f"A photo of thing number {i} on a table." if i % 3 else f"A photo of red thing number {i} on a table." for i in range(n)]
    common = {"run_id": ["r1"] * n, "created_at": [T0] * n, "engine": ["transformers"] * n, "model": ["m"] * n}
    caps = {"image_id": ids, "image_uri": [str(img)] * n, "caption": src, "key": [f"c{i}" for i in range(n)], **common}
    edits = {"image_id": ids, "image_uri": [str(img)] * n, "source": src, "target": tgt, "passed": [bool(i % 3) for i in range(n)],
             "violations": [[] if i % 3 else ["added_content"] for i in range(n)], "source_span": ["object"] * n, "target_span": ["thing"] * n,
             "attempts": [1] * n, "key": [f"e{i}" for i in range(n)], **common}
    for name, cols, schema in (("captions", caps, CAPTIONS_SCHEMA), ("edits", edits, EDITS_SCHEMA)):
        (root / name).mkdir(parents=True)
        full = {f.name: cols.get(f.name, [None] * n) for f in schema}
        pq.write_table(pa.Table.from_pydict(full, schema=schema), root / name / "part-r1-00000.parquet")
    return root


# evaluator settings for grid tests: one vanilla FlowEdit and two soft-token guidance scales
GRID_SETTINGS = [Setting("flowedit", 33, 13.5, "aaaa"), Setting("flowedit+tokens", 30, 9.0, "bbbb"), Setting("flowedit+tokens", 30, 13.0, "cccc")]


def grid_rows(tmp_path: Path, broken: str | None = None) -> list[dict]:
    """Score rows as softrepa.evaluate.score_all writes them, over drawn images."""
    rows = []
    rng = np.random.RandomState(0)
    for k, (iid, src, tgt) in enumerate([("div2k/0001", "a brown dog on a sofa", "a brown fox on a sofa"), ("div2k/0002", "a red car by a house", "a red bus by a house")]):
        pid = f"{iid.replace('/', '_')}-x{k}"
        source = tmp_path / "images" / "source_64" / f"{pid}.png"
        source.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(source)
        for s in GRID_SETTINGS:
            edited = tmp_path / "images" / s.setting_id / f"{pid}.png"
            edited.parent.mkdir(parents=True, exist_ok=True)
            error = "edit: RuntimeError: out of memory" if (broken and s.setting_id == broken and k == 1) else None
            if error is None:
                Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(edited)
            rows.append({"pair_id": pid, "image_id": iid, "setting": s.setting_id, "method": s.method, "n_max": s.n_max, "tgt_cfg": s.tgt_cfg,
                         "source_prompt": src, "target_prompt": tgt, "source_image": str(source), "edited_image": str(edited), "error": error,
                         "clip": None if error else 0.2 + 0.01 * k, "pickscore": None, "lpips": None if error else 0.3, "imagereward": None, "hpsv2": None})
    return rows
