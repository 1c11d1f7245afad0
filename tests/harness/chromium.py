"""Headless Chromium for the browser tests, driven by Selenium (Debian's ``chromium`` and
``chromium-driver`` packages; ``selenium`` from the ``test`` extra).

Selenium Manager is never asked to download anything: the driver and the browser are named
by path, and ``SE_OFFLINE``/``SE_AVOID_STATS`` keep the manager off the network. Without
Chromium a test is skipped with its reason on a developer's machine; under ``.ci/run``
(``TOKENJOURNAL_REQUIRE_BROWSER=1``) it fails instead, so CI cannot go green untested.
Each page the tests visit is saved as a PNG in ``out/screenshots/`` (or
``$TOKENJOURNAL_SCREENSHOTS``) for review; the folder is not committed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REQUIRE_ENV = "TOKENJOURNAL_REQUIRE_BROWSER"
ROOT = Path(__file__).resolve().parents[2]
#: How long one page may take to show what the test waits for.
PAGE_WAIT = 20.0


def screenshot_dir() -> Path:
    """Where the screenshots go (created)."""
    folder = Path(os.environ.get("TOKENJOURNAL_SCREENSHOTS") or ROOT / "out" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _absent(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 says the browser tests must run")
    pytest.skip(f"{reason}; the browser tests are untested here")


class Chromium:
    """One headless Chromium window. Its methods block: call them from a worker thread
    (``asyncio.to_thread``) while the event loop serves the pages."""

    def __init__(self, profile: Path, name: str) -> None:
        missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
        if missing:
            _absent(f"{', '.join(missing)} missing (apt-get install -y chromium chromium-driver)")
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.options import Options
            from selenium.webdriver.chrome.service import Service
        except ImportError:
            _absent("selenium is not installed (pip install -e '.[test]')")
        os.environ.setdefault("SE_OFFLINE", "true")
        os.environ.setdefault("SE_AVOID_STATS", "true")
        options = Options()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",  # no update checks, no telemetry: loopback only
            "--disable-component-update",
            "--disable-sync",
            "--window-size=900,800",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(argument)
        self.driver: Any = webdriver.Chrome(
            service=Service(executable_path=CHROMEDRIVER), options=options
        )
        self.name = name
        self.shots: list[Path] = []

    def close(self) -> None:
        self.driver.quit()

    def shot(self, step: str) -> Path:
        """Save the page as ``<test>-<n>-<step>.png``."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.name}-{len(self.shots) + 1}-{step}")
        path = screenshot_dir() / f"{safe}.png"
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        return path

    def open(self, url: str) -> None:
        self.driver.get(url)

    def fill(self, element_id: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        field = self.driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(text)

    def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def wait_for_text(self, text: str) -> str:
        """Wait until the page's body holds ``text``; returns the body's text."""
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        body = ""

        def shown(driver: Any) -> bool:
            nonlocal body
            # The page may be replaced between finding its body and reading it (a form
            # just posted): that is "not yet", and the wait asks again. Chromium reports it
            # as a stale element, or sometimes as an inspector error about that node.
            try:
                body = str(driver.find_element(By.TAG_NAME, "body").text)
            except WebDriverException as exc:
                if "does not belong to the document" not in str(exc.msg):
                    raise
                return False
            return text in body

        WebDriverWait(
            self.driver, PAGE_WAIT, ignored_exceptions=(StaleElementReferenceException,)
        ).until(shown)
        return body

    @property
    def url(self) -> str:
        return str(self.driver.current_url)
