"""A real headless Chromium for the console's tests, driven by Selenium.

Debian's `chromium` and `chromium-driver` (the same version, so no driver download: the
paths are given, which keeps Selenium Manager from looking anything up).  Screenshots go
to ARTIFACTS (`artifacts/console/` beside the project, or $GTUN_ARTIFACTS), kept after
the run for people to look at.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("GTUN_ARTIFACTS", ROOT / "artifacts")) / "console"
WAIT = 15.0  # seconds a page may take to show what a step waits for


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.path.exists(path):
            return f"needs {path} (apt install {package}; scripts/setup does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[dev]')"
    return None


class Browser:
    """One headless Chromium at `base` (the console's URL), quit by close()."""

    def __init__(self, base: str, *, width: int = 1400, height: int = 1000) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        os.environ.setdefault("SE_AVOID_STATS", "true")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # as root, Chromium refuses its sandbox
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--metrics-recording-only",
            f"--window-size={width},{height}",
        ):
            options.add_argument(arg)
        self.base = base.rstrip("/")
        self.log = ARTIFACTS / "chromedriver.log"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        service = Service(executable_path=CHROMEDRIVER, log_output=str(self.log))
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.set_page_load_timeout(WAIT)

    def close(self) -> None:
        self.driver.quit()

    # --- pages -------------------------------------------------------------------------

    def goto(self, path: str, *, ready: bool = True) -> None:
        """Open `path`; with `ready`, wait for the page's first data (body data-ready)."""
        self.driver.get(self.base + path)
        if ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        self.wait(
            lambda: self.js("return document.body && document.body.dataset.ready === '1'"),
            f"{self.driver.current_url} to load its data",
        )

    def path(self) -> str:
        url: str = self.driver.current_url
        return url.removeprefix(self.base) or "/"

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str) -> str:
        return str(self.find(css).text)

    def click(self, css: str) -> None:
        self.find(css).click()

    def fill(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def accept_confirm(self) -> None:
        """Accept the page's confirm() dialog, once it shows."""
        self.wait(self._alert, "a confirmation dialog")
        self.driver.switch_to.alert.accept()

    def _alert(self) -> bool:
        from selenium.common.exceptions import NoAlertPresentException

        try:
            self.driver.switch_to.alert  # noqa: B018
        except NoAlertPresentException:
            return False
        return True

    def wait(self, cond: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        """Poll `cond` until it is true (returned); AssertionError naming `what`, with the
        page's URL, after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = cond()
            except Exception as exc:  # a stale element while the page redraws
                value, last = None, exc
            else:
                last = None
            if value:
                return value
            if time.monotonic() > deadline:
                shot = self.screenshot(f"timeout-{int(time.time())}")
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what} "
                    f"(at {self.driver.current_url}; screenshot {shot}; last error {last!r})"
                )
            time.sleep(0.2)

    def cookies(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.driver.get_cookies()}

    def screenshot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def clear_artifacts() -> None:
    """Start a run's screenshots afresh."""
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
