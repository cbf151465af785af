"""The report and the editing-grid page in a real headless Chromium: filter, search, spans, paging, screenshots."""

from __future__ import annotations

import pytest

from dataprep.report import ReportOptions, build_report
from softrepa.grids import write_grids
from tests.browser import browser, page, screenshot, settle  # noqa: F401 -- fixtures
from tests.report_factory import GRID_SETTINGS as SETTINGS, grid_rows as _rows, make_big_run, make_run

pytestmark = pytest.mark.slow


def ids(page) -> list[str]:
    return page.eval_on_selector_all("#cards article.card", "els => els.map(e => e.dataset.id)")


def marks(page, card_id: str) -> tuple[list[str], list[str]]:
    card = page.locator(f'article.card[data-id="{card_id}"]')
    return card.locator("mark.span-src").all_inner_texts(), card.locator("mark.span-tgt").all_inner_texts()


def search(page, text: str, timeout_ms: int = 30_000) -> None:
    page.fill("#f-q", text)
    page.press("#f-q", "Enter")  # applies at once (typing applies after a short pause)
    settle(page, timeout_ms)


def test_report_filters_searches_and_highlights_in_chromium(page, tmp_path):
    run = make_run(tmp_path / "run", judge=True, dedup=True)
    out = tmp_path / "report"
    build_report(run, out, ReportOptions(page_size=4, chunk_size=5))
    page.goto((out / "index.html").as_uri())
    settle(page)
    assert ids(page) == ["div2k/0001", "div2k/0002", "div2k/0003", "div2k/0004"]
    assert "of 12" in page.inner_text("#where")
    assert page.locator('article.card[data-id="div2k/0001"] img').get_attribute("loading") == "lazy"
    assert page.evaluate("() => document.querySelector('article.card img').naturalWidth") <= 256

    page.click("nav.pager >> nth=0 >> button.next")
    settle(page)
    assert ids(page) == ["div2k/0005", "div2k/0006", "div2k/0007", "div2k/0008"]

    # filter by rule: the two building changes, with both spans marked
    page.select_option("#f-rule", "building_type")
    settle(page)
    assert ids(page) == ["div2k/0005", "div2k/0010"]
    assert marks(page, "div2k/0005") == (["church"], ["castle"]) and marks(page, "div2k/0010") == (["lighthouse"], ["windmill"])
    assert "rule=building_type" in page.url and "of 2 matching" in page.inner_text("#where")

    # a search on top of a status filter
    page.click("#f-clear")
    page.select_option("#f-status", "passed")
    settle(page)
    assert ids(page) == ["div2k/0001", "div2k/0004", "div2k/0007", "div2k/0009"]
    search(page, "sofa fox")
    assert ids(page) == ["div2k/0001"] and marks(page, "div2k/0001") == (["dog"], ["fox"])

    # judge verdict and duplicate cluster filters; the cluster chip filters to its members
    page.click("#f-clear")
    page.select_option("#f-verdict", "bad")
    settle(page)
    assert ids(page) == ["div2k/0004"]
    page.click("#f-clear")
    settle(page)
    page.click('article.card[data-id="div2k/0001"] button.chip.dup')
    settle(page)
    assert ids(page) == ["div2k/0001", "div2k/0009"] and "cluster=c1" in page.url

    # provenance on demand
    card = page.locator('article.card[data-id="div2k/0009"]')
    assert not card.locator("details").evaluate("d => d.open")
    card.locator("details summary").click()
    assert "meta-llama/Llama-3.1-8B-Instruct" in card.locator("details").inner_text()
    page.click("#f-clear")
    settle(page)
    page.select_option("#f-status", "failed")
    settle(page)
    assert page.js_errors == []
    shot = screenshot(page, tmp_path, "report.png")
    assert shot.stat().st_size > 10_000


def test_100k_rows_first_page_loads_one_chunk_and_a_page_of_cards(page, tmp_path):
    run = make_big_run(tmp_path / "big", 100_000)
    out = tmp_path / "report"
    s = build_report(run, out, ReportOptions(page_size=48, chunk_size=1000))
    assert s.cards == 100_000 and s.chunks == 100
    page.goto((out / "index.html").as_uri())
    settle(page)
    assert page.locator("#cards article.card").count() == 48
    loaded = "() => document.querySelectorAll('script[src^=\"data/chunk-\"]').length"
    assert page.evaluate(loaded) == 1
    assert "of 100000" in page.inner_text("#where")
    # the last page loads only its own chunk
    page.evaluate("() => { location.hash = 'page=2084'; }")
    settle(page)
    assert page.locator("#cards article.card").count() == 100_000 - 2083 * 48
    assert ids(page)[-1] == "coco/099999" and page.evaluate(loaded) == 2
    # a search scans the chunks and still renders one page
    search(page, "number 99998", timeout_ms=120_000)
    assert ids(page) == ["coco/099998"] and page.locator("#cards article.card").count() == 1
    assert page.js_errors == []


def test_grid_page_filters_and_searches_in_chromium(tmp_path, page):
    rows = _rows(tmp_path, broken=SETTINGS[2].setting_id)
    s = write_grids(tmp_path, rows, SETTINGS, tile=128)
    page.goto(s.index.as_uri())
    settle(page)
    visible = "() => [...document.querySelectorAll('section.pair:not(.hidden)')].map(s => s.querySelector('h2 code').textContent)"
    tiles = "() => [...document.querySelectorAll('section.pair:not(.hidden) figure.tile:not(.hidden)')].length"
    assert page.evaluate(visible) == ["div2k/0001", "div2k/0002"] and page.evaluate(tiles) == 2 * 4
    page.select_option("#f-method", "flowedit+tokens")
    settle(page)
    assert page.evaluate(tiles) == 2 * 3  # the source and the two soft-token tiles per pair
    assert page.locator("table.means tr:not(.hidden)[data-method]").count() == 2
    page.fill("#f-q", "bus")
    page.wait_for_function("() => location.hash.includes('q=bus')")
    settle(page)
    assert page.evaluate(visible) == ["div2k/0002"] and "1 of 2 pairs shown" in page.inner_text("#shown")
    pair = page.locator("section.pair:not(.hidden)")
    assert pair.locator("mark.span-src").all_inner_texts() == ["car"] and pair.locator("mark.span-tgt").all_inner_texts() == ["bus"]
    assert "out of memory" in pair.locator("figure.tile:not(.hidden) .err").inner_text()  # the failed edit shows its error
    page.wait_for_function("() => [...document.querySelectorAll('section.pair:not(.hidden) figure:not(.hidden) img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.js_errors == []
    assert screenshot(page, tmp_path, "grids.png").stat().st_size > 5_000
