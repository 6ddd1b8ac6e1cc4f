"""Is the review page usable at 2,000 cells? Size, load time and keypress latency in headless Chromium.

The cells are a generated smear's, repeated to the count asked for (each with its own id), so the page
carries as many inlined JPEG views as a real slide of that size. Measured with Selenium driving the
system's Chromium: the file's size, the time until every cell's figure is on the page, and the time
one reclassifying keypress takes to update the groups and the differential (mean of 20).

    python benchmarks/bench_review_page.py --cells 2000 --write
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.select import create_backend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.reports.review import render_review
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer, score_slide
    from cytoedge.runtime.sources import open_source
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear, write_smear_files

    bundle = ModelBundle.load(default_bundle_path())
    backend = create_backend(bundle, "auto", threads=2)
    smear = generate_smear(bundle, backend, SmearSpec(n_white=40, ddim_steps=20, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        png = write_smear_files(smear, tmp)[0]
        scorer = SlideScorer(bundle, backend, "fast", ScoringOptions(um_per_px=smear.um_per_px))
        entry = score_slide(scorer, open_source(png, smear.um_per_px))
        base = entry["cells"]
        views, overlays = scorer.pictures.views, scorer.pictures.overlays
        cells, big_views, big_overlays = [], {}, {}
        for k in range(args.cells):
            c = base[k % len(base)]
            cells.append({**c, "id": k})
            big_views[k] = views[c["id"]]
            if c["id"] in overlays:
                big_overlays[k] = overlays[c["id"]]
        page = tmp / "review.html"
        page.write_text(render_review({**entry, "cells": cells}, scorer.audit, big_views, big_overlays))
        size_mb = page.stat().st_size / 1e6

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                     f"--user-data-dir={tmp / 'profile'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            t0 = time.perf_counter()
            driver.get(page.as_uri())
            n = driver.execute_script("return document.querySelectorAll('figure').length")
            load_s = time.perf_counter() - t0
            loaded = driver.execute_script("return [...document.querySelectorAll('img:not(.ov)')]"
                                           ".filter(i => i.src && i.src.startsWith('data:')).length")
            key_ms = driver.execute_script("""
                const t0 = performance.now();
                for (let i = 0; i < 20; i++) document.dispatchEvent(new KeyboardEvent('keydown', {key: String(1 + i % 7)}));
                return (performance.now() - t0) / 20;""")
        finally:
            driver.quit()
    body = (f"| cells | file size | load until every figure is on the page | images decoded after load | "
            f"one reclassifying keypress |\n|---|---|---|---|---|\n"
            f"| {n} | {size_mb:.1f} MB | {load_s:.2f} s | {loaded} (lazy: only those in view) | {key_ms:.0f} ms |")
    print(body)
    if args.write:
        write_section("review-page", "Review page at scale (headless Chromium)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
