"""Transfers under random loss arrive whole (issue 11): client to client through a real
relay while an nftables rule in the relay's namespace drops datagrams at random, the
lab's veths carrying each datagram on its own (Namespace.datagrams_on_the_wire), as a
real path does.  How long they take beside wireguard-go is bench/faults.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtun.lab.net import GtunNet
from gtun.lab.netns import Lab

pytestmark = pytest.mark.netns

UNDERLAY = 238
SIZE = 4 << 20


@pytest.fixture
def lab_prefix() -> str:
    return "gtls"


@pytest.mark.parametrize("percent", [10, 20])
def test_a_transfer_under_loss_arrives_whole(lab: Lab, tmp_path: Path, percent: int) -> None:
    net = GtunNet(lab, tmp_path, clients=2, underlay=UNDERLAY, lan=False, nat=False)
    net.start_all()
    for ns in lab.namespaces:
        ns.datagrams_on_the_wire()
    c1, c2 = net.clients
    net.ping(c1.ns, c2.extra["address"], count=2)
    net.relay.ns.drop_at_random(percent)
    sent, received, _ = net.transfer(c1.ns, c2.ns, c2.extra["address"], SIZE, timeout=150)
    assert sent and sent == received, "the transfer did not arrive whole"
    # The loss was real and per datagram: thousands crossed, a share of them dropped.
    assert net.relay.ns.dropped_at_random() > SIZE // 1500 * percent // 200
    # Nothing dropped by the relay itself, but for the delay's bound (CoDel may shed a
    # datagram of a burst that a retransmission makes: a drop by design, counted).
    drops = (net.status(net.relay) or {}).get("drops") or {}
    assert not {k: v for k, v in drops.items() if v and k not in ("link_scoped", "codel")}, drops
