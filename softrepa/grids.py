"""Editing grids: per pair, source | FlowEdit at each guidance | FlowEdit + tokens at each guidance.

The paper argues with such grids (appendix F, Figs. 10-12: a source image
beside its FlowEdit edits with and without soft tokens). :func:`write_grids`
turns the evaluator's per-image score rows (``softrepa.evaluate.score_all``)
into::

    OUT/grids/index.html       every pair: prompts (changed words highlighted), the images, per-image
                               scores; a search box and a method filter; opens from disk, no network
    OUT/grids/<pair>.png       the same row as one PNG (tiles <= ``tile`` px, labels and scores drawn in)
    OUT/grids/_grids.json      pair -> content hash, so a rerun redraws only grids whose inputs changed

Pure except for the files it writes; only Pillow and Jinja2 are imported.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dataprep.store import atomic_file, atomic_write_text
from softrepa.images import open_image

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: per-image metrics shown under a tile, in the paper's table order
SHOWN_METRICS = (("imagereward", "ImageReward"), ("pickscore", "PickScore"), ("clip", "CLIP"), ("hpsv2", "HPS"), ("lpips", "LPIPS"))
METHOD_LABELS = {"flowedit": "FlowEdit", "flowedit+tokens": "FlowEdit + tokens"}
GRIDS_DIR = "grids"


@dataclass
class GridSummary:
    folder: Path
    index: Path
    pairs: int
    drawn: int  # PNGs (re)drawn this run
    reused: int


def changed_words(source: str, target: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Split both prompts into (text, changed) pieces by a word diff (whitespace kept).

    ``"a cat on grass", "a dog on grass"`` -> ``[("a ", False), ("cat", True), (" on grass", False)]``
    and the same for the target with ``"dog"``. Case-insensitive, like the rule checker's diff.
    """
    def split(text: str) -> list[str]:
        return re.findall(r"\s+|[\w'-]+|[^\w\s]", text)

    a, b = split(source), split(target)
    sm = difflib.SequenceMatcher(a=[t.lower() for t in a], b=[t.lower() for t in b], autojunk=False)
    out_a: list[tuple[str, bool]] = []
    out_b: list[tuple[str, bool]] = []

    def push(out: list[tuple[str, bool]], toks: list[str], changed: bool) -> None:
        words = [i for i, t in enumerate(toks) if not t.isspace()]
        for i, t in enumerate(toks):
            # spaces inside a changed phrase belong to it; those around it do not
            flag = changed and bool(words) and words[0] <= i <= words[-1]
            if out and out[-1][1] == flag:
                out[-1] = (out[-1][0] + t, flag)
            else:
                out.append((t, flag))

    for op, i1, i2, j1, j2 in sm.get_opcodes():
        push(out_a, a[i1:i2], op != "equal")
        push(out_b, b[j1:j2], op != "equal")
    return out_a, out_b


def _short(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def pair_grids(rows: Sequence[dict[str, Any]], settings: Sequence[Any]) -> list[dict[str, Any]]:
    """Score rows -> one dict per pair: prompts, diff pieces, source image and one tile per setting (in ``settings`` order)."""
    order = [s.setting_id for s in settings]
    by_setting = {s.setting_id: s for s in settings}
    pairs: dict[str, dict[str, Any]] = {}
    for r in rows:
        p = pairs.get(r["pair_id"])
        if p is None:
            src_pieces, tgt_pieces = changed_words(r["source_prompt"] or "", r["target_prompt"] or "")
            p = pairs[r["pair_id"]] = {"pair_id": r["pair_id"], "image_id": r["image_id"], "source": r["source_prompt"], "target": r["target_prompt"],
                                       "source_pieces": src_pieces, "target_pieces": tgt_pieces, "source_image": r["source_image"], "tiles": {}}
        s = by_setting.get(r["setting"])
        scores = [(label, r.get(m)) for m, label in SHOWN_METRICS if r.get(m) is not None]
        p["tiles"][r["setting"]] = {
            "setting": r["setting"], "method": r["method"], "label": f"{METHOD_LABELS.get(r['method'], r['method'])} cfg {r['tgt_cfg']:g}",
            "n_max": s.n_max if s else r.get("n_max"), "image": r["edited_image"], "error": r.get("error"), "scores": scores,
        }
    out = []
    for p in pairs.values():
        p["tiles"] = [p["tiles"][sid] for sid in order if sid in p["tiles"]]
        out.append(p)
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable default font
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(draw: Any, text: str, font: Any, width: int, max_lines: int = 3) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + " ..."
    return lines


def draw_grid(pair: dict[str, Any], tile: int) -> Any:
    """One pair as a PIL image: a header with both prompts, then source | tiles, each labelled and scored."""
    from PIL import Image, ImageDraw

    cols = 1 + len(pair["tiles"])
    pad, fs = 6, max(10, tile // 18)
    font, bold = _font(fs), _font(fs + 1)
    width = cols * tile + (cols + 1) * pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    src_lines = _wrap(probe, "source: " + (pair["source"] or ""), font, width - 2 * pad)
    tgt_lines = _wrap(probe, "target: " + (pair["target"] or ""), font, width - 2 * pad)
    line_h = fs + 4
    head = pad + line_h * (len(src_lines) + len(tgt_lines)) + pad
    foot = line_h * (1 + max([len(t["scores"]) for t in pair["tiles"]] + [0])) + pad
    canvas = Image.new("RGB", (width, head + tile + foot), "white")
    d = ImageDraw.Draw(canvas)
    y = pad
    for line in src_lines:
        d.text((pad, y), line, fill=(150, 80, 0), font=font)
        y += line_h
    for line in tgt_lines:
        d.text((pad, y), line, fill=(20, 110, 40), font=font)
        y += line_h

    def paste(path: str | None, error: str | None, x: int) -> None:
        img = None
        if path and not error:
            try:
                img = open_image(path)
            except Exception as exc:  # noqa: BLE001 -- a missing edited image is drawn as this tile's error
                error = f"{type(exc).__name__}"
        if img is None:
            d.rectangle([x, head, x + tile - 1, head + tile - 1], fill=(235, 235, 235))
            for i, line in enumerate(_wrap(d, f"error: {error or 'no image'}", font, tile - 8, 6)):
                d.text((x + 4, head + 4 + i * line_h), line, fill=(160, 30, 30), font=font)
            return
        img.thumbnail((tile, tile))
        canvas.paste(img, (x + (tile - img.width) // 2, head + (tile - img.height) // 2))

    x = pad
    paste(pair["source_image"], None, x)
    d.text((x, head + tile + 2), "source", fill="black", font=bold)
    for t in pair["tiles"]:
        x += tile + pad
        paste(t["image"], t["error"], x)
        d.text((x, head + tile + 2), t["label"], fill="black", font=bold)
        for i, (label, v) in enumerate(t["scores"]):
            d.text((x, head + tile + 2 + (i + 1) * line_h), f"{label} {_short(v)}", fill=(70, 70, 70), font=font)
    return canvas


def _content_hash(pair: dict[str, Any], tile: int) -> str:
    def stamp(path: str | None) -> list[Any]:
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        return [path, st.st_size if st else None, st.st_mtime_ns if st else None]

    body = [tile, pair["source"], pair["target"], stamp(pair["source_image"]),
            [[t["label"], t["error"], t["scores"], stamp(t["image"])] for t in pair["tiles"]]]
    return hashlib.sha256(json.dumps(body, default=str).encode()).hexdigest()[:16]


def _save_png(image: Any, path: Path) -> None:
    with atomic_file(path, fsync=False) as tmp:
        image.save(tmp, format="PNG", optimize=True)


def write_grids(out: Path | str, rows: Sequence[dict[str, Any]], settings: Sequence[Any], tile: int = 256, title: str | None = None) -> GridSummary:
    """Write OUT/grids (see the module doc) from the evaluator's score rows; returns what was written."""
    import jinja2

    out = Path(out)
    folder = out / GRIDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pairs = pair_grids(rows, settings)
    index_path = folder / "_grids.json"
    try:
        known = json.loads(index_path.read_text()) if index_path.exists() else {}
    except (OSError, ValueError):
        known = {}
    drawn = reused = 0
    hashes = {}
    for p in pairs:
        png = folder / f"{p['pair_id']}.png"
        h = hashes[p["pair_id"]] = _content_hash(p, tile)
        if png.exists() and known.get(p["pair_id"]) == h:
            reused += 1
        else:
            _save_png(draw_grid(p, tile), png)
            drawn += 1
        p["png"] = png.name
        p["source_rel"] = os.path.relpath(p["source_image"], folder) if p["source_image"] else None
        for t in p["tiles"]:
            t["rel"] = os.path.relpath(t["image"], folder) if t["image"] else None
    index_path.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")

    columns = []
    for s in settings:
        columns.append({"setting": s.setting_id, "method": s.method, "label": f"{METHOD_LABELS.get(s.method, s.method)} cfg {s.tgt_cfg:g}", "n_max": s.n_max,
                        "means": [(label, _mean([r.get(m) for r in rows if r["setting"] == s.setting_id and r.get("error") is None])) for m, label in SHOWN_METRICS]})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("grids.html.j2").render(
        title=title or f"editing grids: {out.resolve().name}", pairs=pairs, columns=columns,
        methods=[(m, METHOD_LABELS.get(m, m)) for m in dict.fromkeys(s.method for s in settings)], fmt=_short, tile=tile,
    )
    page = folder / "index.html"
    atomic_write_text(page, html)
    return GridSummary(folder, page, len(pairs), drawn, reused)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
