"""Headless Chromium for the operator-page tests: Debian's chromium + chromedriver, driven by
selenium. The driver is given explicitly, so Selenium Manager never runs (no browser is ever
downloaded); a machine without them skips those tests, saying what to install."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,1400")


def skip_without_browser() -> None:
    """Skip the calling test module unless chromium, chromedriver and selenium are all there."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)",
                    allow_module_level=True)
    pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")


def headless_chrome(profile: Path):
    """A started headless Chrome with its own profile folder (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver
