"""IPv6 inside the tunnel, tiers 1 and 2: no namespaces.

The relay core with `network6`: routing IPv6 peer to peer and into the TUN, the
spoofing check for IPv6 sources, the configuration push (and its compatibility both
ways), the stable assignment, the config checks, `gtun peer add` and `gtun status`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import struct
import textwrap
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import pytest

from gtun import cli
from gtun.app import keys
from gtun.app.config import load_server_config
from gtun.app.peers import add_peer
from gtun.app.peerset import collect_peers
from gtun.app.store import StateStore, StoredPeer
from gtun.core import tunnel as tm
from gtun.core.client import ClientCore
from gtun.core.packet import parse_addresses
from gtun.core.relay import PeerSpec, Relay
from gtun.core.tunnel import parse_pushed_config
from gtun.errors import ConfigError, RuntimeFailure
from gtun.system.ipv6 import address6_for, enable_ipv6
from gtun.system.nft import Nat
from gtun.testing.link import CoreLink, relay_settings

NET4 = IPv4Network("10.66.0.0/24")
NET6 = IPv6Network("fd66:237::/64")
LAN6 = ip_network("fd77:237::/64")  # pushed route, behind the relay
SUBNET6 = ip_network("fd88:237::/64")  # behind c1


def build_udp6(src: str, dst: str, payload: bytes = b"x") -> bytes:
    """An IPv6 UDP datagram (RFC 8200 header; the checksum does not matter here)."""
    udp = struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload
    header = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64)
    return header + IPv6Address(src).packed + IPv6Address(dst).packed + udp


class Net6(CoreLink):
    """A relay with network6 and two gtun clients, wired through memory."""

    def __init__(self, network6: IPv6Network | None = NET6) -> None:
        super().__init__(
            Relay(
                secrets.token_bytes(32),
                relay_settings(
                    routes=(ip_network("192.168.77.0/24"), LAN6),
                    network6=network6,
                ),
            ),
            now=1000.0,
        )
        specs = []
        for name, host, subnets in (("c1", 2, (SUBNET6,)), ("c2", 3, ())):
            client = ClientCore(secrets.token_bytes(32), self.relay.wg.public_key, name)
            self.add_client(name, client)
            address = NET4.network_address + host
            v6 = address6_for(NET4, network6, address) if network6 else None
            specs.append(PeerSpec(name, client.wg.public_key, address, subnets, v6))
        self.relay.set_peers(specs)
        self.start()


# --- the relay core -----------------------------------------------------------------


def test_config_push_carries_ipv6() -> None:
    net = Net6()
    c1 = net.clients["c1"].config
    assert c1 is not None
    assert c1.address6 == IPv6Address("fd66:237::2")
    assert c1.prefix6 == 64
    assert c1.gateway6 == IPv6Address("fd66:237::1")
    assert c1.address == IPv4Address("10.66.0.2")
    assert LAN6 in c1.routes and SUBNET6 not in c1.routes  # its own subnet is not pushed back
    c2 = net.clients["c2"].config
    assert c2 is not None and c2.address6 == IPv6Address("fd66:237::3")
    assert SUBNET6 in c2.routes and LAN6 in c2.routes  # the LAN behind c1, IPv6 too


def test_config_push_round_trip_and_compatibility() -> None:
    net = Net6()
    peer = net.relay.peer_by_name("c1")
    assert peer is not None
    payload = tm.pull_message(tm.push_config(net.relay.config_for(peer))).payload
    assert payload["address6"] == "fd66:237::2" and payload["prefix6"] == 64
    assert payload["gateway6"] == "fd66:237::1"
    config = parse_pushed_config(payload)
    assert (config.address6, config.prefix6, config.gateway6) == (
        IPv6Address("fd66:237::2"),
        64,
        IPv6Address("fd66:237::1"),
    )
    # An older relay (no IPv6 keys): no IPv6, and everything else as before.
    old = {k: v for k, v in payload.items() if not k.endswith("6")}
    legacy = parse_pushed_config(old)
    assert legacy.address6 is None and legacy.prefix6 is None and legacy.gateway6 is None
    assert legacy.address == config.address and legacy.routes == config.routes
    # A relay without network6 sends none.
    plain = Net6(network6=None)
    p1 = plain.relay.peer_by_name("c1")
    assert p1 is not None and plain.relay.config_for(p1).address6 is None
    assert "address6" not in tm.pull_message(tm.push_config(plain.relay.config_for(p1))).payload
    assert plain.clients["c1"].config is not None
    assert plain.clients["c1"].config.address6 is None


@pytest.mark.parametrize(
    "bad",
    [
        {"address6": "fd66::2"},  # prefix6 and gateway6 missing
        {"address6": "10.0.0.2", "prefix6": 64, "gateway6": "fd66::1"},
        {"address6": "fd66::2", "prefix6": 129, "gateway6": "fd66::1"},
        {"address6": "fd66::2", "prefix6": 64, "gateway6": "nope"},
        {"address6": 7, "prefix6": 64, "gateway6": "fd66::1"},
        {"address6": "fd66::2", "prefix6": "x", "gateway6": "fd66::1"},
    ],
)
def test_bad_pushed_ipv6_is_rejected(bad: dict[str, Any]) -> None:
    base = {"address": "10.66.0.2", "prefix": 24, "mtu": 1420, "gateway": "10.66.0.1"}
    with pytest.raises(ValueError):
        parse_pushed_config({**base, **bad})


def test_ipv6_routed_peer_to_peer_and_to_tun() -> None:
    net = Net6()
    c1, c2 = net.clients["c1"], net.clients["c2"]
    packet = build_udp6("fd66:237::2", "fd66:237::3", b"hello v6")
    c1.tun_packet(packet, net.now)
    net.pump()
    assert net.take("c2") == [packet]  # padding trimmed, unchanged
    assert net.tun_in == []
    # From c1's own IPv6 subnet is allowed too.
    from_lan = build_udp6("fd88:237::7", "fd66:237::3")
    c1.tun_packet(from_lan, net.now)
    net.pump()
    assert net.take("c2") == [from_lan]
    # To the relay's own IPv6 address and to a pushed IPv6 route: into the TUN.
    for dst in ("fd66:237::1", "fd77:237::10"):
        c2.tun_packet(build_udp6("fd66:237::3", dst), net.now)
    net.pump()
    assert [parse_addresses(p) for p in net.tun_in] == [
        (IPv6Address("fd66:237::3").packed, IPv6Address(d).packed)
        for d in ("fd66:237::1", "fd77:237::10")
    ]
    # From the TUN: to a peer's IPv6 address, to the subnet behind it, to nobody.
    reply = build_udp6("fd66:237::1", "fd66:237::3")
    net.relay.tun_packet(reply, net.now)
    to_subnet = build_udp6("fd77:237::10", "fd88:237::5")
    net.relay.tun_packet(to_subnet, net.now)
    net.pump()
    assert net.take("c2") == [reply]
    assert net.take("c1") == [to_subnet]
    net.relay.tun_packet(build_udp6("fd66:237::1", "fd66:237::99"), net.now)
    assert net.relay.drops["no_route"] == 1


def test_spoofed_ipv6_source_is_dropped_and_counted() -> None:
    net = Net6()
    c1 = net.clients["c1"]
    for src in ("fd66:237::3", "fd66:237::99", "fd77:237::1", "2001:db8::1"):
        c1.tun_packet(build_udp6(src, "fd66:237::3", b"spoof"), net.now)
    net.pump()
    assert net.relay.drops["spoofed"] == 4
    peer = net.relay.peer_by_name("c1")
    assert peer is not None and peer.data.drops == {"spoofed": 4}
    assert net.take("c2") == [] and net.tun_in == []
    # Its own address still goes through.
    c1.tun_packet(build_udp6("fd66:237::2", "fd66:237::3"), net.now)
    net.pump()
    assert len(net.take("c2")) == 1


def test_without_network6_ipv6_sources_are_spoofs() -> None:
    net = Net6(network6=None)
    net.clients["c1"].tun_packet(build_udp6("fd66:237::2", "fd66:237::3"), net.now)
    net.pump()
    assert net.relay.drops["spoofed"] == 1


# --- assignment ---------------------------------------------------------------------


def test_address6_has_the_host_number_of_the_ipv4_address() -> None:
    assert address6_for(NET4, NET6, IPv4Address("10.66.0.1")) == IPv6Address("fd66:237::1")
    assert address6_for(NET4, NET6, IPv4Address("10.66.0.254")) == IPv6Address("fd66:237::fe")
    big = IPv4Network("10.64.0.0/10")
    assert address6_for(big, NET6, IPv4Address("10.65.2.3")) == IPv6Address("fd66:237::1:203")
    with pytest.raises(ValueError):
        address6_for(NET4, NET6, IPv4Address("10.67.0.1"))
    with pytest.raises(ValueError):
        address6_for(big, IPv6Network("fd66::/120"), IPv4Address("10.65.2.3"))


def _server_config(tmp: Path, body: str = "", peers: str = "") -> Path:
    key = tmp / "server.key"
    if not key.exists():
        key.write_text(keys.encode_key(keys.generate_private_key()) + "\n")
        os.chmod(key, 0o600)
    path = tmp / "server.toml"
    path.write_text(
        "[server]\n"
        'private_key_file = "server.key"\n'
        'network = "10.66.0.0/24"\n'
        f'state_dir = "{tmp / "state"}"\n'
        f'control_socket = "{tmp / "server.sock"}"\n'
        'endpoint = "203.0.113.5:9621"\n' + textwrap.dedent(body) + textwrap.dedent(peers)
    )
    return path


def _pub() -> str:
    return keys.encode_key(keys.public_key(keys.generate_private_key()))


def test_same_key_same_ipv6_address_across_restarts(tmp_path: Path) -> None:
    a, b, c = _pub(), _pub(), _pub()
    peers = "".join(
        f'[[peers]]\nname = "{n}"\npublic_key = "{k}"\n' for n, k in (("a", a), ("b", b))
    )
    path = _server_config(tmp_path, 'network6 = "fd66:237::/64"\n', peers)
    cfg = load_server_config(path)
    with StateStore(cfg.state_dir / "gtun.sqlite") as store:
        first = {s.name: (s.address, s.address6) for s in collect_peers(cfg, store)}
    assert first["a"][1] is not None and first["b"][1] is not None
    assert first["a"][1] != first["b"][1]
    for spec_address, spec_address6 in first.values():
        assert spec_address6 == address6_for(cfg.network, NET6, spec_address)
    # A restart with another peer listed first, and a third one added: a and b keep
    # both of their addresses, the newcomer gets a free pair.
    peers2 = f'[[peers]]\nname = "c"\npublic_key = "{c}"\n' + "".join(
        f'[[peers]]\nname = "{n}"\npublic_key = "{k}"\n' for n, k in (("b", b), ("a", a))
    )
    cfg2 = load_server_config(_server_config(tmp_path, 'network6 = "fd66:237::/64"\n', peers2))
    with StateStore(cfg2.state_dir / "gtun.sqlite") as store:
        second = {s.name: (s.address, s.address6) for s in collect_peers(cfg2, store)}
    assert second["a"] == first["a"] and second["b"] == first["b"]
    assert second["c"][1] not in (first["a"][1], first["b"][1], cfg2.relay_address6)
    assert cfg2.relay_address6 == IPv6Address("fd66:237::1")


def test_fixed_address_fixes_the_ipv6_address(tmp_path: Path) -> None:
    peers = f'[[peers]]\nname = "a"\npublic_key = "{_pub()}"\naddress = "10.66.0.77"\n'
    cfg = load_server_config(_server_config(tmp_path, 'network6 = "fd66:237::/64"\n', peers))
    with StateStore(cfg.state_dir / "gtun.sqlite") as store:
        (spec,) = collect_peers(cfg, store)
    assert spec.address6 == IPv6Address("fd66:237::4d")


# --- configuration --------------------------------------------------------------------


def test_ipv6_routes_and_subnets_are_accepted(tmp_path: Path) -> None:
    peers = f'[[peers]]\nname = "a"\npublic_key = "{_pub()}"\nsubnets = ["fd88:237::/64"]\n'
    body = 'network6 = "fd66:237::/64"\nroutes = ["fd77:237::/64", "192.168.77.0/24"]\n'
    cfg = load_server_config(_server_config(tmp_path, body, peers))
    assert cfg.routes == (LAN6, ip_network("192.168.77.0/24"))
    assert cfg.peers[0].subnets == (SUBNET6,)


@pytest.mark.parametrize(
    ("body", "peers", "key", "fragment"),
    [
        ('network6 = "fd66::/121"\n', "", "server.network6", "/120 or shorter"),
        (
            'network6 = "fd66::/64"\n',
            '[[peers]]\nname = "a"\npublic_key = "{key}"\nsubnets = ["fd66::/80"]\n',
            "peers[0].subnets",
            "overlaps the virtual network6 fd66::/64",
        ),
    ],
)
def test_bad_ipv6_config(tmp_path: Path, body: str, peers: str, key: str, fragment: str) -> None:
    path = _server_config(tmp_path, body, peers.format(key=_pub()))
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert info.value.key == key
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_nat_masquerades_network6() -> None:
    rules = Nat("gtun0", [NET4, NET6]).ruleset()
    assert "ip saddr { 10.66.0.0/24 }" in rules
    assert 'ip6 saddr { fd66:237::/64 } oifname != "gtun0" masquerade' in rules


def test_enable_ipv6_writes_only_when_off(tmp_path: Path) -> None:
    conf = tmp_path / "net/ipv6/conf/gt6x"
    conf.mkdir(parents=True)
    (conf / "disable_ipv6").write_text("1\n")
    assert enable_ipv6("gt6x", proc_sys=tmp_path) is True
    assert (conf / "disable_ipv6").read_text().strip() == "0"
    assert enable_ipv6("gt6x", proc_sys=tmp_path) is False
    with pytest.raises(RuntimeFailure, match="gt6y"):
        enable_ipv6("gt6y", proc_sys=tmp_path)


# --- peer add and status ----------------------------------------------------------------


def test_peer_add_gives_stock_peers_ipv6(tmp_path: Path) -> None:
    body = 'network6 = "fd66:237::/64"\nroutes = ["fd77:237::/64"]\n'
    cfg = load_server_config(_server_config(tmp_path, body))
    text, note = add_peer(cfg, "phone", None)
    assert "Address = 10.66.0.2/24, fd66:237::2/64" in text
    assert "AllowedIPs = 10.66.0.0/24, fd66:237::/64, fd77:237::/64" in text
    assert note is not None and "not running" in note
    # Without network6, no IPv6 in the wg-quick text.
    plain = tmp_path / "plain"
    plain.mkdir()
    text2, _ = add_peer(load_server_config(_server_config(plain)), "phone", None)
    assert "Address = 10.66.0.2/24\n" in text2 and "fd66" not in text2
    with StateStore(tmp_path / "state/gtun.sqlite") as store:
        assert [p.name for p in store.peers()] == ["phone"]
        assert isinstance(store.peers()[0], StoredPeer)


def test_status_text_shows_ipv6(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = {
        "role": "relay",
        "device": "gtun0",
        "address": "10.66.0.1/24",
        "address6": "fd66:237::1/64",
        "public_key": "K",
        "peers": [
            {
                "name": "c1",
                "public_key": "P",
                "address": "10.66.0.2",
                "address6": "fd66:237::2",
                "endpoint": "10.237.1.2:4000",
                "transport": "udp",
                "rx_bytes": 1,
                "tx_bytes": 2,
                "last_handshake": None,
            }
        ],
        "drops": {},
    }
    monkeypatch.setattr("gtun.app.control.query", lambda path, request: answer)
    args = argparse.Namespace(socket=Path("/nonexistent.sock"), json=False)
    assert cli.status(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("relay gtun0 10.66.0.1/24 fd66:237::1/64")
    assert "10.66.0.2, fd66:237::2" in out


def test_eui64_link_local_sets_addr_gen_mode_once(tmp_path: Path) -> None:
    """A TAP device forms its link-local address from its MAC (the relay pins peers to
    it), whatever the host's default; no IPv6 at all is no error."""
    from gtun.system.ipv6 import eui64_link_local

    conf = tmp_path / "net/ipv6/conf/gtap0"
    conf.mkdir(parents=True)
    (conf / "addr_gen_mode").write_text("2\n")  # stable privacy
    assert eui64_link_local("gtap0", proc_sys=tmp_path) is True
    assert (conf / "addr_gen_mode").read_text() == "0\n"
    assert eui64_link_local("gtap0", proc_sys=tmp_path) is False
    assert eui64_link_local("missing0", proc_sys=tmp_path) is False
