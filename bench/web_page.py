"""The web page's figures, measured in headless Chromium (Debian's `chromium`, Playwright):
page load time of `/` (the load event, and the moment the first view has its data), and the
time from clicking "Generate" to the first image shown, on the tiny models.

    .venv/bin/python bench/web_page.py                   # against a running cluster (make run)
    flock /tmp/port8000.lock .venv/bin/python bench/web_page.py --start   # starts its own
    options: --url http://127.0.0.1:8000 --loads 10 --runs 5 --model tiny-sd15 --size 64 --steps 4

Each load and each generation runs in a fresh browser context (empty cache and localStorage).
The click-to-image time is the page's own (performance.now() from the click to the image's
load event), so it includes the page's polling (once a second) as a user sees it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve")]

from test_web_page import generate_in_page, launch_browser, watched  # noqa: E402


def summary(values: list[int]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(url: str, loads: int, runs: int, model: str, size: int, steps: int) -> dict:
    from playwright.sync_api import sync_playwright

    load, ready, first_image = [], [], []
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        try:
            for _ in range(loads):
                with watched(browser, url) as page:
                    figures = page.open("/")
                    load.append(figures["load_ms"])
                    ready.append(figures["ready_ms"])
                    assert not page.problems, page.problems
            for i in range(runs):
                with watched(browser, url) as page:
                    page.open("/")
                    shown = generate_in_page(page, f"a lighthouse on a cliff, take {i}", model=model,
                                             size=size, steps=steps, seed=str(1000 + i))
                    first_image.append(shown["first_image_ms"])
                    assert not page.problems, page.problems
        finally:
            browser.close()
    return {"page_load_ms": summary(load), "page_ready_ms": summary(ready),
            "click_to_first_image_ms": summary(first_image),
            "image": {"model": model, "size": size, "steps": steps}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--start", action="store_true",
                    help="start the embedded cluster (configs/local.yaml, port 8000) for the run")
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    if args.start:
        from serve_harness import running_cluster

        cluster = running_cluster(Path(tempfile.mkdtemp(prefix="web-bench-")))
        args.url = "http://127.0.0.1:8000"
    else:
        cluster = nullcontext()
    with cluster:
        figures = measure(args.url, args.loads, args.runs, args.model, args.size, args.steps)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
