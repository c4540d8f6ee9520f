"""Check `msf app` in a real headless browser and save a screenshot (docs/app.png).

Needs Chromium and Playwright's Python driver, neither of which msf itself needs:
    apt-get install chromium && .venv/bin/pip install playwright
    .venv/bin/python scripts/app_screenshot.py MODEL [--out docs/app.png] [--class Flags]

It serves MODEL's page, opens it in Chromium, picks a class, presses Generate, waits for the
four stage images and the timing line, checks they arrived, and writes the screenshot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--out", default="docs/app.png")
    p.add_argument("--class-name", default=None, help="the class to pick (default: the page's first)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    from msf.interfaces.app import serve

    app = serve(args.model, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app.local_url)
            page.get_by_role("button", name="Generate").wait_for()
            if args.class_name:
                page.get_by_label("class").click()
                page.get_by_role("option", name=args.class_name).click()
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("evaluations/image").wait_for(timeout=120_000)
            images = page.locator("img").count()
            page.wait_for_timeout(500)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"{images} images on the page; screenshot: {args.out}")
    return 0 if images >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
