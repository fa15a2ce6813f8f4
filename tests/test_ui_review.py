"""The morning review in the real MLflow UI, in headless Chromium: the link a search prints opens the
runs table's saved view of its front, the front's runs show their figures as columns, and the parent
run holds the front table and the Pareto plot. Skipped, with the reason, where Chromium or Selenium is missing."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "mlflow-review.png"


def _selenium():
    try:
        from selenium import webdriver  # noqa: F401
    except ImportError:
        return None
    return True


if not (CHROMIUM and DRIVER and _selenium()):
    pytest.skip("needs Chromium, chromedriver (Debian: chromium chromium-driver) and selenium", allow_module_level=True)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1800,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def _wait_for(browser, pattern: str, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = browser.find_element("tag name", "body").text
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} never appeared; the page shows: {text[:1500]}")


def test_the_printed_links_open_the_front_in_the_mlflow_ui(finished_search, tmp_path):
    results = finished_search.results  # a real search's store and what it printed (tests/conftest.py)
    port = free_port()
    front_link = re.search(r"front:\s+(\S+)", finished_search.stdout).group(1).replace("127.0.0.1:5000",
                                                                                     f"127.0.0.1:{port}")
    ui = subprocess.Popen([sys.executable, "-m", "slimtune", "ui", "--port", str(port), "--results-dir", str(results)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    browser = None
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        browser = _browser()
        browser.get(front_link)
        table = _wait_for(browser, r"\[front\] \| accuracy \d\.\d{4} \| [\d.]+ ms \| [\d.]+ MB")
        front = list(csv.DictReader((results / finished_search.name / "pareto.csv").open()))
        shown = re.findall(r"(trial-\d{3}) \[front\] \| accuracy", table)
        assert sorted(shown) == sorted(r["trial"] for r in front)  # every front run, and only those
        assert f"{len(front)} matching run" in table
        # the saved view's columns: the figures themselves, not only in the (cut) run names
        headers = " ".join(h.text for h in browser.find_elements("css selector", "[role=columnheader]"))
        assert {"accuracy", "latency_ms", "size_mb"} <= set(headers.split()), headers
        assert f"{float(front[0]['latency_ms']):.2f}" in table or f"{float(front[0]['latency_ms']):.1f}" in table
        browser.save_screenshot(str(tmp_path / "front.png"))
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "front.png", SCREENSHOT)
        parent = re.search(r"slimtune-front-([0-9a-f]+)", front_link).group(1)
        experiment = re.search(r"experiments/(\d+)/", front_link).group(1)
        browser.get(f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{parent}")
        _wait_for(browser, r"Pareto front: \d+ of \d+ trials")
        browser.get(f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{parent}/artifacts")
        _wait_for(browser, r"pareto\.png")
    finally:
        if browser is not None:
            browser.quit()
        ui.terminate()
        ui.wait(timeout=30)
