"""The operator page in a real browser: Debian's chromium + chromedriver driven by selenium,
against a real uvicorn server on 127.0.0.1 serving the demo artifact.

What is asserted is what the operator sees: the overlay image decoded at the uploaded image's
size, the defect and region tables equal to what the API answers for the same image, the
region boxes drawn on the canvas, the verdict, the error box for API errors (401 without the
key, 415 for a file that is not an image), and a non-blank screenshot.

Needs `apt-get install -y chromium chromium-driver` and `pip install selenium`; skipped (with
the reason) only when one of them is absent. No browser is ever downloaded: the driver is
given explicitly, so Selenium Manager never runs.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from browser_util import skip_without_browser
from service.server.app import create_app
from service.server.local_server import serve_in_thread
from service.server.settings import Settings

skip_without_browser()
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

API_KEY = "operator-page-test-key"
W, H = 160, 120
PRODUCT = "disc"
QUERY = "overlay=true&heatmap=true&mask_format=png"


def part_image(w: int = W, h: int = H) -> bytes:
    """A gradient with a noisy patch (the random demo model reacts to texture)."""
    rng = np.random.default_rng(3)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    img[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    img[h // 4: h // 2, w // 3: 2 * w // 3] = rng.integers(0, 255, (h // 2 - h // 4, 2 * w // 3 - w // 3, 3))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


# --- a real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(demo_artifact):
    settings = Settings(artifact=demo_artifact, api_keys=API_KEY, max_queue_delay_ms=1.0)
    with serve_in_thread(create_app(settings, configure_logs=False)) as base:
        yield base


# --- helpers ---------------------------------------------------------------------------------
def open_page(driver, base: str, key: str | None) -> None:
    driver.get(base + "/ui")
    if key is None:
        driver.execute_script("sessionStorage.clear()")
    else:
        driver.execute_script("sessionStorage.setItem('dapo.apiKey', arguments[0])", key)
    driver.refresh()
    WebDriverWait(driver, 15).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                    in ("idle", "error"))


def upload(driver, path: Path) -> str:
    """Send a file through the file input; the final page state (done or error)."""
    driver.execute_script("document.body.dataset.state = 'test-pending'")
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                    in ("done", "error"))
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def error_text(driver) -> str:
    box = driver.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def column(driver, table_id: str, index: int) -> list[str]:
    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
    return [r.find_elements(By.TAG_NAME, "td")[index].text for r in rows]


# --- tests -----------------------------------------------------------------------------------
def test_page_shows_what_the_api_answers(server, browser, tmp_path):
    data = part_image()
    image = tmp_path / "part.png"
    image.write_bytes(data)
    api = httpx.post(f"{server}/detect?{QUERY}", headers={"X-API-Key": API_KEY}, timeout=30,
                     files={"image": ("part.png", data, "image/png")}, data={"product": PRODUCT})
    assert api.status_code == 200, api.text
    expected = api.json()["results"][0]

    open_page(browser, server, API_KEY)
    assert error_text(browser) == ""
    products = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "product")).options]
    assert products[0] == "" and PRODUCT in products  # "any" first, then the artifact's products
    Select(browser.find_element(By.ID, "product")).select_by_value(PRODUCT)
    state = upload(browser, image)
    assert state == "done", error_text(browser)

    # the overlay decoded, at the uploaded image's own size
    natural = browser.execute_script(
        "const i = document.getElementById('overlay'); return [i.complete, i.naturalWidth, i.naturalHeight];")
    assert natural == [True, W, H]

    # the tables are the API's answer for the same image (the model is deterministic)
    assert column(browser, "defects", 0) == [d["name"] for d in expected["defect_types"]]
    assert column(browser, "defects", 1) == [f"{d['score']:.3f}" for d in expected["defect_types"]]
    assert len(column(browser, "regions", 0)) == len(expected["regions"])
    assert column(browser, "regions", 1) == [g["defect_type"] for g in expected["regions"]]
    assert column(browser, "regions", 2) == ["[" + ", ".join(map(str, g["bbox"])) + "]" for g in expected["regions"]]

    # the verdict: anomalous or not, score vs threshold
    verdict = browser.find_element(By.ID, "verdict")
    assert verdict.get_attribute("data-anomalous") == str(expected["is_anomalous"]).lower()
    word, relation = ("ANOMALOUS", "≥") if expected["is_anomalous"] else ("OK", "<")
    assert verdict.text == (f"{word} — score {expected['anomaly_score']:.3f} {relation} "
                            f"threshold {expected['threshold']:.3f}")
    assert expected["threshold"] == 0.5  # the disc product's threshold, so the product was sent

    # the boxes: the canvas covers the overlay (same aspect), one box per region, ink at each
    # box's top-left corner (image coordinates scaled to the canvas)
    canvas = browser.execute_script("""
        const c = document.getElementById('boxes');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let inked = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked++;
        return [c.width, c.height, Number(c.dataset.imageWidth), Number(c.dataset.imageHeight),
                Number(c.dataset.boxes), inked];""")
    cw, ch, iw, ih, boxes, inked = canvas
    assert (iw, ih) == (W, H) and abs(cw / ch - W / H) < 0.02 and cw >= W
    assert boxes == len(expected["regions"])
    assert (inked > 0) == (len(expected["regions"]) > 0)
    for x, y, _, _ in (g["bbox"] for g in expected["regions"][:3]):
        alpha = browser.execute_script(
            "const c = document.getElementById('boxes');"
            "return c.getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data[3];",
            int(x * cw / W) + 1, int(y * ch / H) + 1)
        assert alpha > 0

    # a screenshot of the page: a real PNG, not blank
    shot = tmp_path / "operator-page.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50 and pixels.std() > 10
    if os.environ.get("DAPO_UI_SCREENSHOT"):  # keep it for a human to look at
        shutil.copy(shot, os.environ["DAPO_UI_SCREENSHOT"])


def test_page_shows_api_errors(server, browser, tmp_path):
    # no key: /v1/model answers 401, shown in the error box
    open_page(browser, server, None)
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error"
    text = error_text(browser)
    assert "401 unauthorized" in text and "X-API-Key" in text

    # the key typed in the field is used (and kept in sessionStorage)
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "save-key").click()
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "product").get_attribute("data-loaded") == "true")
    assert error_text(browser) == ""
    assert browser.execute_script("return sessionStorage.getItem('dapo.apiKey')") == API_KEY

    # a file that is not an image: the API's 415, with its code and the file named
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is not a picture")
    assert upload(browser, bad) == "error"
    text = error_text(browser)
    assert text.startswith("415 unsupported_media_type") and "not-an-image.png" in text
    assert "request id:" in text
    assert not browser.find_element(By.ID, "result").is_displayed()
