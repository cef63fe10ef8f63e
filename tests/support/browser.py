"""Headless Chromium for browser tests: Debian's `chromium` and `chromium-driver`, driven by
Selenium. The driver path is given, so Selenium Manager never runs and nothing is downloaded;
a missing browser fails the test with the install step to take (`make test` installs both).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
"""Screenshots of browser journeys land here (ignored by git)."""


def chromium(*, width: int = 1280, height: int = 900) -> webdriver.Chrome:
    """A headless Chromium with its console log kept (CSP violations show up there)."""
    binary = shutil.which("chromium") or CHROMIUM
    driver = shutil.which("chromedriver") or CHROMEDRIVER
    found = {"chromium": binary, "chromedriver": driver}
    missing = [name for name, path in found.items() if not Path(path).is_file()]
    assert not missing, (
        f"{' and '.join(missing)} not installed: apt-get install chromium chromium-driver "
        "(make test does this as root on Debian)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """Save the page as a test artifact; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
