"""Editing grids: source | FlowEdit at each guidance | FlowEdit + tokens, as a page and a PNG per pair."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from softrepa.grids import GRIDS_DIR, changed_words, pair_grids, write_grids
from tests.report_factory import GRID_SETTINGS as SETTINGS, grid_rows as _rows


def test_changed_words_marks_the_replaced_phrase_on_both_sides():
    src, tgt = changed_words("A cat sits on a red mat.", "A small dog sits on a red mat.")
    assert [t for t, changed in src if changed] == ["cat"]
    assert [t for t, changed in tgt if changed] == ["small dog"]
    assert "".join(t for t, _ in src) == "A cat sits on a red mat." and "".join(t for t, _ in tgt) == "A small dog sits on a red mat."
    same, _ = changed_words("Same text.", "same TEXT.")  # case-insensitive, like the rule checker
    assert not any(changed for _, changed in same)


def test_pair_grids_orders_tiles_by_setting_and_keeps_scores(tmp_path):
    rows = _rows(tmp_path)
    grids = pair_grids(list(reversed(rows)), SETTINGS)
    assert [g["image_id"] for g in grids] == ["div2k/0002", "div2k/0001"]
    g = grids[1]
    assert [t["setting"] for t in g["tiles"]] == [s.setting_id for s in SETTINGS]
    assert [t["label"] for t in g["tiles"]] == ["FlowEdit cfg 13.5", "FlowEdit + tokens cfg 9", "FlowEdit + tokens cfg 13"]
    assert g["tiles"][0]["scores"] == [("CLIP", 0.2), ("LPIPS", 0.3)]


def test_write_grids_page_and_pngs_and_reuse(tmp_path):
    rows = _rows(tmp_path, broken=SETTINGS[2].setting_id)
    s = write_grids(tmp_path, rows, SETTINGS, tile=96)
    assert (s.pairs, s.drawn, s.reused) == (2, 2, 0)
    folder = tmp_path / GRIDS_DIR
    with Image.open(folder / f"{rows[0]['pair_id']}.png") as im:
        assert im.width == 4 * 96 + 5 * 6 and im.height > 96  # source + 3 settings, labels and scores below
        tile = np.asarray(im.convert("RGB"))[:, 6 + 96 + 6 : 6 + 2 * 96 + 6]
        assert tile.std() > 20  # an edited image was pasted, not a blank tile
    html = (folder / "index.html").read_text()
    assert '<mark class="span-src">dog</mark>' in html and '<mark class="span-tgt">fox</mark>' in html
    assert "edit: RuntimeError: out of memory" in html and "http://" not in html and "https://" not in html
    assert f'src="../images/{SETTINGS[0].setting_id}/{rows[0]["pair_id"]}.png"' in html
    # a rerun redraws only the grids whose inputs changed
    assert write_grids(tmp_path, rows, SETTINGS, tile=96).drawn == 0
    rows[0]["clip"] = 0.9
    s = write_grids(tmp_path, rows, SETTINGS, tile=96)
    assert (s.drawn, s.reused) == (1, 1)
    assert set(json.loads((folder / "_grids.json").read_text())) == {r["pair_id"] for r in rows}
