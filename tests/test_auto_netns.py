"""Tier 3: transport "auto" with real gtun processes in namespaces (issue 13).

A relay and two clients.  c1 (transport "auto", `udp_probe_interval = 2`) starts while
an nftables rule in the RELAY's namespace drops UDP to its port: it falls back to TCP,
says UDP is blocked, and carries pings over TCP; the rule goes, and c1 is back on UDP
(its status and the relay's say so) within a bound measured here, with a ping running
through the switch.  c2 has a key the relay does not know: it says so, not "UDP blocked".
"""

from __future__ import annotations

import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gtun.app.keys import generate_private_key
from gtun.lab.net import PORT, GtunNet, write_key
from gtun.lab.netns import Lab, Namespace
from labkit import gtun_stdout, relay_peer, set_config_keys, wait_until

pytestmark = pytest.mark.netns

UNDERLAY = 252  # 10.252.x.x inside this module's namespaces
TABLE = "gtablock"
PROBE_INTERVAL = 2  # c1's udp_probe_interval
BACK_BOUND = 20.0  # seconds from unblocking to UDP in use (measured: see the output)
RELAY_ADDRESS = "10.66.0.1"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gta{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(
            lab, tmp_path_factory.mktemp("auto"), clients=2, underlay=UNDERLAY, lan=False
        )
        c1, c2 = gnet.clients
        set_config_keys(c1.config, "client", {"udp_probe_interval": str(PROBE_INTERVAL)})
        # c2 runs with a key that is not the one its [[peers]] entry names.
        c2.key = generate_private_key()
        write_key(gnet.dir / f"{c2.name}.key", c2.key)
        yield gnet


def block_udp(ns: Namespace) -> None:
    ns.run(["nft", "add", "table", "inet", TABLE])
    ns.run(
        [
            "nft",
            "add chain inet",
            TABLE,
            "input { type filter hook input priority 0; policy accept; }",
        ]
    )
    ns.run(["nft", "add rule inet", TABLE, "input", "udp dport", str(PORT), "counter drop"])


def unblock_udp(ns: Namespace) -> None:
    ns.run(["nft", "delete", "table", "inet", TABLE], check=False)


def dropped(ns: Namespace) -> int:
    out = ns.run(["nft", "list", "table", "inet", TABLE]).stdout
    found = re.search(r"counter packets (\d+)", out)
    return int(found.group(1)) if found else 0


def log_text(path: Path) -> str:
    return path.read_text(errors="replace")


def test_auto_falls_back_and_comes_back_to_udp(net: GtunNet) -> None:
    c1 = net.clients[0]
    relay_ns = net.relay.ns
    block_udp(relay_ns)
    try:
        net.start_relay()
        started = time.monotonic()
        net.start_client(c1, "auto")
        net.wait_configured(c1, timeout=30)
        configured = time.monotonic() - started
        st = net.wait_status(
            c1, lambda s: s.get("reachability") == "udp_blocked", 15, "UDP called blocked"
        )
        assert st["peers"][0]["transport"] == "tcp" and st["connected"]
        assert relay_peer(net, "c1")["transport"] == "tcp"
        assert dropped(relay_ns) >= 2  # the start's initiations and the first probe
        log = log_text(c1.log)
        assert "falling back to TCP" in log
        assert log.count(f"UDP to relay {c1.underlay}:{PORT} is blocked") == 1, log
        assert "answers no handshake" not in log
        text = gtun_stdout(c1.ns, "status", "-s", str(c1.socket))
        assert "UDP to the relay is blocked: on TCP, trying UDP again in" in text, text
        net.ping(c1.ns, RELAY_ADDRESS)  # over TCP

        # A ping every 0.1 s through the switch; then UDP unblocked.
        pinger = c1.ns.spawn(
            ["ping", "-n", "-i", "0.1", "-W", "1", "-w", "60", RELAY_ADDRESS],
            log_path=net.dir / "ping.log",
        )
        try:
            time.sleep(1.0)
            probe_in = net.status(c1)["udp_probe_in"]  # type: ignore[index]
            unblock_udp(relay_ns)
            unblocked = time.monotonic()
            net.wait_status(
                c1,
                lambda s: s["peers"][0]["transport"] == "udp" and s["reachability"] is None,
                BACK_BOUND,
                "c1 back on UDP",
            )
            back = time.monotonic() - unblocked
            wait_until(lambda: relay_peer(net, "c1")["transport"] == "udp", 5, "the relay on UDP")
            time.sleep(2.0)  # pings after the switch, too
        finally:
            pinger.send_signal(signal.SIGINT)
            pinger.wait(10)
        summary = (net.dir / "ping.log").read_text()
        counts = re.search(r"(\d+) packets transmitted, (\d+) received", summary)
        assert counts, summary
        sent, got = int(counts.group(1)), int(counts.group(2))
        print(
            f"\nauto: configured over TCP {configured:.1f} s after start (fallback after 5 s); "
            f"back on UDP {back:.1f} s after UDP was unblocked (next probe was due in "
            f"{probe_in:.1f} s); pings every 0.1 s through the switch: {sent - got} lost of "
            f"{sent}"
        )
        assert back < BACK_BOUND
        if probe_in is not None and probe_in >= 0.3:
            # No probe was in flight (and dropped) at the unblocking: the next one, due
            # then, finds UDP; a handshake, a configuration round trip and the status
            # poll (0.2 s) later, c1 is on UDP.
            assert back <= probe_in + 1.5, (back, probe_in)
        assert sent >= 20 and sent - got <= 2, summary
        # The relay's side: c1 on UDP, its TCP connection closed, cleanly.
        rst = net.status(net.relay)
        assert rst is not None
        wait_until(
            lambda: net.status(net.relay)["tcp_connections"] == 0,  # type: ignore[index]
            5,
            "c1's TCP connection to close",
        )
        assert rst["drops"]["tcp_bad_frame"] == 0 and rst["drops"]["tcp_timeout"] == 0
        log = log_text(c1.log)
        assert f"UDP to relay {c1.underlay}:{PORT} answers again: back on UDP" in log, log
        assert "closing the TCP connection to relay" in log and ": back on UDP" in log
        st = net.status(c1)
        assert st is not None and st["udp_probe_in"] is None and st["connected"]
        net.ping(c1.ns, RELAY_ADDRESS)  # over UDP
    finally:
        unblock_udp(relay_ns)
        net.stop(c1)


def test_unknown_key_is_reported_as_such(net: GtunNet) -> None:
    c2 = net.clients[1]
    if net.relay.proc is None:
        net.start_relay()
    started = time.monotonic()
    net.start_client(c2, "auto")
    try:
        # UDP unanswered for 5 s, then TCP connects and stays silent for 8 s.
        st = net.wait_status(
            c2, lambda s: s.get("reachability") == "no_handshake", 30, "no handshake told"
        )
        print(f"\nauto: an unknown key told {time.monotonic() - started:.1f} s after start")
        assert not st["connected"] and st["address"] is None
        log = log_text(c2.log)
        line = next(x for x in log.splitlines() if "answers no handshake" in x)
        assert f"the relay at {c2.underlay}:{PORT} answers no handshake over UDP or TCP" in line
        assert c2.public in line and "gtun peer add" in line and "[[peers]]" in line
        assert log.count("answers no handshake") == 1
        assert "is blocked" not in log  # not taken for blocked UDP
        text = gtun_stdout(c2.ns, "status", "-s", str(c2.socket))
        assert "the relay answers no handshake" in text, text
        # The relay, for its part, names the key it does not know.
        assert f"handshake from unknown key {c2.public}" in log_text(net.relay.log)
    finally:
        net.stop(c2)
