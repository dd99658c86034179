"""The web console in a real headless Chromium, against a real relay and clients in
namespaces (tier 3).

One lab, one relay with `console_listen` on its own namespace's loopback (reached from
here through `gtun.lab.portfwd`, as an SSH tunnel would), two gtun clients pinging each
other, and a stock WireGuard peer (wireguard-go) added from the console, configured from
the QR code read back out of the page's image.  The steps run in order in one test, as
an administrator would click through them; screenshots of every main page are kept in
artifacts/console/ (browserkit.ARTIFACTS).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browserkit import ARTIFACTS, Browser, clear_artifacts, missing
from gtun.lab.net import GTUN, PORT, GtunNet
from gtun.lab.netns import Lab, Namespace, python_env
from gtun.lab.portfwd import NsPortForward
from labkit import apply_wg_quick, ping_count, set_config_keys, start_wireguard_go

CONSOLE_PORT = 9680
PASSWORD = "correct horse battery staple"
STOCK_UNDERLAY = "10.250.9"  # the stock peer's veth to the relay
WG_IFNAME = "gtwphone0"  # unique: its socket is /var/run/wireguard/IFNAME.sock, shared


@pytest.fixture
def lab_prefix() -> str:
    return "gtw"


@pytest.fixture
def browser_ready() -> None:
    why = missing()
    if why is not None:
        pytest.fail(f"the console's browser test {why}")
    for tool in ("wireguard-go", "wg", "zbarimg"):
        if shutil.which(tool) is None:
            pytest.fail(f"the console's browser test needs {tool} (scripts/setup installs it)")


class Console:
    """The lab around the console: the relay and its two clients, the stock peer's
    namespace, the forwarded port and the browser."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.dir = workdir
        self.net = GtunNet(lab, workdir / "net", clients=2, lan=False, nat=False)
        relay = self.net.relay
        self.stock: Namespace = lab.add_ns("s1")
        lab.veth(
            relay.ns, "rs1", f"{STOCK_UNDERLAY}.1/24", self.stock, "up0", f"{STOCK_UNDERLAY}.2/24"
        )
        set_config_keys(
            relay.config,
            "server",
            {
                "console_listen": f'"127.0.0.1:{CONSOLE_PORT}"',
                "endpoint": f'"{STOCK_UNDERLAY}.1:{PORT}"',  # what `peer add` gives the phone
            },
        )
        self.forward: NsPortForward | None = None
        self.browser: Browser | None = None

    def set_password(self) -> None:
        out = self.net.relay.ns.run(
            [*GTUN, "console", "passwd", "--stdin", "-c", str(self.net.relay.config)],
            input=PASSWORD + "\n",
            check=False,
            env=python_env(),
        )
        assert out.returncode == 0, out.stderr

    def open(self) -> Browser:
        self.forward = NsPortForward(self.net.relay.ns.name, ("127.0.0.1", CONSOLE_PORT))
        self.wait_console()
        self.browser = Browser(self.forward.url)
        return self.browser

    def wait_console(self, timeout: float = 20) -> None:
        """Until the console answers its login page (the relay has just started)."""
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.http("GET", "/login")
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the console did not answer in {timeout} s:\n"
                    + self.net.log_tail(self.net.relay)
                )
            time.sleep(0.3)

    def http(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request from outside the browser, with no session: (status, JSON or text)."""
        import urllib.error
        import urllib.request

        assert self.forward is not None
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.forward.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
                return answer.status, _decode(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())
        except OSError:
            return 0, None

    def close(self) -> None:
        if self.browser is not None:
            self.browser.close()
        if self.forward is not None:
            self.forward.close()
        Path(f"/var/run/wireguard/{WG_IFNAME}.sock").unlink(missing_ok=True)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def api(b: Browser, method: str, path: str, body: Any = None, csrf: str | None = None) -> Any:
    """A request from inside the page (its cookie, if any): (status, JSON or text)."""
    b.driver.set_script_timeout(30)
    status, text = b.driver.execute_async_script(
        """
        const [method, path, body, csrf, done] = arguments;
        const headers = {"Content-Type": "application/json"};
        if (csrf !== null) headers["X-CSRF-Token"] = csrf;
        fetch(path, {method, headers, credentials: "same-origin",
                     body: body === null ? undefined : JSON.stringify(body)})
          .then(async r => done([r.status, await r.text()]))
          .catch(e => done([0, String(e)]));
        """,
        method,
        path,
        body,
        csrf,
    )
    return status, _decode(text.encode())


def row_value(b: Browser, name: str, what: str) -> str:
    """A peer row's attribute (data-rx, data-tx) or a cell's text (td.state ...)."""
    row = b.find(f'tr.peer[data-name="{name}"]')
    if what.startswith("data-"):
        return str(row.get_attribute(what))
    return str(row.find_element("css selector", what).text)


def day_bytes(b: Browser, name: str) -> int:
    status, peer = api(b, "GET", f"/api/peers/{name}")
    assert status == 200, peer
    return sum(rx + tx for _, rx, tx in peer["history"]["day"])


@pytest.fixture
def console(lab: Lab, tmp_path: Path, browser_ready: None) -> Iterator[Console]:
    clear_artifacts()
    c = Console(lab, tmp_path)
    try:
        yield c
    finally:
        c.close()


def test_console_in_a_browser(console: Console) -> None:
    net = console.net
    console.set_password()
    net.start_all()
    c1, c2 = net.clients
    a1, a2 = c1.extra["address"], c2.extra["address"]
    # The two clients ping each other all along (through the relay).
    c1.ns.spawn(["ping", "-n", "-i", "0.2", a2])
    c2.ns.spawn(["ping", "-n", "-i", "0.2", a1])
    b = console.open()

    # No session: the API refuses, the pages send to the login.
    assert console.http("GET", "/api/peers")[0] == 401
    assert console.http("GET", "/api/status")[0] == 401
    b.goto("/", ready=False)
    b.wait(lambda: b.path().startswith("/login"), "the redirect to /login")
    b.screenshot("login")

    # A wrong password is refused, and says so.
    b.fill("#password", "not the password")
    b.click("#login")
    b.wait(lambda: b.text("#login-error").strip(), "the login error")
    assert b.path().startswith("/login")
    assert "gtun_session" not in b.cookies()

    # The right one.
    b.fill("#password", PASSWORD)
    b.click("#login")
    b.wait(lambda: b.path() == "/", "the peers page after login")
    b.wait_ready()
    cookie = b.cookies()["gtun_session"]
    assert cookie["httpOnly"] and cookie.get("sameSite") == "Strict", cookie

    # Both clients online, their traffic rising while they ping.
    for name in ("c1", "c2"):
        b.wait(lambda n=name: row_value(b, n, "td.state") == "online", f"{name} online")
    before = {n: int(row_value(b, n, "data-rx")) for n in ("c1", "c2")}
    b.wait(
        lambda: all(int(row_value(b, n, "data-rx")) > before[n] for n in before),
        "both clients' traffic to rise",
    )
    b.wait(lambda: b.find_all("td.graph svg.spark"), "the live graphs")
    b.screenshot("peers")

    # A stock WireGuard peer, added in the console; its QR code read back from the image.
    b.goto("/add")
    b.fill("#new-name", "phone")
    b.click("#create")
    b.wait(
        lambda: (b.find("img#qr").get_attribute("src") or "").startswith("data:image/png;base64,"),
        "the QR code",
    )
    shown = b.text("pre#config")
    assert "PrivateKey = " in shown and "[Peer]" in shown, shown
    assert b.find("a#download").get_attribute("download") == "phone.conf"
    b.screenshot("add-peer")
    src = b.find("img#qr").get_attribute("src")
    png = ARTIFACTS / "phone-qr.png"
    png.write_bytes(base64.b64decode(src.split(",", 1)[1]))
    read = subprocess.run(
        ["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True, timeout=30
    )
    assert read.returncode == 0, read.stderr
    config = read.stdout.strip()
    assert config == shown.strip(), (config, shown)

    # wireguard-go brings the phone up with that configuration, and it reaches both the
    # relay and a client.
    start_wireguard_go(console.stock, WG_IFNAME, console.dir / "wireguard-go.log")
    apply_wg_quick(console.stock, WG_IFNAME, config + "\n", console.dir / "phone.conf")
    assert ping_count(console.stock, "10.66.0.1", 5, deadline=15) >= 3, net.log_tail(net.relay)
    assert ping_count(console.stock, a1, 5) >= 3
    b.goto("/")
    b.wait(lambda: row_value(b, "phone", "td.state") == "online", "the phone online")

    # A forged CSRF token, or none, changes nothing.
    status, session = api(b, "GET", "/api/session")
    assert status == 200 and session["csrf"], session
    assert api(b, "POST", "/api/peers/phone/disable", csrf="forged-" + session["csrf"])[0] == 403
    assert api(b, "POST", "/api/peers/phone/disable")[0] == 403
    assert api(b, "DELETE", "/api/peers/phone", csrf="0" * 43)[0] == 403
    status, phone = api(b, "GET", "/api/peers/phone")
    assert status == 200 and phone["enabled"] is True, phone

    # Disabled in the console: the phone's traffic stops, the clients' flows on.
    b.goto("/peer/phone")
    b.wait(lambda: b.text("#state").startswith("enabled"), "the phone's state")
    b.click("#disable")
    b.wait(lambda: b.text("#state").startswith("disabled"), "the phone disabled")
    b.screenshot("peer-disabled")
    assert ping_count(console.stock, a1, 10, deadline=4) == 0
    assert ping_count(c1.ns, a2, 10) >= 8
    b.goto("/")
    b.wait(lambda: row_value(b, "phone", "td.state") == "disabled", "the phone shown disabled")
    frozen = int(row_value(b, "phone", "data-rx"))
    moving = int(row_value(b, "c1", "data-rx"))
    ping_count(console.stock, a1, 10, deadline=3)
    b.wait(lambda: int(row_value(b, "c1", "data-rx")) > moving, "c1's traffic still rising")
    assert int(row_value(b, "phone", "data-rx")) == frozen

    # Enabled again: it flows again.
    b.goto("/peer/phone")
    b.click("#enable")
    b.wait(lambda: b.text("#state").startswith("enabled"), "the phone enabled")
    assert ping_count(console.stock, a1, 5, deadline=20) >= 1, net.log_tail(net.relay)

    # The relays and doctor pages.
    b.goto("/relays")
    b.wait(lambda: b.find_all("tr.relay"), "a relay row")
    b.screenshot("relays")
    b.goto("/doctor", ready=False)
    b.wait(lambda: b.find_all("#doctor .check"), "doctor's checks", timeout=90)
    b.screenshot("doctor")

    # History is in the store: it survives a restart of the relay.
    b.goto("/peer/c1")
    b.wait(lambda: b.find_all("svg#chart-hour rect"), "c1's hour chart")
    # c1 is a [[peers]] entry: changed in the config file, so no buttons for it here.
    assert not b.find("#disable").is_enabled() and not b.find("#remove").is_enabled()
    assert "config" in b.text("#kept-note")
    b.screenshot("peer")
    net.stop(net.relay)  # the relay folds its counters once more as it stops
    net.start_relay()
    console.wait_console()
    b.goto("/", ready=False)
    b.wait(lambda: b.path().startswith("/login"), "the login again (sessions end with the relay)")
    b.fill("#password", PASSWORD)
    b.click("#login")
    b.wait(lambda: b.path() == "/", "the peers page after the second login")
    after = day_bytes(b, "c1")
    assert after > 0
    b.goto("/peer/c1")
    b.wait(lambda: b.find_all("svg#chart-day rect"), "c1's day chart after the restart")
    b.screenshot("peer-after-restart")
    b.wait(lambda: day_bytes(b, "c1") > after, "c1's history growing after the restart", 40)

    # Logged out: the session no longer opens anything.
    b.click("#logout")
    b.wait(lambda: b.path().startswith("/login"), "the login after logout")
    assert api(b, "GET", "/api/peers")[0] == 401
