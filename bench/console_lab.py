#!/usr/bin/env python3
"""The web console's cost, measured on a real relay with a real headless Chromium.

Run as root (after scripts/setup, which installs chromium and chromium-driver):

    python3 bench/console_lab.py [--peers 2,1000] [--seconds 30] [--loads 5] [--screenshots DIR]

For each peer count, one lab (namespaces "gtcb...", addresses only inside them): a
relay with `console_listen` on its own loopback, two gtun clients pinging each other
(0.2 s apart) and the rest of the peers as [[peers]] entries that never connect (every
one is listed, leased and shown, as on a relay where most peers are offline).  It then
measures, in this order:

- the relay's CPU (utime+stime from /proc) over `--seconds` with no console page open;
- the peers page loaded `--loads` times in Chromium (through gtun.lab.portfwd, as an SSH
  tunnel would): the time from navigation start to the page's first data on screen (the
  page marks it, performance mark "gtun-ready"), and the /api/peers answer (its size and
  its time from request to end of response, resource timing);
- the relay's CPU over `--seconds` with the peers page open (it polls every 2 s);
- the relay's CPU over `--seconds` with /api/peers fetched every 2 s by this script
  instead (what the relay's side costs without a browser on the same 2 cores);
- and, over each of those spells, the round trips of c1's pings to c2 through the relay
  (0.2 s apart), as what a page costs the data path.

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browserkit import Browser  # noqa: E402
from gtun.app.keys import encode_key, generate_private_key, public_key  # noqa: E402
from gtun.lab.net import GTUN, GtunNet  # noqa: E402
from gtun.lab.netns import Lab, python_env  # noqa: E402
from gtun.lab.portfwd import NsPortForward  # noqa: E402

PORT = 9680
PASSWORD = "bench console password"
TICKS = os.sysconf("SC_CLK_TCK")
POLL_EVERY = 2.0  # seconds, as the peers page polls


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_over(pid: int, seconds: float, poll: tuple[str, str] | None = None) -> float:
    """The share of one CPU that `pid` used over the next `seconds`; with `poll` (a URL
    and a session cookie), GET it every POLL_EVERY seconds meanwhile, as a page does."""
    before, started = cpu_seconds(pid), time.monotonic()
    if poll is None:
        time.sleep(seconds)
    else:
        url, cookie = poll
        while time.monotonic() - started < seconds:
            request = urllib.request.Request(url, headers={"Cookie": f"gtun_session={cookie}"})
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
                answer.read()
            time.sleep(POLL_EVERY)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def ping_times(log: Path) -> list[tuple[float, float]]:
    """(Unix time, RTT ms) of each answer in a `ping -D` log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\[(\d+\.\d+)\].* time=([\d.]+) ms", line)
        if m:
            out.append((float(m.group(1)), float(m.group(2))))
    return out


def percentiles(values: list[float]) -> str:
    """ "median / p99 / max" in ms, or "-"."""
    if not values:
        return "-"
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered):.2f} / {p99:.2f} / {ordered[-1]:.2f}"


def extra_peers(count: int) -> str:
    keys = (encode_key(public_key(generate_private_key())) for _ in range(count))
    return "".join(
        f'\n[[peers]]\nname = "p{i:05d}"\npublic_key = "{key}"\n' for i, key in enumerate(keys)
    )


def measure(
    peers: int, seconds: float, loads: int, workdir: Path, shots: Path | None
) -> dict[str, Any]:
    lab = Lab("gtcb")
    browser: Browser | None = None
    forward: NsPortForward | None = None
    try:
        net = GtunNet(
            lab,
            workdir / f"n{peers}",
            clients=2,
            lan=False,
            nat=False,
            network="10.66.0.0/20",
            extra_peers=extra_peers(max(0, peers - 2)),
        )
        config = net.relay.config
        config.write_text(
            config.read_text().replace(
                "[server]\n", f'[server]\nconsole_listen = "127.0.0.1:{PORT}"\n', 1
            )
        )
        net.relay.ns.run(
            [*GTUN, "console", "passwd", "--stdin", "-c", str(config)],
            input=PASSWORD + "\n",
            env=python_env(),
        )
        net.start_all(timeout=60)
        c1, c2 = net.clients
        pings = workdir / f"n{peers}" / "c1-ping.log"
        c1.ns.spawn(["ping", "-n", "-D", "-i", "0.2", c2.extra["address"]], log_path=pings)
        c2.ns.spawn(["ping", "-n", "-i", "0.2", c1.extra["address"]])
        assert net.relay.proc is not None
        pid = net.relay.proc.pid
        time.sleep(3)
        quiet_from = time.time()
        idle = cpu_over(pid, seconds)
        quiet_to = time.time()

        forward = NsPortForward(net.relay.ns.name, ("127.0.0.1", PORT))
        browser = Browser(forward.url)
        b = browser
        b.goto("/login", ready=False)
        b.fill("#password", PASSWORD)
        b.click("#login")
        b.wait(lambda: b.path() == "/", "the peers page", timeout=60)
        b.wait_ready()
        ready, api_ms, api_kb = [], [], []
        for _ in range(loads):
            b.goto("/", ready=False)
            b.wait(
                lambda: b.js("return performance.getEntriesByName('gtun-ready').length"),
                "the page's first data",
                timeout=60,
            )
            ready.append(b.js("return performance.getEntriesByName('gtun-ready')[0].startTime"))
            entry = b.js(
                "const e = performance.getEntriesByType('resource')"
                ".filter(r => r.name.endsWith('/api/peers'))[0];"
                "return e ? [e.responseEnd - e.requestStart, e.encodedBodySize] : null"
            )
            if entry:
                api_ms.append(entry[0])
                api_kb.append(entry[1] / 1024)
        watched_from = time.time()
        watched = cpu_over(pid, seconds)
        watched_to = time.time()
        # The same polling without a browser on this machine (a script, or a browser on
        # the admin's own computer): what the relay's side costs alone.
        cookie = b.cookies()["gtun_session"]["value"]
        b.driver.get("about:blank")  # the page stops polling
        polled_from = time.time()
        polled = cpu_over(pid, seconds, poll=(forward.url + "/api/peers", cookie))
        polled_to = time.time()
        rtts = ping_times(pings)

        def spell(start: float, end: float) -> list[float]:
            return [ms for t, ms in rtts if start <= t <= end]

        if shots is not None:
            # After the measurements: the page again, a burst of bigger pings for the
            # graphs to show, then the page as large as its content.
            b.goto("/")
            time.sleep(15)
            c1.ns.run(
                ["ping", "-n", "-q", "-s", "1200", "-i", "0.01", "-c", "800", c2.extra["address"]],
                check=False,
                timeout=60,
            )
            time.sleep(8)
            shots.mkdir(parents=True, exist_ok=True)
            bottom = b.js(
                "return document.querySelector('table#peers').getBoundingClientRect().bottom"
            )
            clip = {"x": 0, "y": 0, "width": 1400, "height": min(int(bottom) + 28, 1000)}
            shot = b.driver.execute_cdp_cmd(
                "Page.captureScreenshot", {"format": "png", "clip": {**clip, "scale": 1}}
            )
            (shots / f"peers-{peers}.png").write_bytes(base64.b64decode(shot["data"]))
        return {
            "peers": peers,
            "ready_ms": statistics.median(ready),
            "ready_max_ms": max(ready),
            "api_ms": statistics.median(api_ms) if api_ms else float("nan"),
            "api_kb": statistics.median(api_kb) if api_kb else float("nan"),
            "cpu_idle": idle * 100,
            "cpu_watched": watched * 100,
            "cpu_polled": polled * 100,
            "rtt_quiet": percentiles(spell(quiet_from, quiet_to)),
            "rtt_watched": percentiles(spell(watched_from, watched_to)),
            "rtt_polled": percentiles(spell(polled_from, polled_to)),
        }
    finally:
        if browser is not None:
            browser.close()
        if forward is not None:
            forward.close()
        lab.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="2,1000", help="peer counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--screenshots", type=Path, default=None, help="save the peers page here (PNG)"
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gtun-console-bench-"))
    rows = [
        measure(int(n), args.seconds, args.loads, workdir, args.screenshots)
        for n in args.peers.split(",")
    ]
    print(
        "| peers | page to first data ms (median, max) | /api/peers ms | /api/peers KiB "
        "| relay CPU %: no page, page open, API polled "
        "| ping c1->c2 ms (median / p99 / max): no page | page open | API polled |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['peers']} | {r['ready_ms']:.0f} ({r['ready_max_ms']:.0f}) | "
            f"{r['api_ms']:.0f} | {r['api_kb']:.0f} | "
            f"{r['cpu_idle']:.2f}, {r['cpu_watched']:.2f}, {r['cpu_polled']:.2f} | "
            f"{r['rtt_quiet']} | {r['rtt_watched']} | {r['rtt_polled']} |"
        )


if __name__ == "__main__":
    main()
