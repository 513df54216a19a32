"""Headless Chromium for the tests that check what a person sees: Debian's `chromium` and `chromium-driver`, driven
by Selenium through the system driver (no browser download: Selenium Manager is never asked). `make test` installs
the two packages when they are missing and it runs as root."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

HOW_TO_INSTALL = ("headless Chromium is not installed: `apt-get install chromium chromium-driver` (as root; `make "
                  "test` does it when it can)")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"


def chromium(width: int = 1500, height: int = 900):
    """A headless Chromium WebDriver; skips the test, saying how to install it, when Chromium is missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(HOW_TO_INSTALL)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.binary_location = browser
    return webdriver.Chrome(service=Service(driver), options=options)


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_text(driver, text: str, timeout: float = 60.0) -> str:
    """The page's text once it contains `text` (the MLflow UI renders after its API calls return)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: text in page_text(d))
    return page_text(driver)


def wait_for_element(driver, css: str, timeout: float = 60.0):
    """The first element matching the CSS selector once it is rendered: the runs table fills in its rows after the
    page already shows its header and run count, so a lookup right after `wait_for_text` can race the grid."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def screenshot(driver, name: str) -> Path:
    """Save what the browser shows to docs/images/<name>.png (the README shows these)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
