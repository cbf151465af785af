"""A real headless Chromium for page tests: Debian's ``chromium`` driven by playwright.

Playwright is given the system binary (``executable_path``), so nothing is
downloaded at test time. Tests skip, saying how to install, when chromium
or the ``browser`` extra is missing. Screenshots go to the test's tmp dir
and, when ``SOFTREPA_TEST_ARTIFACTS`` names a folder, are copied there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
ARTIFACTS_ENV = "SOFTREPA_TEST_ARTIFACTS"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium not found on PATH: `make browser` (apt-get install chromium) installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: `make browser` (pip install -e '.[browser]')")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.js_errors = errors
    try:
        yield pg
    finally:
        ctx.close()


def settle(page, timeout_ms: int = 30_000) -> None:
    """Wait until the cards on screen belong to the current URL hash and all matches are counted."""
    page.wait_for_function("() => document.body.dataset.ready === '1' && document.body.dataset.shown === location.hash.replace(/^#/, '')", timeout=timeout_ms)


def screenshot(page, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=full_page)
    dest = os.environ.get(ARTIFACTS_ENV)
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(dest) / name)
    return path
