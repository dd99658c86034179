"""Preshared keys (WireGuard's PSK, Noise IKpsk2), tier 1: the relay core gives each peer
its PeerSpec.preshared_key, the client core uses its own in every handshake, a changed
key on reload ends the sessions made with the old one, and a wrong key never connects:
the initiator cannot authenticate the response, and the relay, which cannot tell, counts
the sessions it answered that were never used (`unconfirmed`, SessionUnconfirmed)."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address
from typing import Any

import pytest

from gtun.core.client import ClientCore, Connected, KnownRelay
from gtun.core.packet import build_icmp_echo
from gtun.core.relay import PeerSetError, PeerSpec, Relay
from gtun.core.wg import SessionUnconfirmed, WireGuard
from gtun.core.wg.constants import REKEY_TIMEOUT
from gtun.testing.link import CoreLink, relay_settings

STOCK_ADDRESS = "10.66.0.9"


def psk() -> bytes:
    return secrets.token_bytes(32)


class Net(CoreLink):
    """A relay, a stock peer at "S" with PSK `stock_psk` as the stock peer has it (the
    relay is given `relay_psk`), and a gtun client c1 likewise."""

    def __init__(self, relay_psk: bytes | None, stock_psk: bytes | None, **client: Any) -> None:
        super().__init__(Relay(secrets.token_bytes(32), relay_settings()), now=1000.0)
        self.stock = WireGuard(secrets.token_bytes(32))
        self.stock_peer = self.stock.add_peer(
            self.relay.wg.public_key, preshared_key=stock_psk, endpoint="R"
        )
        c1 = ClientCore(
            secrets.token_bytes(32), self.relay.wg.public_key, "R", mode="tun", **client
        )
        self.add_client("c1", c1)
        self.specs = [
            PeerSpec(
                "stock", self.stock.public_key, IPv4Address(STOCK_ADDRESS), (), None, relay_psk
            ),
            PeerSpec("c1", c1.wg.public_key, IPv4Address("10.66.0.2"), (), None, relay_psk),
        ]
        self.relay.set_peers(self.specs)

    def stock_ping(self, seq: int) -> int:
        """The stock peer pings the relay; how many packets reached the relay's TUN."""
        before = len(self.tun_in)
        self.stock.send(
            self.stock_peer, build_icmp_echo(STOCK_ADDRESS, "10.66.0.1", 1, seq, b"p"), self.now
        )
        self.pump()
        return len(self.tun_in) - before

    def stock_retries(self) -> None:
        """Time passes until the stock peer's handshake retransmits, and it does."""
        self.now += REKEY_TIMEOUT + 1
        self.stock.handle_timer(self.now)
        self.pump()


def test_matching_preshared_keys_connect() -> None:
    key = psk()
    net = Net(key, key, preshared_key=key)
    assert net.stock_ping(1) == 1
    net.start("c1")
    assert any(isinstance(e, Connected) for e in net.events["c1"])
    assert net.clients["c1"].config is not None
    assert net.relay.drops["unconfirmed"] == 0


def test_a_wrong_preshared_key_never_connects_and_is_counted() -> None:
    net = Net(psk(), psk(), preshared_key=psk())
    assert net.stock_ping(1) == 0
    for _ in range(3):
        net.stock_retries()
    assert net.tun_in == []
    assert net.stock_peer.current is None  # the stock peer never had a session
    assert net.stock.drops["handshake"] >= 3  # it could not authenticate the responses
    stock = net.relay.peer_by_name("stock")
    assert stock is not None and stock.current is None
    # The relay answered each initiation; each answer replaced by the next was unused.
    assert stock.data.drops.get("unconfirmed", 0) >= 3
    assert net.relay.drops["unconfirmed"] >= 3
    assert any(isinstance(e, SessionUnconfirmed) and e.peer is stock for e in net.relay_events)
    # The gtun client with a wrong key: its handshakes fail, it never connects.
    c1 = net.clients["c1"]
    c1.start(net.now)
    net.pump()
    for _ in range(3):
        net.now += REKEY_TIMEOUT + 1
        c1.handle_timer(net.now)
        net.pump()
    assert not any(isinstance(e, Connected) for e in net.events["c1"])
    assert c1.config is None and c1.wg.drops["handshake"] >= 1


def test_no_preshared_key_on_one_side_only_never_connects() -> None:
    net = Net(psk(), None, preshared_key=None)
    assert net.stock_ping(1) == 0
    net.start("c1")
    assert net.clients["c1"].config is None


def test_a_new_preshared_key_on_reload_ends_the_old_sessions() -> None:
    old, new = psk(), psk()
    net = Net(old, old, preshared_key=old)
    net.start("c1")
    assert net.stock_ping(1) == 1
    stock = net.relay.peer_by_name("stock")
    c1 = net.relay.peer_by_name("c1")
    assert stock is not None and stock.current is not None and c1 is not None
    c1_session = c1.current
    # Only the stock peer's key changes: its sessions end now; c1's are kept.
    specs = [
        PeerSpec("stock", net.stock.public_key, IPv4Address(STOCK_ADDRESS), (), None, new),
        net.specs[1],
    ]
    assert net.relay.set_peers(specs) == ([], [])
    assert net.relay.peer_by_name("stock") is stock and stock.current is None
    assert stock.preshared_key == new
    assert c1.current is c1_session
    # The stock peer, still with the old key, cannot come back ...
    net.stock.remove_peer(net.stock_peer)
    net.stock_peer = net.stock.add_peer(net.relay.wg.public_key, preshared_key=old, endpoint="R")
    assert net.stock_ping(2) == 0
    # ... and with the new one it can (a while later: one initiation per 50 ms).
    net.now += 1
    net.stock.remove_peer(net.stock_peer)
    net.stock_peer = net.stock.add_peer(net.relay.wg.public_key, preshared_key=new, endpoint="R")
    assert net.stock_ping(3) == 1
    # Dropping the key (None) is a change as well.
    net.relay.set_peers([PeerSpec("stock", net.stock.public_key, IPv4Address(STOCK_ADDRESS))])
    assert stock.current is None and stock.preshared_key == bytes(32)


def test_a_malformed_preshared_key_is_refused_and_changes_nothing() -> None:
    key = psk()
    net = Net(key, key)
    assert net.stock_ping(1) == 1
    stock = net.relay.peer_by_name("stock")
    assert stock is not None
    session = stock.current
    bad = PeerSpec("stock", net.stock.public_key, IPv4Address(STOCK_ADDRESS), (), None, b"x" * 31)
    with pytest.raises(PeerSetError, match="stock: preshared key must be 32 bytes"):
        net.relay.set_peers([bad, net.specs[1]])
    assert stock.current is session and stock.preshared_key == key


def test_the_client_uses_its_key_with_every_relay_it_knows() -> None:
    key = psk()
    other = WireGuard(secrets.token_bytes(32)).public_key
    client = ClientCore(
        secrets.token_bytes(32),
        WireGuard(secrets.token_bytes(32)).public_key,
        "R",
        mode="tun",
        preshared_key=key,
        known=[KnownRelay("r2", other, "10.0.0.2:9621")],
    )
    assert client.server.preshared_key == key
    assert client.wg.peers[other].preshared_key == key
