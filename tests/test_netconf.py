"""LinkConfig against the real kernel, run inside a namespace."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gtun.lab.netns import Lab, Namespace
from labkit import run_python


@pytest.fixture
def lab_prefix() -> str:
    return "gta"


def _state(ns: Namespace, dev: str) -> dict[str, Any]:
    link = json.loads(ns.run(["ip", "-j", "link", "show", dev]).stdout)[0]
    addrs = json.loads(ns.run(["ip", "-j", "addr", "show", dev]).stdout)[0]["addr_info"]
    routes = json.loads(ns.run(["ip", "-j", "route", "show", "dev", dev]).stdout)
    routes6 = json.loads(ns.run(["ip", "-j", "-6", "route", "show", "dev", dev]).stdout)
    return {
        "mtu": link["mtu"],
        "up": "UP" in link["flags"],
        "addrs": {f"{a['local']}/{a['prefixlen']}" for a in addrs if a["scope"] == "global"},
        "routes": {(r["dst"], r.get("metric")) for r in routes + routes6},
    }


CONFIGURE = """
import os, sys, time
from ipaddress import ip_interface, ip_network
from gtun.system.netlink import LinkConfig, link_exists, link_index

dev = sys.argv[1]
assert link_exists(dev) and link_index(dev) and not link_exists("gtanothere")
assert link_index("gtanothere") is None
link = LinkConfig(dev)
link.set_mtu(1300)
link.set_up()
link.add_address(ip_interface("10.201.7.1/24"))
link.add_address(ip_interface("fd20:1:7::1/64"))
link.add_route(ip_network("10.201.77.0/24"), metric=50)
link.add_route(ip_network("10.201.78.0/24"))
link.add_route(ip_network("fd20:1:77::/64"))
# Adding what exists is not an error.
link.add_address(ip_interface("10.201.7.1/24"))
link.add_route(ip_network("10.201.77.0/24"), metric=50)
link.remove_route(ip_network("10.201.78.0/24"))
link.remove_route(ip_network("10.201.79.0/24"))  # not there: fine
print("configured", flush=True)
deadline = time.monotonic() + 20
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.05)
link.undo()
link.undo()  # nothing left to do
link.close()
print("undone", flush=True)
"""


@pytest.mark.netns
def test_configure_and_undo(lab: Lab, tmp_path: Path) -> None:
    ns = lab.add_ns("n")
    peer = lab.add_ns("p")
    lab.veth(ns, "gtav0", None, peer, "gtav1", None)
    ns.run(["ip", "link", "set", "gtav0", "down"])
    # An address that was there before must survive undo.
    ns.run(["ip", "addr", "add", "10.201.70.1/24", "dev", "gtav0"])
    before = _state(ns, "gtav0")
    assert before["mtu"] == 1500 and not before["up"]

    # Configure, pause so the test can look, then undo: one process, one LinkConfig.
    go = tmp_path / "go"
    log = tmp_path / "log"
    script = tmp_path / "configure.py"
    script.write_text(CONFIGURE)
    proc = ns.spawn([sys.executable, str(script), "gtav0", str(go)], log_path=log)
    deadline = time.monotonic() + 15
    while "configured" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    during = _state(ns, "gtav0")
    go.write_text("go")
    assert proc.wait(timeout=15) == 0, log.read_text()
    assert "undone" in log.read_text()
    after = _state(ns, "gtav0")

    assert during["mtu"] == 1300 and during["up"]
    assert during["addrs"] == {"10.201.70.1/24", "10.201.7.1/24", "fd20:1:7::1/64"}
    assert ("10.201.77.0/24", 50) in during["routes"]
    assert ("fd20:1:77::/64", 1024) in during["routes"]
    assert not any(dst == "10.201.78.0/24" for dst, _ in during["routes"])
    assert after == before


FAILURES = """
from ipaddress import ip_interface, ip_network
from gtun.errors import RuntimeFailure
from gtun.system.netlink import LinkConfig

def attempt(what, action):
    try:
        action()
        print(what, "ok")
    except RuntimeFailure as exc:
        print(what, "failed:", exc)

attempt("mtu", lambda: LinkConfig("gtanothere").set_mtu(1400))
down = LinkConfig("gtav0")  # down: the kernel refuses a route via it
attempt("route", lambda: down.add_route(ip_network("10.201.78.0/24")))
attempt("addr", lambda: down.add_address(ip_interface("10.201.7.1/24")))
attempt("mtu-big", lambda: down.set_mtu(1 << 20))
"""


@pytest.mark.netns
def test_failures_name_the_device(lab: Lab) -> None:
    ns = lab.add_ns("f")
    lab.veth(ns, "gtav0", None, ns, "gtav1", None)
    ns.run(["ip", "link", "set", "gtav0", "down"])
    out = run_python(ns, FAILURES).stdout.splitlines()
    assert (
        out[0] == "mtu failed: cannot set mtu 1400 on gtanothere: device gtanothere does not exist"
    )
    assert out[1] == "route failed: cannot add route 10.201.78.0/24 via gtav0: Network is down"
    assert out[2] == "addr ok"
    assert out[3].startswith("mtu-big failed: cannot set mtu 1048576 on gtav0: ")


UNDO_GONE = """
import subprocess
from ipaddress import ip_interface, ip_network
from gtun.system.netlink import LinkConfig, link_exists

link = LinkConfig("gtav0")
link.set_mtu(1400)
link.add_address(ip_interface("10.201.7.1/24"))
link.set_up()
link.add_route(ip_network("10.201.77.0/24"))
subprocess.run(["ip", "link", "del", "gtav0"], check=True)
assert not link_exists("gtav0")
link.undo()
link.close()
print("undo ok")
"""


@pytest.mark.netns
def test_undo_when_the_device_is_gone(lab: Lab) -> None:
    ns = lab.add_ns("g")
    lab.veth(ns, "gtav0", None, ns, "gtav1", None)
    assert run_python(ns, UNDO_GONE).stdout.strip() == "undo ok"
