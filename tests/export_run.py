"""A run folder for the export tests, and a reader of the exported prompts_editing.json.

Shared by ``tests/dataprep/test_export.py`` and ``test_export_hf_card.py``
(each has a ``run`` fixture that calls :func:`make_export_run`).
"""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from pathlib import Path

from PIL import Image

from dataprep.store import CAPTIONS_SCHEMA, EDITS_SCHEMA, ShardWriter

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def png(path: Path, size: tuple[int, int], colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_export_run(tmp_path: Path) -> tuple[Path, dict]:
    """A run dir with passing, failed, superseded, error and unreadable edits."""
    root = tmp_path / "run"
    a = png(tmp_path / "imgs/one/0001.png", (40, 30), "red")
    dup = png(tmp_path / "imgs/two/0001.png", (20, 20), "blue")  # same file name as `a`
    zpath = tmp_path / "imgs/div2k.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("DIV2K_train_HR/0003.png", png(tmp_path / "tmp/0003.png", (16, 24), "green").read_bytes())
    g = png(tmp_path / "imgs/0007.png", (12, 12), "white")
    edits = [
        # image_id, uri, source, target, passed, error, hours
        ("div2k/0001", str(a), "A brown dog sleeps on a sofa next to a dog bed.\n", "A brown fox sleeps on a sofa next to a fox bed.\n", True, None, 1),
        ("other/0001", str(dup), "A cat sits on a mat.", "An owl sits on a mat.", True, None, 1),
        ("div2k/0003", f"zip://DIV2K_train_HR/0003.png::{zpath}", "A small boat on a calm lake.", "A small canoe on a calm lake.", True, None, 1),
        ("div2k/0004", str(a), "A red car near a house.", "A blue truck near a barn.", False, None, 1),  # failed
        ("div2k/0005", str(a), "A man holds an umbrella.", "A man holds a kite.", True, None, 1),  # older passing ...
        ("div2k/0005", str(a), "A man holds an umbrella.", "A woman holds a flag.", False, None, 2),  # ... beats a newer failure
        ("div2k/0006", str(a), "A tree in a field.", "ERROR ROW TARGET", True, "engine: timeout", 1),
        ("div2k/0007", None, "A lamp on a desk.", "A vase on a desk.", True, None, 1),  # uri from the caption store
        ("div2k/0008", str(tmp_path / "missing.png"), "A bird on a wire.", "A bat on a wire.", True, None, 1),
    ]
    with ShardWriter(root / "edits", EDITS_SCHEMA, "r1", rows_per_shard=4) as w:
        for n, (iid, uri, s, t, ok, err, h) in enumerate(edits):
            w.add(dict(image_id=iid, image_uri=uri, source=s, target=t, passed=ok, violations=[] if ok else ["multiple_concepts"], key=f"k{n}", error=err, created_at=T0 + dt.timedelta(hours=h)))
    with ShardWriter(root / "captions", CAPTIONS_SCHEMA, "r1") as w:
        w.add(dict(image_id="div2k/0007", image_uri=str(g), caption="A lamp on a desk.", key="c7", created_at=T0))
    files = {"div2k/0001": a, "other/0001": dup, "div2k/0007": g}
    return root, {"edits": edits, "files": files, "zip": zpath}


def read_softrepa(path: Path | str) -> list[dict[str, str]]:
    """Entries of a ``prompts_editing.json`` with ``img_path`` resolved against its folder."""
    path = Path(path)
    entries = json.loads(path.read_text(encoding="utf-8"))
    return [dict(e, img_path=str(path.parent / e["img_path"])) for e in entries]
