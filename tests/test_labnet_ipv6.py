"""Tier 3: GtunNet with `network6`, and its checksummed transfer over IPv6 inside the
tunnel (what `bench.py --verify-gb` does at size), over UDP and over TCP."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtun.lab.net import GtunNet
from gtun.lab.netns import Lab

SIZE = 2 * 1024 * 1024


@pytest.fixture
def lab_prefix() -> str:
    return "gtb"


def test_ipv6_transfer_client_to_relay_and_client_to_client(lab: Lab, tmp_path: Path) -> None:
    net = GtunNet(
        lab, tmp_path / "net", underlay=240, network="10.240.200.0/24",
        network6="fd24:240::/64", lan=False, nat=False,
    )  # fmt: skip
    assert 'network6 = "fd24:240::/64"' in net.relay.config.read_text()
    c1, c2 = net.clients
    net.set_transport(c2, "tcp")
    net.start_all()
    assert c1.extra["address6"].startswith("fd24:240::")
    assert c2.extra["address6"].startswith("fd24:240::")
    # UDP client to the relay's own IPv6 address, then TCP client to the UDP client.
    for src, dst, address in (
        (c1.ns, net.relay.ns, "fd24:240::1"),
        (c2.ns, c1.ns, c1.extra["address6"]),
    ):
        sent, received, seconds = net.transfer(src, dst, address, SIZE, timeout=60)
        assert len(sent) == 64 and sent == received, (address, sent, received)
        assert seconds > 0
