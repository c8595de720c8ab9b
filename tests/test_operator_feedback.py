"""The operator page's feedback buttons in a real browser (Debian's chromium + chromedriver).

A real uvicorn server with feedback enabled; the artifact's product thresholds are set so that
every `disc` answer is anomalous and no `plate` answer is, so each button is reachable. What a
click did is read back from the feedback database (stdlib sqlite3) and from the page.
"""
from __future__ import annotations

import shutil
import sqlite3

import pytest

from browser_util import skip_without_browser
from loop_util import png
from service.runtime.artifact import load_manifest, write_manifest
from service.server.app import create_app
from service.server.local_server import serve_in_thread
from service.server.settings import Settings

skip_without_browser()
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

API_KEY = "operator-feedback-key"


@pytest.fixture(scope="module")
def artifact(demo_artifact, tmp_path_factory):
    """disc: always anomalous (threshold 0), plate: never (threshold 1)."""
    folder = shutil.copytree(demo_artifact, tmp_path_factory.mktemp("ui-fb") / "demo")
    m = load_manifest(folder, verify=False)
    m.products["disc"] = m.products["disc"].model_copy(update={"image_threshold": 0.0})
    m.products["plate"] = m.products["plate"].model_copy(update={"image_threshold": 1.0})
    write_manifest(folder, type(m).model_validate(m.model_dump()))
    return folder


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return tmp_path_factory.mktemp("ui-fb-db") / "feedback.sqlite3"


@pytest.fixture(scope="module")
def server(artifact, db, tmp_path_factory):
    settings = Settings(artifact=artifact, api_keys=API_KEY, feedback_db=str(db),
                        samples_dir=tmp_path_factory.mktemp("ui-fb-samples"))
    with serve_in_thread(create_app(settings, configure_logs=False)) as base:
        yield base


def state(driver, element_id: str | None = None) -> str:
    el = driver.find_element(By.ID, element_id) if element_id else driver.find_element(By.TAG_NAME, "body")
    return el.get_attribute("data-state")


def inspect(driver, path, product: str) -> str:
    """Select the product, upload the file; the request id the page shows the answer for."""
    Select(driver.find_element(By.ID, "product")).select_by_value(product)
    driver.execute_script("document.body.dataset.state = 'test-pending'")
    driver.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(driver, 30).until(lambda d: state(d) in ("done", "error"))
    assert state(driver) == "done", driver.find_element(By.ID, "error").text
    return driver.find_element(By.ID, "result").get_attribute("data-request-id")


def click(driver, button_id: str) -> str:
    driver.find_element(By.ID, button_id).click()
    WebDriverWait(driver, 15).until(lambda d: state(d, "feedback") in ("sent", "error"))
    return driver.find_element(By.ID, "fb-status").text


def row(db, request_id: str) -> tuple:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT verdict, label, defect_type, product FROM feedback WHERE request_id = ?",
                            (request_id,)).fetchone()


def test_the_three_feedback_buttons(server, browser, db, tmp_path):
    browser.get(server + "/ui")
    browser.execute_script("sessionStorage.setItem('dapo.apiKey', arguments[0])", API_KEY)
    browser.refresh()
    WebDriverWait(browser, 15).until(lambda d: d.find_element(By.ID, "product").get_attribute("data-loaded") == "true")
    images = []
    for i in range(4):
        images.append(tmp_path / f"part{i}.png")
        images[-1].write_bytes(png(90 + i, 96, 72))

    # 1. Correct, on an anomalous answer: the model's top type becomes the label
    rid = inspect(browser, images[0], "disc")
    assert browser.find_element(By.ID, "verdict").get_attribute("data-anomalous") == "true"
    top = browser.find_element(By.CSS_SELECTOR, "#defects tbody tr").get_attribute("data-name")
    text = click(browser, "fb-correct")
    assert row(db, rid) == ("correct", top, None, "disc") and f"recorded: {top}" in text
    assert all(not browser.find_element(By.ID, b).is_enabled() for b in ("fb-correct", "fb-wrong", "fb-type"))

    # 2. Wrong type: the type picked in the select (another of disc's types)
    rid = inspect(browser, images[1], "disc")
    assert state(browser, "feedback") == "" and browser.find_element(By.ID, "fb-type").is_displayed()
    options = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "fb-defect")).options]
    assert options == ["scratch", "hole", "crack"]  # the product's types, from /v1/model
    Select(browser.find_element(By.ID, "fb-defect")).select_by_value("crack")
    top = browser.find_element(By.CSS_SELECTOR, "#defects tbody tr").get_attribute("data-name")
    if top == "crack":
        Select(browser.find_element(By.ID, "fb-defect")).select_by_value("hole")
    picked = Select(browser.find_element(By.ID, "fb-defect")).first_selected_option.get_attribute("value")
    click(browser, "fb-type")
    assert row(db, rid) == ("wrong_type", picked, picked, "disc")

    # 3a. Wrong call on an anomalous answer: a false positive, the part is good
    rid = inspect(browser, images[2], "disc")
    assert browser.find_element(By.ID, "fb-wrong").text == "Wrong call: part is good"
    click(browser, "fb-wrong")
    assert row(db, rid) == ("false_positive", "good", None, "disc")

    # 3b. Wrong call on an OK answer: a missed defect of the selected type; no "wrong type" here
    rid = inspect(browser, images[3], "plate")
    assert browser.find_element(By.ID, "verdict").get_attribute("data-anomalous") == "false"
    assert not browser.find_element(By.ID, "fb-type").is_displayed()
    assert browser.find_element(By.ID, "fb-wrong").text == "Wrong call: part is defective"
    Select(browser.find_element(By.ID, "fb-defect")).select_by_value("contamination")
    text = click(browser, "fb-wrong")
    assert row(db, rid) == ("false_negative", "contamination", "contamination", "plate")
    assert "labelled sample" in text
