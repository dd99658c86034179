"""Tier 3: a handshake flood against a real relay in namespaces while a real client
joins and pings.  The flood (tests/scripts/hs_flood.py) comes from one address with
keys the relay does not know, first without mac2, then with a cookie it earned and
reuses; the relay must bound the DH work it does for it, log it in a few lines, and
still let the client through."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from gtun.app.keys import encode_key, public_key
from gtun.core.wg.constants import HANDSHAKE_BURST_PER_SOURCE, HANDSHAKES_PER_SECOND_PER_SOURCE
from gtun.lab.net import PORT, GtunNet
from gtun.lab.netns import Lab

UNDERLAY = 229  # 10.229.x.x inside this module's namespaces
SCRIPTS = Path(__file__).resolve().parent / "scripts"
FLOOD_SECONDS = 12.0


@pytest.fixture
def lab_prefix() -> str:
    return "gth"


def test_a_handshake_flood_is_limited_and_a_client_still_gets_through(
    lab: Lab, tmp_path: Path
) -> None:
    gnet = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY, lan=False)
    c1, attacker = gnet.clients  # the second client's namespace only floods
    gnet.start_relay()
    out = tmp_path / "flood.out"
    relay_key = encode_key(public_key(gnet.relay.key))
    started = time.monotonic()
    flood = attacker.ns.spawn(
        [
            sys.executable,
            str(SCRIPTS / "hs_flood.py"),
            attacker.underlay,
            str(PORT),
            relay_key,
            str(FLOOD_SECONDS),
            "8",
        ],
        log_path=out,
    )
    time.sleep(1.0)  # the flood is under way (the relay is under load) before c1 starts
    gnet.start_client(c1)
    gnet.wait_configured(c1, timeout=30)
    gnet.ping(c1.ns, "10.66.0.1")
    assert flood.wait(timeout=FLOOD_SECONDS + 30) == 0, out.read_text()
    elapsed = time.monotonic() - started
    counts = json.loads(out.read_text().strip().splitlines()[-1])
    status = gnet.status(gnet.relay)
    assert status is not None
    drops = status["drops"]
    print("flood", counts, "relay drops", {k: v for k, v in drops.items() if v})
    assert counts["sent"] > 4 * HANDSHAKES_PER_SECOND_PER_SOURCE * FLOOD_SECONDS
    assert counts["cookie_replies"] > 0 and counts["with_mac2"] > 0  # the cookie was reused
    assert counts["responses"] == 0
    # The DH work done for the flood (one per initiation that reached the key check) is
    # bounded by the source's bucket, the rest was refused before any DH.
    assert drops["handshake_ratelimited"] > 0 and drops["cookie"] > 0
    bound = HANDSHAKES_PER_SECOND_PER_SOURCE * elapsed + HANDSHAKE_BURST_PER_SOURCE
    assert 0 < drops["unknown_peer"] <= bound
    # The client is through, and the log holds a few lines about the flood, not one each.
    c1_status = gnet.status(c1)
    assert c1_status is not None and c1_status["connected"]
    log = gnet.relay.log.read_text(errors="replace")
    unknown_lines = [line for line in log.splitlines() if "unknown key" in line]
    assert 1 <= len(unknown_lines) <= 2 + elapsed / 10, unknown_lines
    assert any("more handshakes from unknown keys" in line for line in unknown_lines)
