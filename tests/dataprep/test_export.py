"""Exports: SoftREPA prompts_editing.json round trip, PIE-Bench brackets, HF dataset."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from dataprep.errors import ConfigError
from dataprep.export import export_hf, export_piebench, export_softrepa, load_pairs
from dataprep.rules import check
from tests.export_run import make_export_run, read_softrepa

# The official editing script reads a list of objects with exactly these keys, in this order.
OFFICIAL_KEYS = ["prompt", "img_path", "tgt_prompt"]


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, dict]:
    """A run dir with passing, failed, superseded, error and unreadable edits."""
    return make_export_run(tmp_path)


def passing_pairs(edits) -> set[tuple[str, str, str]]:
    return {(i, s, t) for i, _, s, t, ok, err, _ in edits if ok and err is None and i != "div2k/0008"}


def test_softrepa_round_trip_and_reference_keys(run, tmp_path):
    root, fx = run
    out = tmp_path / "softrepa"
    s = export_softrepa(root, out)
    raw = json.loads((out / "prompts_editing.json").read_text())
    assert all(list(e) == OFFICIAL_KEYS for e in raw)  # same keys, same order
    back = read_softrepa(out / "prompts_editing.json")
    by_source = {(p, t) for p, t in ((e["prompt"], e["tgt_prompt"]) for e in back)}
    assert by_source == {(s_, t) for _, s_, t in passing_pairs(fx["edits"])}
    assert s.pairs == len(back) == 5 and s.skipped["image_unreadable"] == 1 and s.skipped["edit_failed_rows"] == 2
    for e in back:  # every img_path resolves beside the json and holds the right pixels
        assert Path(e["img_path"]).parent == out
        Image.open(e["img_path"]).verify()
    names = sorted(Path(e["img_path"]).name for e in back)
    assert "0003.png" in names and "0007.png" in names and "div2k_0001.png" in names and "other_0001.png" in names
    src = {e["prompt"]: Path(e["img_path"]) for e in back}
    assert src["A cat sits on a mat."].read_bytes() == fx["files"]["other/0001"].read_bytes()
    with zipfile.ZipFile(fx["zip"]) as z:
        assert src["A small boat on a calm lake."].read_bytes() == z.read("DIV2K_train_HR/0003.png")
    registry = json.loads((root / "exports.json").read_text())["exports"]
    assert [(r["kind"], r["pairs"]) for r in registry] == [("softrepa", 5)]


def test_failed_edits_only_with_include_failed(run, tmp_path):
    root, fx = run
    pairs, _ = load_pairs(root)
    assert all(p.passed for p in pairs) and "A blue truck near a barn." not in {p.target for p in pairs}
    pairs, _ = load_pairs(root, include_failed=True)
    targets = {p.target for p in pairs}
    assert "A blue truck near a barn." in targets and "A man holds a kite." in targets  # passing beats newer failure
    assert "ERROR ROW TARGET" not in targets and "A woman holds a flag." not in targets


def test_softrepa_link(run, tmp_path):
    root, fx = run
    out = tmp_path / "linked"
    export_softrepa(root, out, link=True)
    assert (out / "other_0001.png").is_symlink() and (out / "other_0001.png").resolve() == fx["files"]["other/0001"].resolve()
    assert not (out / "0003.png").is_symlink()  # a zip member cannot be linked: copied


def unbracket(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Plain text and the [start, end) ranges that were bracketed."""
    plain, spans, pos = [], [], 0
    for m in re.finditer(r"\[([^\[\]]*)\]", text):
        plain.append(text[pos : m.start()])
        start = sum(map(len, plain))
        plain.append(m.group(1))
        spans.append((start, start + len(m.group(1))))
        pos = m.end()
    plain.append(text[pos:])
    return "".join(plain), spans


@pytest.mark.parametrize("include_failed", [False, True])
def test_piebench_brackets_are_the_checkers_spans(run, tmp_path, include_failed):
    root, fx = run
    out = tmp_path / f"pie{include_failed}"
    s = export_piebench(root, out, include_failed=include_failed)
    mapping = json.loads((out / "mapping_file.json").read_text())
    assert len(mapping) == s.pairs == (6 if include_failed else 5)
    multi = 0
    for key, e in mapping.items():
        assert re.fullmatch(r"\d{12}", key) and (out / "annotation_images" / e["image_path"]).is_file()
        source, src_spans = unbracket(e["original_prompt"])
        target, tgt_spans = unbracket(e["editing_prompt"])
        v = check(source, target)
        assert tgt_spans == [sp for sp in v.target_spans if sp[1] > sp[0]] and tgt_spans
        assert src_spans == [sp for sp in v.source_spans if sp[1] > sp[0]]
        assert e["blended_word"].split(" ") == [v.source_span.split()[-1], v.target_span.split()[-1]]
        multi += len(tgt_spans) > 1
    assert multi >= 1  # dog ... dog bed -> fox ... fox bed: every mention bracketed


def test_hf_dataset(run, tmp_path):
    import datasets

    import threading

    root, fx = run
    lock, seen = threading.Lock(), []  # an unpicklable progress callback, like the CLI's rich bar

    def progress(done: int, total: int) -> None:
        with lock:
            seen.append((done, total))

    s = export_hf(root, tmp_path / "hf", progress=progress)
    assert seen[-1] == (6, 6)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(ds) == s.pairs == 5 and isinstance(ds.features["image"], datasets.Image)
    row = ds.filter(lambda r: r["image_id"] == "div2k/0003")[0]
    assert row["image"].size == (16, 24) and row["target"] == "A small canoe on a calm lake."


def test_no_edits_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--run"):
        export_softrepa(tmp_path, tmp_path / "out")


def test_corrupt_zip_member_is_skipped_and_the_export_goes_on(run, tmp_path):
    root, fx = run
    raw = bytearray(fx["zip"].read_bytes())
    member = (tmp_path / "tmp/0003.png").read_bytes()
    raw[raw.find(member) + 40] ^= 0xFF  # stored member bytes no longer match the CRC: zipfile.BadZipFile
    fx["zip"].write_bytes(bytes(raw))
    s = export_softrepa(root, tmp_path / "softrepa")
    assert s.pairs == 4 and s.skipped["image_unreadable"] == 2  # missing.png and the bad member
