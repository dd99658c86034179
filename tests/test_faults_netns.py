"""Faults with real processes in network namespaces (issue 11): a client killed with
SIGKILL and restarted keeps its address and flows; a client that only sends is followed
when its underlay address changes; a relay whose state directory is read-only or whose
state file is corrupt refuses to start with one line naming the file (exit 2); a
running relay whose state directory turns read-only refuses the new lease a reload
needs, says so, and serves its clients on.  Bounds are generous: figures come from
bench/faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.lab import statedir
from gtun.lab.net import GTUN, GtunNet
from gtun.lab.netns import Lab, Namespace
from labkit import move_address, ping_count, wait_until

pytestmark = pytest.mark.netns

UNDERLAY = 237
RELAY = "10.66.0.1"
BOUND = 15.0  # seconds: generous on a shared machine


@pytest.fixture
def lab_prefix() -> str:
    return "gtst"


def answered(ns: Namespace, address: str, within: float = BOUND) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ping_count(ns, address, 1, "-W", "0.3", deadline=1) > 0:
            return True
    return False


def test_killed_client_restarts_with_its_address_and_flows(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY, lan=False)
    c1, c2 = net.clients
    net.start_all()
    a1, a2 = c1.extra["address"], c2.extra["address"]
    net.ping(c1.ns, a2)
    assert c1.proc is not None
    os.killpg(c1.proc.pid, signal.SIGKILL)
    c1.proc.wait(10)
    net.start_client(c1)
    assert answered(c1.ns, RELAY), net.log_tail(c1)
    assert answered(c1.ns, a2) and answered(c2.ns, a1)
    assert net.wait_configured(c1) == a1


def test_send_only_client_roaming_is_followed(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY, lan=False)
    c1, c2 = net.clients
    net.start_all()
    a2 = c2.extra["address"]
    net.ping(c1.ns, a2)
    move_address(c1.ns, "up0", f"10.{UNDERLAY}.1.2/24", f"10.{UNDERLAY}.1.5/24")
    assert answered(c1.ns, a2), net.log_tail(net.relay)
    peer = next(p for p in (net.status(net.relay) or {})["peers"] if p["name"] == c1.name)
    assert peer["endpoint"].startswith(f"10.{UNDERLAY}.1.5:")


def start_fails(net: GtunNet, wrap: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [*wrap, *GTUN, "server", "-c", str(net.relay.config)]
    return net.relay.ns.run(cmd, check=False, timeout=60)


def one_error_line(out: subprocess.CompletedProcess[str], db: Path, cause: str) -> None:
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("gtun:")]
    assert len(errors) == 1 and str(db) in errors[0] and cause in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_unusable_state_dir_refused_at_start(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path, clients=0, underlay=UNDERLAY, lan=False)
    state = net.dir / "state"
    db = state / "gtun.sqlite"
    net.start_relay()  # a state file with its schema
    net.stop(net.relay)
    good = db.read_bytes()
    one_error_line(start_fails(net, statedir.bind_wrap(state, readonly=True)), db, "Read-only")
    db.write_bytes(b"not a database, " * 512)
    one_error_line(start_fails(net, []), db, "corrupt")
    db.write_bytes(good[: len(good) // 2])
    one_error_line(start_fails(net, []), db, "corrupt")


def test_running_relay_with_read_only_state_refuses_a_new_lease(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY, lan=False)
    state = net.dir / "state"
    db = state / "gtun.sqlite"
    net.start_relay(wrap=statedir.bind_wrap(state))
    for c in net.clients:
        net.start_client(c)
    addresses = {c.name: net.wait_configured(c) for c in net.clients}
    stored = statedir.leases_seen_by(None, db)
    assert sorted(stored.values()) == sorted(addresses.values())
    assert net.relay.proc is not None
    statedir.make_readonly(net.relay.proc.pid, state)
    newcomer = encode_key(public_key(generate_private_key()))
    with net.relay.config.open("a") as f:
        f.write(f'\n[[peers]]\nname = "newcomer"\npublic_key = "{newcomer}"\n')
    os.kill(net.relay.proc.pid, signal.SIGHUP)
    line = wait_until(
        lambda: next(
            (ln for ln in net.relay.log.read_text().splitlines() if "reload failed" in ln), None
        ),
        BOUND,
        "the reload refused",
    )
    assert str(db) in line and "read-only" in line, line
    c1, c2 = net.clients
    assert answered(c1.ns, c2.extra["address"]) and answered(c2.ns, RELAY)
    assert {c.name: net.wait_configured(c) for c in net.clients} == addresses
    names = [p["name"] for p in (net.status(net.relay) or {})["peers"]]
    assert "newcomer" not in names
    assert statedir.leases_seen_by(None, db) == stored
