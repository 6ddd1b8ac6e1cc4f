"""The review page in a real browser (headless Chromium driven by Selenium), on the demo smear as a
user makes it: every cell shown as scanned, grouped by class; five cells reclassified and two
confirmed with the keyboard; the live differential and its Rümke intervals; the exported
corrections; a screenshot."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="Chromium and chromedriver are not installed "
    "(apt-get install -y chromium chromium-driver; .ci/run installs them)")
CLI = [sys.executable, "-m", "cytoedge.runtime.cli"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    subprocess.run(CLI + ["demo", "--out", str(out), "-n", "24", "--steps", "10", "--quiet", "--threads", "1"],
                   check=True, capture_output=True, text=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


def _entry(demo: Path) -> dict:
    return json.loads((demo / "results.json").read_text())["slides"][0]


def _figures(driver) -> dict[int, dict]:
    """Each cell figure on the page: its group (section) and its image's natural size once loaded."""
    return {int(f["id"]): f for f in driver.execute_script("""
        return [...document.querySelectorAll('figure')].map(f => ({id: f.dataset.id,
          group: f.closest('section').id.replace('class-', ''), status: f.className.replace(' sel', '')}));""")}


def test_review_page_shows_every_cell_as_scanned_grouped_by_class(demo, browser):
    entry = _entry(demo)
    page = demo / "000_smear_png" / "review.html"
    assert "review.html" in (demo / "000_smear_png" / "report.html").read_text()  # the report links to it
    browser.get(page.as_uri())
    figures = _figures(browser)
    cells = {c["id"]: c for c in entry["cells"]}
    assert set(figures) == set(cells)
    assert all(figures[i]["group"] == cells[i]["class"] for i in cells)
    # Within a group, flagged cells come first.
    for group in {c["class"] for c in cells.values()}:
        ids = [i for i in browser.execute_script(
            f"return [...document.querySelectorAll('#class-{group} figure')].map(f => +f.dataset.id)")]
        flagged = [any(cells[i]["flags"].get(k) for k in ("abnormal", "anomalous", "uncertain")) for i in ids]
        assert flagged == sorted(flagged, reverse=True)
    # Scroll through the page so that every lazy image loads, then check its pixels are the source's.
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    deadline = time.time() + 20
    sizes = []
    while time.time() < deadline:
        for f in browser.find_elements("css selector", "figure"):
            browser.execute_script("arguments[0].scrollIntoView()", f)
        sizes = browser.execute_script("""return [...document.querySelectorAll('figure .pic img:not(.ov)')]
            .map(i => [i.complete ? i.naturalWidth : 0, i.naturalHeight])""")
        if all(w > 0 for w, _ in sizes):
            break
        time.sleep(0.2)
    um = entry["summary"]["scale"]["um_per_px"]
    fov_px = round(32 * 0.6 / um)  # the model's field of view (32 px at 0.6 µm/px) in source pixels
    assert len(sizes) == len(cells) and all(w == h == fov_px for w, h in sizes)


def test_keyboard_review_updates_the_differential_and_exports_corrections(demo, browser):
    from selenium.webdriver.common.keys import Keys

    entry = _entry(demo)
    browser.get((demo / "000_smear_png" / "review.html").as_uri())
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    classes = list(entry["summary"]["by_class"])
    cells = entry["cells"]
    body = browser.find_element("css selector", "body")
    changed = {}
    for k, c in enumerate(cells[:5]):  # five cells to another class: four by their number key, one by click
        target = next(k for k in ("lymphocyte", "monocyte", "neutrophil") if k != c["class"])
        browser.find_element("css selector", f'figure[data-id="{c["id"]}"]').click()
        if k < 4:
            body.send_keys(str(classes.index(target) + 1))
        else:
            browser.find_element("css selector", f'#detail button[data-class="{target}"]').click()
        changed[c["id"]] = target
    browser.find_element("css selector", f'figure[data-id="{cells[5]["id"]}"]').click()
    body.send_keys(Keys.ENTER)  # confirmed by key
    browser.find_element("css selector", f'figure[data-id="{cells[6]["id"]}"]').click()
    browser.find_element("css selector", "#detail button[data-confirm]").click()  # and by click
    figures = _figures(browser)
    assert all(figures[i]["group"] == k and figures[i]["status"] == "reclassified" for i, k in changed.items())
    assert all(figures[c["id"]]["status"] == "confirmed" for c in cells[5:7])
    assert "reviewed 7 of" in browser.find_element("id", "progress").text
    # The live differential counts the reader's classes, with the exact binomial (Rümke) interval.
    reviewed = {k: 0 for k in classes}
    for c in cells:
        reviewed[changed.get(c["id"], c["class"])] += 1
    rows = browser.execute_script("""return Object.fromEntries([...document.querySelectorAll('#diff tr[data-class]')]
        .map(r => [r.dataset.class, [+r.querySelector('.n').textContent, r.querySelector('.ci').textContent]]))""")
    assert {k: v[0] for k, v in rows.items()} == reviewed
    n = sum(v for k, v in reviewed.items() if k in entry["summary"]["differential"])
    x = reviewed["neutrophil"]
    lo, hi = (stats.beta.ppf(0.025, x, n - x + 1) if x else 0.0), (stats.beta.ppf(0.975, x + 1, n - x) if x < n else 1.0)
    assert rows["neutrophil"][1] == f"{100 * lo:.1f}–{100 * hi:.1f}"
    js_lo, js_hi = browser.execute_script("return window.cytoedgeReview.rumke(5, 100)")
    assert abs(js_lo - stats.beta.ppf(0.025, 5, 96)) < 1e-6 and abs(js_hi - stats.beta.ppf(0.975, 6, 95)) < 1e-6
    # Heatmaps toggle with H (flagged cells carry one).
    with_overlay = browser.find_elements("css selector", "main img.ov")
    body.send_keys("h")
    assert with_overlay and with_overlay[0].value_of_css_property("display") == "block"  # flagged cells have one
    browser.find_element("id", "reviewer").send_keys("A. Reader")
    browser.find_element("id", "export").click()
    deadline = time.time() + 20
    while time.time() < deadline and not list(browser.downloads.glob("review_*.json")):
        time.sleep(0.2)
    export = json.loads(next(browser.downloads.glob("review_*.json")).read_text())
    assert export["format"] == "cytoedge-review" and export["format_version"] == 1
    assert export["bundle_sha256"] == entry["audit"]["bundle_sha256"] and export["source"] == entry["source"]
    assert export["source_sha256"] == entry["source_sha256"] and export["reviewer"] == "A. Reader"
    assert export["um_per_px"] == entry["summary"]["scale"]["um_per_px"]
    by_id = {c["id"]: c for c in export["cells"]}
    assert {i: (by_id[i]["label"], by_id[i]["status"]) for i in changed} == {i: (k, "reclassified")
                                                                             for i, k in changed.items()}
    assert all(by_id[c["id"]]["status"] == "confirmed" and by_id[c["id"]]["label"] == c["class"] for c in cells[5:7])
    assert sum(c["status"] == "unreviewed" for c in export["cells"]) == len(cells) - 7
    browser.save_screenshot(str(demo / "review_screenshot.png"))
    # The export is the reader's labels for the silent-mode pilot.
    exported = next(browser.downloads.glob("review_*.json"))
    run = subprocess.run(CLI + ["compare", str(demo / "results.json"), "--labels", str(exported), "--json",
                                "--out", str(demo / "pilot")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    reader = [changed.get(c["id"], c["class"]) for c in cells[:7]]
    model = [c["class"] for c in cells[:7]]
    p_o = sum(a == b for a, b in zip(reader, model)) / 7
    p_e = sum(reader.count(k) * model.count(k) for k in classes) / 49
    assert report["matching"]["matched"] == 7 and p_o == pytest.approx(2 / 7)
    assert report["agreement"]["accuracy"] == pytest.approx(p_o)
    assert report["agreement"]["kappa"]["value"] == pytest.approx((p_o - p_e) / (1 - p_e))
    slide = report["slides"][0]
    neutro = slide["classes"]["neutrophil"]
    assert neutro["difference_pp"] == pytest.approx(neutro["model_percent"] - neutro["reader_percent"])
    assert (demo / "pilot" / "disagreements.html").exists()


def _reload_until(driver, cell_id: str, status: str, seconds: float = 10) -> str:
    """Reload the page until `cell_id` shows `status` or `seconds` pass; return the status last shown.

    Chromium hands a page's localStorage write to the browser process asynchronously, and a reload at once can
    read the store before the write lands (3 runs in 80 here). A person reloads later: the test reloads again."""
    deadline = time.time() + seconds
    while True:
        driver.refresh()
        shown = _figures(driver)[cell_id]["status"]
        if shown == status or time.time() > deadline:
            return shown
        time.sleep(0.25)


def test_saved_progress_returns_to_its_own_page_only(demo, browser, tmp_path):
    """Progress is kept in the browser's storage, which every file:// page shares: a reload gets it back; a
    page of the same slide name with other calls does not, and what comes back always validates."""
    from selenium.webdriver.common.keys import Keys

    from cytoedge.runtime.reports.review import render_review
    from cytoedge.runtime.review_export import validate

    entry = _entry(demo)
    audit = json.loads((demo / "results.json").read_text())["slides"][0]["audit"]
    names = list(entry["summary"]["by_class"])
    other = {**entry, "cells": [{**c, "class": names[(names.index(c["class"]) + 1) % len(names)]}
                                for c in entry["cells"]]}
    first, second = tmp_path / "a" / "review.html", tmp_path / "b" / "review.html"
    for path, e in ((first, entry), (second, other)):
        path.parent.mkdir()
        path.write_text(render_review(e, audit, {}, {}, {"created": "2026-12-02T00:00:00Z", "options": {}}))
    browser.get(first.as_uri())
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    first_id = entry["cells"][0]["id"]
    browser.find_element("css selector", f'figure[data-id="{first_id}"]').click()
    browser.find_element("css selector", "body").send_keys(Keys.ENTER)
    assert _figures(browser)[first_id]["status"] == "confirmed"
    assert _reload_until(browser, first_id, "confirmed") == "confirmed"  # back after a reload
    browser.get(second.as_uri())
    assert _figures(browser)[first_id]["status"] == "unreviewed"  # not on the other page
    validate(browser.execute_script("return window.cytoedgeReview.exportDocument()"), "second page")
