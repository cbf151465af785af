"""`dataprep report`: cards from a run directory, the files of a static report, stats and flow links."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from dataprep.errors import ConfigError
from dataprep.report import ReportOptions, build_report
from dataprep.report.cards import collect, span_range
from dataprep.report.views import find_views
from tests.report_factory import make_big_run, make_run


def test_span_range_prefers_whole_words_and_the_first_match():
    assert span_range("a cat and a category", "cat") == [2, 5]
    assert span_range("the scatter of cats", "cat") == [5, 8]  # no whole word: first occurrence
    assert span_range("a dog", "fox") is None
    assert span_range(None, "x") is None and span_range("x", None) is None


def test_cards_carry_caption_edit_verdict_spans_and_provenance(tmp_path):
    data = collect(make_run(tmp_path / "run"))
    cards = {c["id"]: c for c in data.cards}
    assert list(cards) == sorted(cards) and len(cards) == 12
    c = cards["div2k/0001"]
    assert c["status"] == "passed" and c["viol"] == [] and "src" not in c  # source == caption: not repeated
    assert c["cap"][slice(*c["ss"])] == "dog" and c["tgt"][slice(*c["ts"])] == "fox"
    assert data.provenance[c["ep"][0]]["model"] == "meta-llama/Llama-3.1-8B-Instruct" and c["ep"][1] == "edit-div2k/0001"
    assert data.provenance[c["cp"][0]]["model"] == "llava-hf/llava-1.5-13b-hf" and c["cp"][4:6] == [600, 20]
    assert len(data.provenance) == 3  # captioner, rewriter, the bare error rows: each shipped once, not per row
    assert cards["div2k/0002"]["viol"] == ["color_change"] and cards["div2k/0002"]["status"] == "failed" and cards["div2k/0002"]["att"] == 3
    assert cards["div2k/0008"]["ss"] is None  # identical: no span
    assert cards["div2k/0011"]["cerr"].startswith("not_an_image") and cards["div2k/0011"]["status"] == "none"
    assert cards["div2k/0012"]["status"] == "error" and cards["div2k/0012"]["eerr"].startswith("engine")
    s = data.summary
    assert s["cards"] == 12 and s["status"] == {"passed": 4, "failed": 6, "error": 1, "none": 1} and s["checked"] == 10
    assert s["rules"] == {"building_type": 2, "color_change": 1, "identical": 1, "multiple_concepts": 1, "preamble": 1}
    assert "verdicts" not in s and "duplicates" not in s  # optional stages absent: no empty filters


def test_judge_and_dedup_stores_show_on_the_cards(tmp_path):
    data = collect(make_run(tmp_path / "run", judge=True, dedup=True))
    cards = {c["id"]: c for c in data.cards}
    assert cards["div2k/0004"]["judge"]["verdict"] == "bad" and "canoe" in cards["div2k/0004"]["judge"]["rule2_reason"]
    assert "judge" not in cards["div2k/0007"]
    assert cards["div2k/0001"]["judge"]["verdict"] == "good"  # its later judge error row does not hide the verdict
    # an image cluster by image id, a caption cluster by the caption's key; a singleton is no duplicate
    assert [d["cluster"] for d in cards["div2k/0001"]["dup"]] == ["c1"] and cards["div2k/0009"]["dup"][0]["size"] == 2
    assert "dup" not in cards["div2k/0005"] and "dup" not in cards["div2k/0002"]
    assert data.summary["verdicts"] == {"good": 5, "bad": 1} and data.summary["duplicates"] == {"clusters": 1, "images": 2}


def test_the_newest_passing_edit_row_wins(tmp_path):
    from dataprep.store import EDITS_SCHEMA, ShardWriter

    run = make_run(tmp_path / "run")
    with ShardWriter(run / "edits", EDITS_SCHEMA, "20270101T000000000000-bbbbbb") as w:  # a later run
        w.add(dict(image_id="div2k/0001", source="s", target="t", passed=False, violations=["identical"], key="later-fail"))
        w.add(dict(image_id="div2k/0002", source="A red car.", target="A red bus.", passed=True, violations=[], source_span="car", target_span="bus", key="later-pass"))
    cards = {c["id"]: c for c in collect(run).cards}
    assert cards["div2k/0001"]["ep"][1] == "edit-div2k/0001" and cards["div2k/0001"]["more"] == 1  # an older pass beats a newer fail
    assert cards["div2k/0002"]["ep"][1] == "later-pass" and cards["div2k/0002"]["src"] == "A red car."


def test_build_report_writes_a_self_contained_folder(tmp_path):
    run = make_run(tmp_path / "run", judge=True, dedup=True)
    out = tmp_path / "report"
    s = build_report(run, out, ReportOptions(chunk_size=5, page_size=4))
    assert (s.cards, s.chunks, s.thumbs, s.thumb_errors) == (12, 3, 10, 1)
    html = (out / "index.html").read_text()
    # nothing leaves the folder: no http(s) URL anywhere in what the page loads
    for f in [out / "index.html", out / "assets" / "report.js", out / "assets" / "report.css", *sorted((out / "data").glob("*.js"))]:
        assert not re.search(r"https?://", f.read_text()), f
    assert 'src="data/meta.js"' in html and 'src="assets/report.js"' in html
    assert ">building_type</a>" in html and "judge bad" in html and "2</b> images in 1 duplicate clusters" in html  # summary rendered by the template
    chunk = (out / "data" / "chunk-0000.js").read_text()
    assert chunk.startswith("window.__chunk(0,[") and json.loads(chunk[len("window.__chunk(0,"):-3])[0]["id"] == "div2k/0001"
    for t in (out / "thumbs").glob("*.jpg"):
        with Image.open(t) as im:
            assert max(im.size) <= 256 and im.format == "JPEG"
    assert [v["path"] for v in find_views(run)["report"]] == [str((out / "index.html").resolve())]
    # a rerun reuses the thumbnails and drops chunk files a larger report left behind
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "thumbs").glob("*.jpg")}
    build_report(run, out, ReportOptions(chunk_size=100))
    assert {p: p.stat().st_mtime_ns for p in (out / "thumbs").glob("*.jpg")} == mtimes
    assert sorted(p.name for p in (out / "data").glob("chunk-*.js")) == ["chunk-0000.js"]


def test_a_large_run_is_chunked_and_the_page_stays_small(tmp_path):
    run = make_big_run(tmp_path / "big", 10_000)
    out = tmp_path / "report"
    s = build_report(run, out, ReportOptions(chunk_size=500))
    assert s.cards == 10_000 and s.chunks == 20 and s.thumbs == 10_000  # one image shared by every row: one thumbnail file
    assert len(list((out / "thumbs").iterdir())) == 1
    assert (out / "index.html").stat().st_size < 20_000 and (out / "data" / "meta.js").stat().st_size < 20_000
    assert max(p.stat().st_size for p in (out / "data").glob("chunk-*.js")) < 500_000


@pytest.mark.parametrize("kw, flag", [({"page_size": 0}, "--page-size"), ({"thumb_size": 4000}, "--thumb-size"), ({"chunk_size": 0}, "--chunk-size"), ({"limit": 0}, "--limit")])
def test_bad_options_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        ReportOptions(**kw)


def test_cli_report_and_stats_say_where_it_is(tmp_path):
    from dataprep.cli import app

    run = make_run(tmp_path / "run")
    cli = CliRunner()
    r = cli.invoke(app, ["report", str(run), "--page-size", "6"])
    assert r.exit_code == 0, r.output
    assert "12 images" in r.output and (run / "report" / "index.html").resolve().as_uri() in r.output
    (run / "train" / "sd3-x").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(run / "train" / "sd3-x" / "curves.png")
    (run / "eval" / "vanilla" / "grids").mkdir(parents=True)
    (run / "eval" / "vanilla" / "grids" / "index.html").write_text("<html></html>")
    r = cli.invoke(app, ["stats", str(run)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    for where in ("to look at", str((run / "report" / "index.html").resolve()), str((run / "train" / "sd3-x" / "curves.png").resolve()), "grids/index.html"):
        assert where in r.output
    r = cli.invoke(app, ["stats", str(run), "--json"])
    assert json.loads(r.output)["views"]["curves"][0]["path"].endswith("curves.png")
    # bad configuration: exit 2 naming the flag, before any work
    r = cli.invoke(app, ["report", str(run), "--page-size", "0"])
    assert r.exit_code == 2 and "--page-size" in r.output
    r = cli.invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "RUN" in r.output


def test_views_markdown_links_report_grids_and_curves(tmp_path):
    from flows.artifacts import views_markdown

    run = make_run(tmp_path / "run")
    assert views_markdown(run) is None
    build_report(run, run / "report", ReportOptions(thumbs=False))
    curves = tmp_path / "train" / "curves.png"
    curves.parent.mkdir()
    Image.new("RGB", (8, 8)).save(curves)
    md = views_markdown(run, {"training curves": curves, "editing grids": tmp_path / "missing.html"})
    assert "**training curves**" in md and curves.resolve().as_uri() in md
    assert (run / "report" / "index.html").resolve().as_uri() in md and "**report**" in md
    assert "missing.html" not in md


@pytest.mark.parametrize("stage", ["captions", "edits"])
def test_a_corrupt_shard_is_exit_2_naming_it_for_report_stats_and_judge(tmp_path, stage):
    """report, stats and judge read the stores without the check the stages make:
    a cut-off shard ended in pyarrow's ArrowInvalid, exit 1, with no file named."""
    from dataprep.cli import app

    run = make_run(tmp_path)
    bad = run / stage / "part-zzz-00000.parquet"
    bad.write_bytes(b"PAR1xyz")
    for args in (["report", str(run), "--no-thumbs"], ["stats", str(run)], ["judge", "--out", str(run), "--model", str(tmp_path / "no-model")]):
        r = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        if args[0] == "judge" and stage == "captions":
            continue  # the judge reads edits only
        assert r.exit_code == 2, (args, r.output)
        assert "part-zzz-00000.parquet" in r.output and "corrupt" in r.output, (args, r.output)


def test_report_out_inside_a_stage_folder_is_refused(tmp_path):
    """Its assets/ and data/ inside captions/ made pd.read_parquet('RUN/captions') fail."""
    run = make_run(tmp_path)
    with pytest.raises(ConfigError, match="--out"):
        build_report(run, run / "captions" / "report", ReportOptions(thumbs=False))
    assert not (run / "captions" / "report").exists()
