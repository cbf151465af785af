"""Remake docs/report.png and docs/grids.png with the project's own commands (no network, CPU, ~1 minute).

    python docs/screenshots.py            # needs chromium and the browser extra (make browser)

A sample run of drawn images, hand-written captions and rewrites judged by
the rule checker (tests/report_factory.py), then `dataprep report`, then
`softrepa evaluate-edit` on a tiny random SD3 (so the edited tiles are
noise: the layout is the point), each page opened in headless Chromium with
a filter applied and captured. Each PNG is quantised to stay < 300 KB.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def shoot(url: str, dest: Path, actions) -> None:
    from playwright.sync_api import sync_playwright

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: make browser")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = b.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url)
        actions(page)
        page.wait_for_timeout(300)
        page.screenshot(path=str(dest))
        b.close()
    with Image.open(dest) as im:
        im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
    print(f"{dest}: {dest.stat().st_size // 1024} KB")


def main() -> None:
    from tests.report_factory import make_run

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = make_run(tmp / "run", judge=True, dedup=True)
        subprocess.run([bindir / "dataprep", "report", str(run), "--page-size", "6"], check=True, env=env)
        subprocess.run([bindir / "softrepa", "tiny-models", str(tmp / "models")], check=True, env=env, stdout=subprocess.DEVNULL)
        tokens = tmp / "tokens"  # freshly initialised soft tokens (what `softrepa train` starts from)
        import json
        from types import SimpleNamespace

        import torch

        from softrepa.tokens import SoftTokens, TokenConfig, save_tokens

        torch.manual_seed(0)
        cfg = json.loads((tmp / "models" / "sd3" / "transformer" / "config.json").read_text())
        save_tokens(SoftTokens(TokenConfig.preset("sd3", SimpleNamespace(**cfg))), tokens)
        subprocess.run([bindir / "softrepa", "evaluate-edit", "--pairs", str(run), "--model", str(tmp / "models" / "sd3"), "--tokens", str(tokens),
                        "--out", str(tmp / "eval"), "--steps", "6", "--n-max", "4", "--tgt-cfg", "9,13", "--size", "64", "--device", "cpu",
                        "--tiny-metrics", "--metrics", "clip,lpips"], check=True, env=env, stdout=subprocess.DEVNULL)

        def report_view(page):
            page.wait_for_function("() => document.body.dataset.ready === '1'")
            page.select_option("#f-status", "failed")
            page.wait_for_function("() => document.body.dataset.ready === '1' && document.body.dataset.shown === location.hash.slice(1)")

        def grid_view(page):
            page.wait_for_function("() => document.body.dataset.ready === '1'")
            page.wait_for_function("() => [...document.querySelectorAll('img')].slice(0, 10).every(i => i.complete)")

        shoot((run / "report" / "index.html").as_uri(), REPO / "docs" / "report.png", report_view)
        shoot((tmp / "eval" / "grids" / "index.html").as_uri(), REPO / "docs" / "grids.png", grid_view)


if __name__ == "__main__":
    main()
