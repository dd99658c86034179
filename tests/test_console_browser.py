"""The console's pages in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium) against the fake relay of tests/console_fake.py:
the scripts run under the strict CSP, fill the DOM the namespace tests rely on, and
change what they should.  Skipped where Chromium is not installed."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console_fake import fake_relay
from gtun.app.console import auth, start_console, web
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.store import StoredPeer

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None, reason="needs chromium and chromium-driver"
)
PASSWORD = "correct horse battery"


@pytest.fixture
def console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    monkeypatch.setattr(auth, "SCRYPT_N", 2**10)
    monkeypatch.setattr(web, "SAMPLE_INTERVAL", 0.3)
    host = fake_relay(tmp_path)
    auth.write_admin_hash(host.store, auth.hash_password(PASSWORD))
    now = time.time()
    for i, name in enumerate(("alice", "bob", "carol")):
        key = encode_key(public_key(generate_private_key()))
        host.store.add_peer(StoredPeer(name=name, public_key=key))
        if name != "carol":
            host.traffic[name] = {
                "rx_bytes": 1000 * (i + 1),
                "tx_bytes": 10,
                "last_handshake": now - 5,
                "endpoint": f"198.51.100.{i + 1}:51820",
                "transport": "udp",
            }
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: list[asyncio.Event] = []
    address: list[tuple[str, int]] = []

    async def serve() -> None:
        stop.append(asyncio.Event())
        running = await start_console(host)
        address.append(running.address)
        started.set()
        while not stop[0].is_set():
            for t in host.traffic.values():
                t["rx_bytes"] += 50_000
            await asyncio.wait([asyncio.ensure_future(stop[0].wait())], timeout=0.2)
        await running.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{address[0][1]}", host
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()
        host.store.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Any, timeout: float = 15) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        driver, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    ).until(condition)


def ready(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")


def follow(driver: Any, link: str, path: str) -> None:
    """Click nav link `link` and wait for page `path` to have loaded its data."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, link).click()
    wait(driver, lambda d: d.current_url.endswith(path))
    ready(driver)


def test_pages_in_chromium(console: tuple[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    base, host = console
    d = browser
    d.get(f"{base}/")
    assert d.current_url.endswith("/login")
    d.find_element(By.ID, "password").send_keys("not the password")
    d.find_element(By.ID, "login").click()
    wait(d, lambda d: d.find_element(By.ID, "login-error").text == "wrong password")
    d.find_element(By.ID, "password").clear()
    d.find_element(By.ID, "password").send_keys(PASSWORD)
    d.find_element(By.ID, "login").click()
    wait(d, lambda d: not d.current_url.endswith("/login"))
    ready(d)

    rows = {r.get_attribute("data-name"): r for r in d.find_elements(By.CSS_SELECTOR, "tr.peer")}
    assert set(rows) == {"alice", "bob", "carol", "cfg0"}
    state = {n: r.find_element(By.CSS_SELECTOR, "td.state").text for n, r in rows.items()}
    assert state == {"alice": "online", "bob": "online", "carol": "offline", "cfg0": "offline"}
    first = int(rows["alice"].get_attribute("data-rx"))
    wait(d, lambda d: int(rows["alice"].get_attribute("data-rx")) > first, 10)  # the poll
    rate = rows["alice"].find_element(By.CSS_SELECTOR, "td.rate")
    wait(d, lambda d: not rate.text.startswith("0 B/s"))  # in: 50 kB each 0.2 s
    assert rows["alice"].find_elements(By.CSS_SELECTOR, "td.graph svg.spark polyline")

    # add a peer: the QR code and the text, shown once
    follow(d, "nav-add", "/add")
    d.find_element(By.ID, "new-name").send_keys("phone")
    d.find_element(By.ID, "create").click()
    wait(d, lambda d: (d.find_element(By.ID, "qr").get_attribute("src") or "").startswith("data:"))
    assert "PrivateKey" in d.find_element(By.ID, "config").text
    assert d.find_element(By.ID, "download").get_attribute("download") == "phone.conf"
    assert host.reloads == 1

    # one peer: disable, then the state says so
    d.get(f"{base}/peer/bob")
    ready(d)
    assert d.find_element(By.ID, "peer-name").text == "bob"
    assert d.find_element(By.ID, "state").text == "enabled"
    assert d.find_elements(By.CSS_SELECTOR, "svg#chart-hour line")  # the axis, drawn
    d.find_element(By.ID, "disable").click()
    wait(d, lambda d: d.find_element(By.ID, "state").text.startswith("disabled"))
    assert not next(p for p in host.store.peers() if p.name == "bob").enabled

    follow(d, "nav-relays", "/relays")
    assert len(d.find_elements(By.CSS_SELECTOR, "#relays tr.relay")) == 1

    d.find_element(By.ID, "logout").click()
    wait(d, lambda d: d.current_url.endswith("/login"))
    d.get(f"{base}/relays")
    assert d.current_url.endswith("/login")
    # nothing the CSP refused, no script error
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not [e for e in severe if "401" not in e["message"]], severe
