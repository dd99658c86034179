"""Healing in seconds, the pure decisions (tier 1): a restarted relay handshakes with its
peers at their stored endpoints, spread over time, and at once when a peer's stale
session speaks from its stored endpoint; a client that roams tells the relay at once."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from gtun.core.client import CONNECTED, CONNECTING, REFUSED, ClientCore
from gtun.core.packet import build_icmp_echo
from gtun.core.relay import REJOIN_PER_TICK, REJOIN_TICK, PeerSpec, Relay
from gtun.core.wg.constants import MESSAGE_INITIATION, MESSAGE_TRANSPORT
from gtun.errors import RuntimeFailure
from gtun.system import journal
from gtun.system.nft import Forwarding
from gtun.testing.link import CoreLink, relay_settings


def two_clients() -> tuple[CoreLink, bytes, list[PeerSpec]]:
    relay_key = secrets.token_bytes(32)
    link = CoreLink(Relay(relay_key, relay_settings()), now=1000.0)
    specs = []
    for i, name in enumerate(("c1", "c2")):
        client = ClientCore(secrets.token_bytes(32), link.relay.wg.public_key, "R", mode="tun")
        link.add_client(name, client)
        specs.append(PeerSpec(name, client.wg.public_key, IPv4Address(f"10.66.0.{i + 2}")))
    link.relay.set_peers(specs)
    link.start()
    return link, relay_key, specs


def restart(link: CoreLink, relay_key: bytes, specs: list[PeerSpec]) -> Relay:
    """The relay comes back with the same key and peers, and no sessions."""
    relay = Relay(relay_key, relay_settings())
    relay.set_peers(specs)
    link.relay = relay
    return relay


def ping(link: CoreLink, src: str, dst: str) -> bool:
    """Whether a ping from client `src` reaches client `dst` now."""
    addr = {"c1": "10.66.0.2", "c2": "10.66.0.3"}
    link.take(dst)
    link.clients[src].tun_packet(build_icmp_echo(addr[src], addr[dst], 1, 1, b"x" * 16), link.now)
    link.pump()
    want = IPv4Address(addr[dst]).packed
    return any(isinstance(p, bytes) and p[16:20] == want for p in link.take(dst))


def test_a_restarted_relay_handshakes_with_stored_endpoints_and_traffic_flows() -> None:
    link, relay_key, specs = two_clients()
    assert ping(link, "c1", "c2")
    relay = restart(link, relay_key, specs)
    link.now += 30.0
    assert not ping(link, "c1", "c2")  # the stale session: dropped, nothing heals it yet
    stored = {s.public_key: s.name for s in specs}
    assert relay.rejoin(stored, link.now) == 2
    timer = relay.get_timer()
    assert timer is not None and timer <= link.now
    relay.handle_timer(link.now)
    link.pump()
    # One round trip, no client timer: both have a new session and their configuration.
    assert relay.wg.handshakes_completed == 2
    assert ping(link, "c1", "c2") and ping(link, "c2", "c1")
    for name in ("c1", "c2"):
        client = link.clients[name]
        assert client.state == CONNECTED and client.config is not None
        assert client.drops["not_configured"] == 0


def test_the_config_request_waits_for_the_relay_initiated_session() -> None:
    """A client that answers the relay's initiation asks for its configuration under
    the new session (the relay could not read the old one)."""
    link, relay_key, specs = two_clients()
    relay = restart(link, relay_key, specs)
    relay.rejoin({s.public_key: s.name for s in specs}, link.now)
    relay.handle_timer(link.now)
    link.pump()
    assert relay.drops.get("malformed", 0) == 0
    assert all(p.data.is_gtun for p in relay.wg.peers.values())  # asked: a gtun client


def test_rejoin_is_spread_over_time() -> None:
    relay = Relay(secrets.token_bytes(32), relay_settings())
    n = 3 * REJOIN_PER_TICK + 1
    specs = [
        PeerSpec(
            f"p{i}",
            ClientCore(secrets.token_bytes(32), relay.wg.public_key, None).wg.public_key,
            IPv4Address(f"10.66.0.{i + 2}"),
        )
        for i in range(n)
    ]
    relay.set_peers(specs)
    assert (
        relay.rejoin({s.public_key: ("192.0.2.1", 1000 + i) for i, s in enumerate(specs)}, 0.0) == n
    )
    sent = []
    now = 0.0
    for _ in range(4):
        relay.handle_timer(now)
        sent.append(len(relay.datagrams_to_send()))
        now += REJOIN_TICK
    assert sent == [REJOIN_PER_TICK, REJOIN_PER_TICK, REJOIN_PER_TICK, 1]
    assert relay.get_timer() is not None  # WireGuard's retransmits, no more rejoin ticks


def test_a_stale_session_from_a_stored_endpoint_starts_a_handshake_at_once() -> None:
    link, relay_key, specs = two_clients()
    relay = restart(link, relay_key, specs)
    relay.rejoin({s.public_key: s.name for s in specs}, link.now)
    # Before the spread-out rejoin reaches c1, c1 sends under its old session.
    c1 = link.clients["c1"]
    c1.tun_packet(build_icmp_echo("10.66.0.2", "10.66.0.3", 1, 1, b"x"), link.now)
    for data, _ in c1.datagrams_to_send():
        assert data[0] == MESSAGE_TRANSPORT
        relay.receive_datagram(data, "c1", link.now)
    out = relay.datagrams_to_send()
    assert [(d[0], addr) for d, addr in out] == [(MESSAGE_INITIATION, "c1")]
    relay.receive_datagram(data, "c1", link.now)  # again: WireGuard's rate limit holds
    assert relay.datagrams_to_send() == []
    # From an address that is no peer's stored endpoint: nothing.
    relay.receive_datagram(data, "elsewhere", link.now)
    assert relay.datagrams_to_send() == []


def test_roaming_sends_a_keepalive_at_once() -> None:
    link, _, _ = two_clients()
    c1 = link.clients["c1"]
    link.now += 1.0
    c1.roamed(link.now)
    out = c1.datagrams_to_send()
    assert [(d[0], len(d)) for d, _ in out] == [(MESSAGE_TRANSPORT, 32)]
    assert c1.state == CONNECTED


def test_roaming_while_connecting_handshakes_despite_the_rate_limit() -> None:
    client = ClientCore(secrets.token_bytes(32), secrets.token_bytes(32), ("192.0.2.1", 9621))
    client.start(0.0)
    assert [d[0] for d, _ in client.datagrams_to_send()] == [MESSAGE_INITIATION]
    client.roamed(0.5)  # within REKEY_TIMEOUT of the first
    assert [d[0] for d, _ in client.datagrams_to_send()] == [MESSAGE_INITIATION]
    assert client.state == CONNECTING


def test_a_refused_client_does_not_roam() -> None:
    client = ClientCore(secrets.token_bytes(32), secrets.token_bytes(32), ("192.0.2.1", 9621))
    client.state = REFUSED
    client.roamed(0.0)
    assert client.datagrams_to_send() == [] and client.state == REFUSED


def test_a_killed_relays_forwarding_is_restored_from_its_journal(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "net/ipv4").mkdir(parents=True)
    (proc / "net/ipv4/ip_forward").write_text("0\n")
    path = tmp_path / "state" / "host-server.json"
    forwarding = Forwarding(proc)
    changes = journal.HostChanges(pid=2**22 + 7, config="server.toml")

    def record(sysctls: dict[str, str]) -> None:
        changes.sysctls = sysctls
        journal.record_host(path, changes)

    forwarding.enable(record=record)  # ... and the relay is killed: no restore()
    assert (proc / "net/ipv4/ip_forward").read_text().strip() == "1"
    assert journal.recover_host(path, proc)
    assert (proc / "net/ipv4/ip_forward").read_text().strip() == "0"
    assert not path.exists()
    assert not journal.recover_host(path, proc)  # nothing left: nothing to do


def test_a_damaged_journal_is_refused_not_obeyed(tmp_path: Path) -> None:
    path = tmp_path / "host-server.json"
    path.write_text('{"version": 1, "pid": 1, "config": "x", "sysctls": {"kernel/x": "1"}}')
    with pytest.raises(RuntimeFailure, match="damaged journal"):
        journal.recover_host(path, tmp_path)
    assert path.exists()
