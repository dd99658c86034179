#!/usr/bin/env python3
"""What the web console costs with many peers: the time to answer the peers page and
/api/peers, the page's load in headless Chromium until its table is filled, the event
loop's longest wait meanwhile, and the CPU this process spends while the page polls.

    python3 bench/console.py [--peers 1000] [--seconds 20] [--no-browser]

The console runs in-process on 127.0.0.1 in a thread with its own event loop, against
tests/console_fake.py's relay: `--peers` stored peers with counters that grow, day and
month totals and endpoints; its status() is built from the peer list once read (as the
relay's own status is built from its core, not from the store), so what is measured is
the console.  A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp  # noqa: E402

from console_fake import FakeHost, fake_relay  # noqa: E402
from gtun.app.console import auth, start_console  # noqa: E402
from gtun.app.keys import encode_key, generate_private_key, public_key  # noqa: E402
from gtun.app.store import StoredPeer  # noqa: E402

PASSWORD = "bench password"


class CachedHost(FakeHost):
    """FakeHost whose status reuses its first answer, with counters that grow."""

    _cached: dict[str, Any] | None = None

    async def status(self) -> dict[str, Any]:
        self.status_calls += 1
        if self._cached is None:
            self._cached = await super().status()
        for p in self._cached["peers"]:
            if p["last_handshake"] is not None:
                p["rx_bytes"] += random.randint(0, 2_000_000)
                p["tx_bytes"] += random.randint(0, 500_000)
        return self._cached


def build(tmp: Path, peers: int) -> CachedHost:
    base = fake_relay(tmp, config_peers=0)
    host = CachedHost(base.cfg, base.store)
    now = time.time()
    deltas = []
    with host.store.transaction():
        for i in range(peers):
            key = encode_key(public_key(generate_private_key()))
            host.store.add_peer(StoredPeer(name=f"peer{i:04d}", public_key=key))
            deltas.append((key, random.randint(0, 10**9), 10**8))
            if i % 4:
                host.traffic[f"peer{i:04d}"] = {
                    "last_handshake": now - random.randint(1, 100),
                    "endpoint": f"198.51.{i // 250}.{i % 250}:51820",
                    "transport": "udp",
                }
    host.store.add_traffic(deltas, now)  # today's and this month's totals in the real store
    auth.write_admin_hash(host.store, auth.hash_password(PASSWORD))
    asyncio.run(host.status())  # the fake reads and leases its peers once, here
    return host


class Loop:
    """The console in a thread of its own, with a probe of the loop's longest wait."""

    def __init__(self, host: CachedHost) -> None:
        self.host = host
        self.address: tuple[str, int] | None = None
        self.worst = 0.0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))
        self.thread.daemon = True
        self.stopping: asyncio.Event | None = None

    async def main(self) -> None:
        self.stopping = asyncio.Event()
        running = await start_console(self.host)
        self.address = running.address
        self.ready.set()
        probe = asyncio.ensure_future(self.probe())
        await self.stopping.wait()
        probe.cancel()
        await running.close()

    async def probe(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - t - 0.01)

    def start(self) -> str:
        self.thread.start()
        self.ready.wait(30)
        assert self.address is not None
        return f"http://{self.address[0]}:{self.address[1]}"

    def stop(self) -> None:
        assert self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def http_figures(base: str, trials: int) -> None:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        async with client.post(f"{base}/api/login", json={"password": PASSWORD}) as r:
            assert r.status == 200
        for path in ("/", "/api/peers", "/api/relays"):
            times, size = [], 0
            for _ in range(trials):
                t = time.perf_counter()
                async with client.get(f"{base}{path}") as r:
                    body = await r.read()
                times.append(time.perf_counter() - t)
                size = len(body)
                await asyncio.sleep(0.05)
            print(
                f"  GET {path:12} median {statistics.median(times) * 1000:7.1f} ms, "
                f"max {max(times) * 1000:7.1f} ms, {size / 1024:7.1f} KiB"
            )


def browser(base: str, seconds: float, loop: Loop) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000"):
        options.add_argument(arg)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{base}/login")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        t = time.perf_counter()
        driver.find_element(By.ID, "login").click()
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        )
        loaded = time.perf_counter() - t
        rows = len(driver.find_elements(By.CSS_SELECTOR, "tr.peer"))
        print(f"  peers page, login click to a filled table: {loaded * 1000:.0f} ms ({rows} rows)")
        t = time.perf_counter()
        driver.refresh()
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        )
        ready = driver.execute_script(
            "return performance.getEntriesByName('gtun-ready')[0].startTime"
        )
        print(
            f"  peers page reloaded: table filled {ready:.0f} ms after navigation began "
            f"({(time.perf_counter() - t) * 1000:.0f} ms as WebDriver saw it)"
        )
        loop.worst = 0.0
        c0, t0, s0 = cpu(), time.perf_counter(), loop.host.status_calls
        time.sleep(seconds)
        used, span = cpu() - c0, time.perf_counter() - t0
        polls = loop.host.status_calls - s0
        print(
            f"  while the page polls for {span:.0f} s: this process used "
            f"{used / span * 100:.1f}% of a core ({polls} status samples); "
            f"the loop waited at most {loop.worst * 1000:.1f} ms"
        )
        js = driver.execute_script(
            "const t = performance.now(); return new Promise(r => setTimeout(() => "
            "r(performance.now() - t), 0));"
        )
        print(f"  the page's main thread answers a timer in {js:.1f} ms")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("GTUN_PURE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        host = build(Path(tmp), args.peers)
        loop = Loop(host)
        base = loop.start()
        try:
            print(f"console with {args.peers} peers at {base}")
            c0, t0 = cpu(), time.perf_counter()
            time.sleep(3)
            idle = (cpu() - c0) / (time.perf_counter() - t0) * 100
            print(f"  idle: {idle:.2f}% of a core (the probe of the loop wakes 100 times a second)")
            asyncio.run(http_figures(base, args.trials))
            print(f"  the console's loop waited at most {loop.worst * 1000:.1f} ms meanwhile")
            if not args.no_browser:
                browser(base, args.seconds, loop)
        finally:
            loop.stop()
            host.store.close()


if __name__ == "__main__":
    main()
