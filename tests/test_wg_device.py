"""Two sans-IO WireGuard devices wired through an in-memory link and a fake clock.

Nothing here touches a socket or the real clock: every datagram a device hands back
from datagrams_to_send() is delivered (or lost, duplicated, reordered) by `Link`, and
time only moves when a test moves it, firing timers through get_timer()/handle_timer().
"""

from __future__ import annotations

import random
import struct
import warnings
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# On a failing example hypothesis imports its patch writer, which drags in a deprecated
# mypy_extensions.TypedDict; with warnings as errors that hides the real failure behind
# an INTERNALERROR.  Import it here once, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

from gtun.core.wg import (
    Event,
    HandshakeCompleted,
    HandshakeTimedOut,
    PacketReceived,
    Peer,
    PeerUnknown,
    WireGuard,
)
from gtun.core.wg import messages as m
from gtun.core.wg.constants import (
    COOKIE_REPLY_SIZE,
    HANDSHAKE_INITIATION_RATE,
    INITIATION_SIZE,
    KEEPALIVE_TIMEOUT,
    LABEL_MAC1,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    RESPONSE_SIZE,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
    UNDER_LOAD_HOLD,
)
from gtun.core.wg.crypto import hash_, mac
from gtun.core.wg.device import overhead

START = 1000.0  # the fake monotonic clock starts here
WALL_OFFSET = 1_700_000_000.0  # monotonic -> Unix time, for the TAI64N timestamps
KEEPALIVE_SIZE = 32  # a transport message with an empty payload


# --- the harness ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = START


@dataclass
class Node:
    """One device, the address it lives at, and every event it handed back."""

    name: str
    wg: WireGuard
    addr: tuple[str, int]
    events: list[Event] = field(default_factory=list)

    def drain_events(self) -> None:
        while (event := self.wg.next_event()) is not None:
            self.events.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        self.drain_events()
        return [e for e in self.events if isinstance(e, kind)]

    def received(self) -> list[bytes]:
        return [e.data for e in self.of(PacketReceived)]


@dataclass(frozen=True)
class Sent:
    at: float
    data: bytes
    src: Hashable
    dst: Hashable

    @property
    def kind(self) -> int:
        return m.message_type(self.data)


class Link:
    """Pumps each node's datagrams_to_send() into receive_datagram() of the node at the
    destination address.  Datagrams to an unknown address vanish.  `loss`, `duplicate`
    and `reorder` are probabilities; `down` drops everything (both ways)."""

    def __init__(
        self,
        clock: Clock,
        *nodes: Node,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.clock = clock
        self.nodes = {n.addr: n for n in nodes}
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.down = False
        self.rng = random.Random(seed)
        self.log: list[Sent] = []  # every datagram handed back by a device
        self.in_flight: list[Sent] = []

    def collect(self) -> list[Sent]:
        """Take what every device wants to send, without delivering it."""
        out: list[Sent] = []
        for node in self.nodes.values():
            node.drain_events()
            for data, dst in node.wg.datagrams_to_send():
                sent = Sent(self.clock.now, data, node.addr, dst)
                self.log.append(sent)
                out.append(sent)
        return out

    def deliver(self, sent: Sent, data: bytes | None = None) -> None:
        node = self.nodes.get(sent.dst)
        if node is not None:
            node.wg.receive_datagram(sent.data if data is None else data, sent.src, self.clock.now)
            node.drain_events()

    def pump(self, collected: list[Sent] | None = None) -> None:
        """Deliver until no device has anything more to send (first `collected`, datagrams
        a test took with collect() to look at)."""
        self.in_flight.extend(collected or [])
        for _ in range(10_000):
            for sent in self.collect():
                if self.down or self.rng.random() < self.loss:
                    continue
                self.in_flight.append(sent)
                if self.rng.random() < self.duplicate:
                    self.in_flight.append(sent)
            if not self.in_flight:
                return
            if self.reorder and len(self.in_flight) > 1 and self.rng.random() < self.reorder:
                self.rng.shuffle(self.in_flight)
            batch, self.in_flight = self.in_flight, []
            for sent in batch:
                self.deliver(sent)
        raise AssertionError("the link never went quiet")

    def run_until(self, t: float) -> None:
        """Advance the clock to `t`, firing each device's timers when they fall due."""
        self.pump()
        for _ in range(100_000):
            due = [d for n in self.nodes.values() if (d := n.wg.get_timer()) is not None]
            if not due or min(due) > t:
                break
            self.clock.now = max(self.clock.now, min(due))
            for node in self.nodes.values():
                deadline = node.wg.get_timer()
                if deadline is not None and deadline <= self.clock.now:
                    node.wg.handle_timer(self.clock.now)
            self.pump()
        else:
            raise AssertionError("timers kept firing without time moving on")
        self.clock.now = max(self.clock.now, t)
        self.pump()

    def advance(self, dt: float) -> None:
        self.run_until(self.clock.now + dt)

    def sent(self, src: Node, kind: int | None = None, since: float = -1.0) -> list[Sent]:
        return [
            s
            for s in self.log
            if s.src == src.addr and (kind is None or s.kind == kind) and s.at >= since
        ]


def _key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def make_node(name: str, index: int, **kwargs: Any) -> Node:
    wg = WireGuard(_key(), wall_offset=WALL_OFFSET, rng=random.Random(index), **kwargs)
    return Node(name, wg, (f"10.0.0.{index}", 51820))


@dataclass
class Pair:
    clock: Clock
    link: Link
    a: Node  # the initiator: knows b's endpoint
    b: Node  # the responder: learns a's endpoint from its first initiation
    pa: Peer  # b as seen by a
    pb: Peer  # a as seen by b

    def handshake(self) -> None:
        self.a.wg.initiate_handshake(self.pa, self.clock.now)
        self.link.pump()
        assert self.pa.has_session and self.pb.has_session


def make_pair(
    *,
    a_keepalive: float = 0.0,
    b_knows_a: bool = True,
    b_endpoint: bool = False,
    **link_kwargs: Any,
) -> Pair:
    clock = Clock()
    a, b = make_node("a", 1), make_node("b", 2)
    pa = a.wg.add_peer(b.wg.public_key, endpoint=b.addr, persistent_keepalive=a_keepalive)
    pb = (
        b.wg.add_peer(a.wg.public_key, endpoint=a.addr if b_endpoint else None)
        if b_knows_a
        else None
    )
    link = Link(clock, a, b, **link_kwargs)
    return Pair(clock, link, a, b, pa, pb)  # type: ignore[arg-type]


def padded(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % 16)


def transport_of(node_sent: list[Sent]) -> list[Sent]:
    return [s for s in node_sent if s.kind == MESSAGE_TRANSPORT]


# --- API misuse (local errors) -------------------------------------------------------


def test_add_peer_rejects_misuse() -> None:
    wg = WireGuard(_key())
    with pytest.raises(ValueError):
        WireGuard(b"\x01" * 31)
    with pytest.raises(ValueError):
        wg.add_peer(b"\x01" * 31)
    with pytest.raises(ValueError):
        wg.add_peer(wg.public_key)
    with pytest.raises(ValueError):
        wg.add_peer(bytes(32))  # low order: no shared secret
    other = WireGuard(_key()).public_key
    with pytest.raises(ValueError):
        wg.add_peer(other, preshared_key=b"short")
    wg.add_peer(other)
    with pytest.raises(ValueError):
        wg.add_peer(other)
    assert list(wg.peers) == [other]


def test_a_change_of_several_peers_is_all_or_nothing() -> None:
    wg = WireGuard(_key())
    kept, leaving = (wg.add_peer(WireGuard(_key()).public_key) for _ in range(2))
    before = dict(wg.peers)
    fresh = wg.new_peer(WireGuard(_key()).public_key)
    assert fresh.public_key not in wg.peers  # checked, not added
    with pytest.raises(ValueError):
        wg.new_peer(bytes(32))  # low order, refused before anything changes
    stranger = WireGuard(_key()).add_peer(WireGuard(_key()).public_key)
    twin = wg.new_peer(fresh.public_key)
    for add, remove in (
        ([fresh], [leaving, stranger]),  # removing a peer that is not ours
        ([fresh, twin], [leaving]),  # one key twice
        ([wg.new_peer(WireGuard(_key()).public_key), kept], [leaving]),  # still present
    ):
        with pytest.raises(ValueError):
            wg.update_peers(add=add, remove=remove)
        assert wg.peers == before
    wg.update_peers(add=[fresh], remove=[leaving])
    assert wg.peers == {kept.public_key: kept, fresh.public_key: fresh}


# --- handshake and data --------------------------------------------------------------


def test_handshake_completes() -> None:
    p = make_pair()
    p.handshake()
    kinds = [(s.src, s.kind) for s in p.link.log]
    assert kinds == [
        (p.a.addr, MESSAGE_INITIATION),
        (p.b.addr, MESSAGE_RESPONSE),
        (p.a.addr, MESSAGE_TRANSPORT),  # the keepalive that confirms the session to b
    ]
    assert len(p.link.log[0].data) == INITIATION_SIZE
    assert len(p.link.log[1].data) == RESPONSE_SIZE
    assert len(p.link.log[2].data) == KEEPALIVE_SIZE
    [done_a] = p.a.of(HandshakeCompleted)
    [done_b] = p.b.of(HandshakeCompleted)
    assert done_a.peer is p.pa and done_a.initiator
    assert done_b.peer is p.pb and not done_b.initiator
    assert p.pb.endpoint == p.a.addr  # learnt from the initiation
    assert p.a.wg.handshakes_completed == p.b.wg.handshakes_completed == 1
    assert p.a.received() == p.b.received() == []  # a keepalive is not a packet
    assert sum(p.a.wg.drops.values()) == sum(p.b.wg.drops.values()) == 0


def test_handshake_with_preshared_key() -> None:
    clock = Clock()
    a, b = make_node("a", 1), make_node("b", 2)
    psk = bytes(range(32))
    pa = a.wg.add_peer(b.wg.public_key, endpoint=b.addr, preshared_key=psk)
    pb = b.wg.add_peer(a.wg.public_key, preshared_key=psk)
    link = Link(clock, a, b)
    a.wg.send(pa, b"with psk", clock.now)
    link.pump()
    assert b.received() == [padded(b"with psk")]
    assert pa.has_session and pb.has_session


def test_mismatched_preshared_key_fails() -> None:
    clock = Clock()
    a, b = make_node("a", 1), make_node("b", 2)
    pa = a.wg.add_peer(b.wg.public_key, endpoint=b.addr, preshared_key=bytes(range(32)))
    b.wg.add_peer(a.wg.public_key, preshared_key=bytes(32))
    link = Link(clock, a, b)
    a.wg.initiate_handshake(pa, clock.now)
    link.pump()
    assert not pa.has_session
    assert a.wg.drops["handshake"] == 1  # the response does not authenticate
    assert a.of(HandshakeCompleted) == []


@pytest.mark.parametrize("size", [1, 15, 16, 17, 100, 1279, 1280, 1420])
def test_data_both_ways(size: int) -> None:
    p = make_pair()
    p.handshake()
    to_b = bytes(random.Random(size).randbytes(size - 1)) + b"\xff"  # no trailing zero
    to_a = b"\x01" * size
    p.a.wg.send(p.pa, to_b, p.clock.now)
    p.b.wg.send(p.pb, to_a, p.clock.now)
    p.link.pump()
    [got_b] = p.b.received()
    [got_a] = p.a.received()
    for got, sent in ((got_b, to_b), (got_a, to_a)):
        assert len(got) % 16 == 0
        assert got == padded(sent)
        assert got.rstrip(b"\x00") == sent
    data = transport_of(p.link.sent(p.a))[-1].data
    assert len(data) == 16 + len(padded(to_b)) + 16 == size + overhead(size)
    assert p.pa.tx_packets == p.pa.rx_packets == 1
    assert [e.peer for e in p.b.of(PacketReceived)] == [p.pb]


def test_send_many_is_send_for_each_packet() -> None:
    """A batch (the segments of a super-packet) arrives as sending each would: in order,
    padded, counted, with the same timers armed; without a session it is staged."""
    p = make_pair()
    batch = [bytes([i + 1]) * (1000 + i) for i in range(20)]
    p.a.wg.send_many(p.pa, batch[:5], p.clock.now)  # no session yet: staged, handshake
    assert len(p.pa.staged) == 5
    p.link.pump()
    p.a.wg.send_many(p.pa, batch[5:], p.clock.now)
    p.link.pump()
    assert p.b.received() == [padded(pkt) for pkt in batch]
    assert p.pa.tx_packets == 20 and p.pb.rx_packets == 20
    assert p.pa.t_new_handshake is not None  # "data sent" armed the handshake timer
    counters = [struct.unpack_from("<Q", s.data, 8)[0] for s in transport_of(p.link.sent(p.a))]
    assert counters == sorted(set(counters))  # one nonce each, increasing


def test_on_packet_fast_lane_replaces_the_event() -> None:
    """With on_packet set, each payload goes to it (peer, padded payload, now), in
    order, and no PacketReceived event is made; the callback may send at once."""
    p = make_pair()
    p.handshake()
    got: list[tuple[Peer, bytes, float]] = []

    def on_packet(peer: Peer, payload: bytes, now: float) -> None:
        got.append((peer, payload, now))
        p.b.wg.send(peer, b"echo:" + payload[:1], now)

    p.b.wg.on_packet = on_packet
    for i in range(3):
        p.a.wg.send(p.pa, bytes([i + 1]) * 20, p.clock.now)
    p.link.pump()
    assert [(peer, data) for peer, data, _ in got] == [
        (p.pb, padded(bytes([i + 1]) * 20)) for i in range(3)
    ]
    assert p.b.of(PacketReceived) == []
    assert p.a.received() == [padded(b"echo:" + bytes([i + 1])) for i in range(3)]


def test_mtu_caps_padding() -> None:
    clock = Clock()
    a = Node("a", WireGuard(_key(), mtu=1420, rng=random.Random(1)), ("10.0.0.1", 1))
    b = make_node("b", 2)
    pa = a.wg.add_peer(b.wg.public_key, endpoint=b.addr)
    b.wg.add_peer(a.wg.public_key)
    link = Link(clock, a, b)
    a.wg.send(pa, b"\x07" * 1419, clock.now)  # padding to 1424 would exceed the MTU
    link.pump()
    assert b.received() == [b"\x07" * 1419 + b"\x00"]


def test_staged_packets_flushed_in_order_after_first_handshake() -> None:
    p = make_pair()
    packets = [bytes([i]) * (i + 1) for i in range(10)]
    for pkt in packets:
        p.a.wg.send(p.pa, pkt, p.clock.now)
    assert len(p.link.sent(p.a)) == 0  # nothing collected yet
    p.link.pump()
    assert len(p.link.sent(p.a, MESSAGE_INITIATION)) == 1  # one handshake, not ten
    assert p.b.received() == [padded(pkt) for pkt in packets]


def test_responder_cannot_send_until_confirmed() -> None:
    p = make_pair()
    link, now = p.link, p.clock.now
    p.a.wg.initiate_handshake(p.pa, now)
    [init] = link.collect()
    link.deliver(init)
    [resp] = link.collect()
    assert resp.kind == MESSAGE_RESPONSE
    assert p.pb.current is None and p.pb.next is not None  # derived, not confirmed

    p.b.wg.send(p.pb, b"too early", now)
    early = link.collect()
    assert [s for s in early if s.kind == MESSAGE_TRANSPORT] == []
    assert list(p.pb.staged) == [b"too early"]

    link.deliver(resp)  # a gets its keys and sends a keepalive under them
    [confirm] = link.collect()
    assert confirm.kind == MESSAGE_TRANSPORT and len(confirm.data) == KEEPALIVE_SIZE
    link.deliver(confirm)
    assert p.pb.current is not None and p.pb.next is None
    flushed = [s for s in link.collect() if s.kind == MESSAGE_TRANSPORT]
    assert len(flushed) == 1 and not p.pb.staged
    link.deliver(flushed[0])
    assert p.a.received() == [padded(b"too early")]

    p.b.wg.send(p.pb, b"now fine", now)
    link.pump()
    assert p.a.received()[-1] == padded(b"now fine")


def test_simultaneous_initiation() -> None:
    p = make_pair(b_endpoint=True)
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    p.b.wg.initiate_handshake(p.pb, p.clock.now)
    p.link.pump()
    assert p.pa.has_session and p.pb.has_session
    p.a.wg.send(p.pa, b"from a", p.clock.now)
    p.b.wg.send(p.pb, b"from b", p.clock.now)
    p.link.pump()
    assert p.b.received()[-1:] == [padded(b"from a")]
    assert p.a.received()[-1:] == [padded(b"from b")]
    assert p.a.wg.drops["decrypt"] == p.b.wg.drops["decrypt"] == 0


def test_lossy_reordering_duplicating_link() -> None:
    p = make_pair(loss=0.2, duplicate=0.2, reorder=0.5, seed=7)
    sent = [i.to_bytes(2, "big") + b"payload" for i in range(200)]
    for pkt in sent:
        p.a.wg.send(p.pa, pkt, p.clock.now)
        p.link.advance(0.1)
    p.link.advance(30.0)
    got = [g.rstrip(b"\x00") for g in p.b.received()]
    assert len(got) == len(set(got))  # duplicates never reach the application
    assert set(got) <= set(sent)
    assert len(got) > len(sent) // 2
    assert p.pa.has_session and p.pb.has_session
    assert p.b.wg.drops["replay"] > 0  # the duplicated transport messages
    assert p.b.wg.drops["decrypt"] == 0


# --- refusals ------------------------------------------------------------------------


def test_unknown_peer() -> None:
    p = make_pair(b_knows_a=False)
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    p.link.pump()
    [unknown] = p.b.of(PeerUnknown)
    assert unknown.public_key == p.a.wg.public_key
    assert unknown.addr == p.a.addr
    assert p.b.wg.drops["unknown_peer"] == 1
    assert p.link.sent(p.b) == []
    assert not p.pa.has_session


def test_wrong_server_key_fails_mac1() -> None:
    clock = Clock()
    a, b = make_node("a", 1), make_node("b", 2)
    wrong = WireGuard(_key()).public_key  # a thinks b has this key
    pa = a.wg.add_peer(wrong, endpoint=b.addr)
    b.wg.add_peer(a.wg.public_key)
    link = Link(clock, a, b)
    a.wg.initiate_handshake(pa, clock.now)
    link.pump()
    assert b.wg.drops["mac1"] == 1
    assert sum(b.wg.drops.values()) == 1
    assert link.sent(b) == []
    assert b.of(Event) == []


def test_replayed_initiation() -> None:
    p = make_pair()
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    [init] = p.link.collect()
    p.link.deliver(init)
    [resp] = p.link.collect()
    offered = p.pb.next
    for dt in (0.0, 1.0, 30.0):  # the same bytes again, now and later
        p.clock.now += dt
        p.link.deliver(init)
        assert p.link.collect() == []
    assert p.b.wg.drops["replayed_handshake"] == 3
    assert p.pb.next is offered  # no new session
    assert p.b.wg.handshakes_completed == 1
    assert len(p.b.of(HandshakeCompleted)) == 1
    # The genuine exchange still completes.
    p.link.deliver(resp)
    p.link.pump()
    assert p.pa.has_session and p.pb.has_session


def test_replayed_transport() -> None:
    p = make_pair()
    p.handshake()
    p.a.wg.send(p.pa, b"once", p.clock.now)
    [data] = p.link.collect()
    p.link.deliver(data)
    p.link.deliver(data)
    p.link.deliver(data)
    assert p.b.received() == [padded(b"once")]
    assert p.b.wg.drops["replay"] == 2
    # An older, never-seen counter within the window is still fine.
    p.a.wg.send(p.pa, b"later-1", p.clock.now)
    p.a.wg.send(p.pa, b"later-2", p.clock.now)
    first, second = p.link.collect()
    p.link.deliver(second)
    p.link.deliver(first)
    assert p.b.received()[1:] == [padded(b"later-2"), padded(b"later-1")]


def _flip(data: bytes, index: int) -> bytes:
    bad = bytearray(data)
    bad[index] ^= 0x01
    return bytes(bad)


def test_tampered_transport() -> None:
    p = make_pair()
    p.handshake()
    p.a.wg.send(p.pa, b"precious", p.clock.now)
    [data] = p.link.collect()
    for i in (16, 20, len(data.data) - 1):  # ciphertext and tag
        p.link.deliver(data, _flip(data.data, i))
    assert p.b.wg.drops["decrypt"] == 3
    # A forged counter (nonce) must not advance the replay window.
    forged = data.data[:8] + struct.pack("<Q", 1 << 40) + data.data[16:]
    p.link.deliver(data, forged)
    assert p.b.wg.drops["decrypt"] == 4
    p.link.deliver(data, _flip(data.data, 4))  # receiver index
    assert p.b.wg.drops["unknown_index"] == 1
    p.link.deliver(data, _flip(data.data, 1))  # reserved byte
    assert p.b.wg.drops["malformed"] == 1
    assert p.b.received() == []
    p.link.deliver(data)  # the genuine message is still accepted afterwards
    assert p.b.received() == [padded(b"precious")]


def test_tampered_handshake_messages() -> None:
    p = make_pair()
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    [init] = p.link.collect()
    p.link.deliver(init, _flip(init.data, 50))  # in the encrypted static, mac1 catches it
    assert p.b.wg.drops["mac1"] == 1
    p.link.deliver(init)
    [resp] = p.link.collect()
    p.link.deliver(resp, _flip(resp.data, 20))
    assert p.a.wg.drops["mac1"] == 1
    assert not p.pa.has_session
    p.link.deliver(resp)
    p.link.pump()
    assert p.pa.has_session and p.pb.has_session


# --- garbage ------------------------------------------------------------------------


@dataclass
class Established:
    """One session set up once for the fuzz test, with samples of real datagrams."""

    pair: Pair
    samples: list[bytes]


_ESTABLISHED: list[Established] = []


def _established() -> Established:
    if not _ESTABLISHED:
        p = make_pair()
        p.a.wg.send(p.pa, b"sample", p.clock.now)
        p.link.pump()
        samples = [s.data for s in p.link.log]
        # A cookie reply too, from a responder under load.
        p.b.wg.force_under_load = True
        p.clock.now += REKEY_TIMEOUT + 1
        p.a.wg.initiate_handshake(p.pa, p.clock.now)
        [init] = p.link.collect()
        p.link.deliver(init)
        [cookie] = p.link.collect()
        assert cookie.kind == MESSAGE_COOKIE_REPLY and len(cookie.data) == COOKIE_REPLY_SIZE
        p.link.deliver(cookie)
        p.b.wg.force_under_load = False
        # (Not the initiation itself: it was never consumed, so with only its mac2
        # changed it is a genuine initiation once b is no longer under load.)
        samples.append(cookie.data)
        _ESTABLISHED.append(Established(p, samples))
    return _ESTABLISHED[0]


def _with_mac1(body: bytes, public_key: bytes) -> bytes:
    """A datagram whose mac1 is valid for `public_key`, so it reaches the Noise code."""
    return body + mac(hash_(LABEL_MAC1, public_key), body) + bytes(16)


@st.composite
def garbage(draw: st.DrawFn) -> tuple[int, bytes]:
    target = draw(st.sampled_from([0, 1]))  # a or b
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return target, draw(st.binary(max_size=256))
    if choice == 1:  # a plausible header, any length
        kind = draw(st.integers(0, 5))
        return target, bytes([kind, 0, 0, 0]) + draw(st.binary(max_size=200))
    if choice == 2:  # a real datagram with some bytes changed or cut
        sample = draw(st.sampled_from(_established().samples))
        data = bytearray(sample)
        where = st.integers(0, len(data) - 1)
        for i in draw(st.sets(where, min_size=1, max_size=4)):  # distinct: a real change
            data[i] ^= draw(st.integers(1, 255))
        cut = draw(st.integers(0, len(data)))
        return target, bytes(data[: cut if draw(st.booleans()) else len(data)])
    # Handshake messages with a valid mac1, so that the Noise code runs on garbage.
    p = _established().pair
    node = (p.a, p.b)[target]
    kind, size = draw(st.sampled_from([(1, INITIATION_SIZE), (2, RESPONSE_SIZE)]))
    body = bytes([kind, 0, 0, 0]) + draw(st.binary(min_size=size - 36, max_size=size - 36))
    if choice == 4 and kind == 1:
        body = body[:8] + bytes(32) + body[40:]  # a low-order ephemeral key
    return target, _with_mac1(body, node.wg.public_key)


@settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(garbage())
def test_garbage_never_raises_and_is_counted(case: tuple[int, bytes]) -> None:
    target, data = case
    p = _established().pair
    node = (p.a, p.b)[target]
    before = sum(node.wg.drops.values())
    node.drain_events()
    events_before = len(node.events)
    node.wg.receive_datagram(data, ("192.0.2.66", 6666), p.clock.now)
    assert sum(node.wg.drops.values()) == before + 1
    node.drain_events()
    new_events = node.events[events_before:]
    assert not [e for e in new_events if isinstance(e, PacketReceived | HandshakeCompleted)]
    node.wg.datagrams_to_send()  # cookie replies under load would be fine; discard
    assert p.pa.has_session and p.pb.has_session


def test_garbage_leaves_session_working() -> None:
    p = _established().pair
    for node in (p.a, p.b):
        node.wg.receive_datagram(b"\x04\x00\x00\x00" + bytes(100), ("192.0.2.1", 1), 0.0)
    p.a.wg.send(p.pa, b"still here", p.clock.now)
    p.link.pump()
    assert p.b.received()[-1] == padded(b"still here")


# --- under load: cookies -------------------------------------------------------------


def test_under_load_cookie_then_handshake() -> None:
    p = make_pair()
    p.b.wg.force_under_load = True
    start = p.clock.now
    p.a.wg.send(p.pa, b"through the cookie", start)
    p.link.pump()
    # The first initiation has no mac2: answered with a cookie reply, not a response.
    assert [s.kind for s in p.link.log] == [MESSAGE_INITIATION, MESSAGE_COOKIE_REPLY]
    assert p.link.log[0].data[-16:] == bytes(16)
    assert p.b.wg.drops["cookie"] == 1
    assert p.a.wg.drops["handshake"] == 0  # the cookie reply was accepted
    assert not p.pa.has_session and p.b.of(HandshakeCompleted) == []

    # The retransmission carries mac2 under the cookie and gets through.
    p.link.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 0.01)
    inits = p.link.sent(p.a, MESSAGE_INITIATION)
    assert len(inits) == 2
    assert inits[1].data[-16:] != bytes(16)
    assert REKEY_TIMEOUT <= inits[1].at - start <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX
    assert p.b.wg.drops["cookie"] == 1
    assert p.pa.has_session and p.pb.has_session
    assert p.b.received() == [padded(b"through the cookie")]


def test_under_load_cookie_is_bound_to_the_source_address() -> None:
    p = make_pair()
    p.b.wg.force_under_load = True
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    p.link.pump()  # cookie stored by a
    p.link.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    [_, retry] = p.link.sent(p.a, MESSAGE_INITIATION)
    # The same initiation (mac2 valid for a's address) from elsewhere earns another cookie.
    p.pb.last_timestamp = b""  # so that only the mac2 check can refuse it
    p.b.wg.receive_datagram(retry.data, ("198.51.100.7", 1), p.clock.now + 1)
    [(reply, addr)] = p.b.wg.datagrams_to_send()
    assert m.message_type(reply) == MESSAGE_COOKIE_REPLY and addr == ("198.51.100.7", 1)
    assert p.b.wg.drops["cookie"] == 2


def test_unsolicited_cookie_reply_is_dropped() -> None:
    p = make_pair()
    p.handshake()
    reply = m.push_cookie_reply(m.CookieReply(0x12345678, bytes(24), bytes(32)))
    p.a.wg.receive_datagram(reply, p.b.addr, p.clock.now)
    assert p.a.wg.drops["unknown_index"] == 1
    # Addressed to a live index but not decryptable.
    index = p.pa.current.local_index  # type: ignore[union-attr]
    reply = m.push_cookie_reply(m.CookieReply(index, bytes(24), bytes(32)))
    p.a.wg.receive_datagram(reply, p.b.addr, p.clock.now)
    assert p.a.wg.drops["handshake"] == 1


# --- timers --------------------------------------------------------------------------


def test_retransmission_then_timeout_drops_staged() -> None:
    p = make_pair()
    p.link.down = True
    start = p.clock.now
    p.a.wg.send(p.pa, b"lost-1", start)
    p.a.wg.send(p.pa, b"lost-2", start)
    p.link.run_until(start + REKEY_ATTEMPT_TIME - 0.01)
    assert p.a.of(HandshakeTimedOut) == []  # still trying, packets still held
    assert list(p.pa.staged) == [b"lost-1", b"lost-2"]
    p.link.run_until(start + REKEY_ATTEMPT_TIME + 2 * REKEY_TIMEOUT + 2)
    [timed_out] = p.a.of(HandshakeTimedOut)  # about REKEY_ATTEMPT_TIME after the first
    assert timed_out.peer is p.pa
    assert not p.pa.staged
    assert p.pa.handshake is None
    inits = p.link.sent(p.a, MESSAGE_INITIATION)
    gaps = [b.at - a.at for a, b in zip(inits, inits[1:], strict=False)]
    assert MAX_TIMER_HANDSHAKES <= len(inits) <= MAX_TIMER_HANDSHAKES + 2
    assert all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX for g in gaps)
    assert len({i.data for i in inits}) == len(inits)  # fresh ephemeral each time
    # Then it goes quiet.
    p.link.advance(5 * REKEY_TIMEOUT)
    assert len(p.link.sent(p.a, MESSAGE_INITIATION)) == len(inits)
    assert len(p.a.of(HandshakeTimedOut)) == 1

    # The link comes back: a new packet goes through, the dropped ones do not.
    p.link.down = False
    p.a.wg.send(p.pa, b"fresh", p.clock.now)
    p.link.pump()
    assert p.b.received() == [padded(b"fresh")]


def test_handshake_completes_over_a_link_that_was_down() -> None:
    p = make_pair()
    p.link.down = True
    p.a.wg.send(p.pa, b"eventually", p.clock.now)
    p.link.advance(12.0)  # two retransmissions lost
    p.link.down = False
    p.link.advance(6.0)
    assert p.b.received() == [padded(b"eventually")]
    assert len(p.link.sent(p.a, MESSAGE_INITIATION)) == 4


def test_keepalive_after_receiving_data_when_nothing_sent() -> None:
    p = make_pair()
    p.handshake()
    t1 = p.clock.now + 1
    p.link.run_until(t1)
    p.a.wg.send(p.pa, b"ping", t1)
    p.link.run_until(t1 + KEEPALIVE_TIMEOUT - 0.01)
    assert transport_of(p.link.sent(p.b)) == []
    p.link.run_until(t1 + KEEPALIVE_TIMEOUT + 0.01)
    [keepalive] = transport_of(p.link.sent(p.b))
    assert len(keepalive.data) == KEEPALIVE_SIZE
    assert keepalive.at == pytest.approx(t1 + KEEPALIVE_TIMEOUT)
    # The keepalive reached a: no new handshake follows for the unanswered data.
    p.link.advance(60.0)
    assert len(p.link.sent(p.a, MESSAGE_INITIATION)) == 1
    assert transport_of(p.link.sent(p.b)) == [keepalive]


def test_no_keepalive_when_data_was_sent_back() -> None:
    p = make_pair()
    p.handshake()
    t1 = p.clock.now
    p.a.wg.send(p.pa, b"ping", t1)
    p.link.run_until(t1 + 2)
    p.b.wg.send(p.pb, b"pong", p.clock.now)
    p.link.run_until(t1 + 30)
    b_transport = transport_of(p.link.sent(p.b))
    assert len(b_transport) == 1 and len(b_transport[0].data) > KEEPALIVE_SIZE
    # a received data and sent none back: a's keepalive goes out 10 s after the pong.
    a_keepalives = [s for s in transport_of(p.link.sent(p.a, since=t1 + 2))]
    assert [s.at for s in a_keepalives] == [pytest.approx(t1 + 2 + KEEPALIVE_TIMEOUT)]


def test_persistent_keepalive() -> None:
    p = make_pair(a_keepalive=25.0)
    p.handshake()
    t0 = p.clock.now
    p.link.run_until(t0 + 80)
    keepalives = transport_of(p.link.sent(p.a, since=t0 + 0.001))
    assert [round(s.at - t0, 6) for s in keepalives] == [25.0, 50.0, 75.0]
    assert all(len(s.data) == KEEPALIVE_SIZE for s in keepalives)
    assert p.link.sent(p.b, since=t0 + 0.001) == []  # b has no persistent keepalive
    # Traffic either way pushes the next keepalive back: a sends data at 80, b's
    # keepalive for it arrives at 90, so a's next persistent keepalive is due at 115.
    p.a.wg.send(p.pa, b"data", t0 + 80)
    p.link.run_until(t0 + 114)
    assert [round(s.at - t0, 6) for s in transport_of(p.link.sent(p.b))] == [90.0]
    assert len(transport_of(p.link.sent(p.a, since=t0 + 80.5))) == 0
    p.link.run_until(t0 + 116)
    [late] = transport_of(p.link.sent(p.a, since=t0 + 80.5))
    assert late.at - t0 == pytest.approx(115.0)


def test_new_handshake_when_data_sent_and_nothing_received() -> None:
    p = make_pair()
    p.handshake()
    t1 = p.clock.now + 1
    p.link.run_until(t1)
    p.link.down = True  # b never hears a, so never answers
    p.a.wg.send(p.pa, b"hello?", t1)
    p.link.run_until(t1 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.01)
    assert len(p.link.sent(p.a, MESSAGE_INITIATION)) == 1  # only the first handshake
    p.link.run_until(t1 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 0.01)
    inits = p.link.sent(p.a, MESSAGE_INITIATION)
    assert len(inits) == 2
    waited = inits[1].at - t1
    limit = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    assert limit <= waited <= limit + REKEY_TIMEOUT_JITTER_MAX


def test_rekey_after_time_by_initiator_only() -> None:
    p = make_pair()
    p.handshake()
    t0 = p.clock.now
    first_a = p.pa.current
    p.link.run_until(t0 + REKEY_AFTER_TIME + 1)
    # The responder's session is as old, but the responder does not rekey on time.
    p.b.wg.send(p.pb, b"from b", p.clock.now)
    from_b = p.link.collect()
    assert [s.kind for s in from_b] == [MESSAGE_TRANSPORT]
    p.link.pump(from_b)
    p.link.run_until(p.clock.now + 1)
    assert len(p.link.sent(p.a, MESSAGE_INITIATION)) == 1
    # The initiator's next packet still goes out, and starts a new handshake.
    p.a.wg.send(p.pa, b"from a", p.clock.now)
    from_a = p.link.collect()
    assert [s.kind for s in from_a] == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
    p.link.pump(from_a)
    assert len(p.a.of(HandshakeCompleted)) == 2
    assert p.pa.current is not first_a and p.pa.previous is first_a
    assert p.b.received()[-1] == padded(b"from a")


def test_initiator_rekeys_on_receive_near_expiry() -> None:
    p = make_pair()
    p.handshake()
    t0 = p.clock.now
    late = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT + 1
    p.link.run_until(t0 + late)
    p.b.wg.send(p.pb, b"late", p.clock.now)
    p.link.pump()
    assert p.a.received() == [padded(b"late")]
    assert len(p.link.sent(p.a, MESSAGE_INITIATION)) == 2
    assert len(p.a.of(HandshakeCompleted)) == 2


def test_expired_keypair_is_not_used() -> None:
    p = make_pair()
    p.handshake()
    t0 = p.clock.now
    p.a.wg.send_keepalive(p.pa, t0)  # (data would start a handshake when unanswered)
    [old] = p.link.collect()
    p.link.run_until(t0 + REJECT_AFTER_TIME + 1)
    assert len(p.link.log) == 4  # nothing happened in between
    p.link.deliver(old)  # a message under a keypair past REJECT_AFTER_TIME
    assert p.b.wg.drops["expired"] == 1
    p.a.wg.send(p.pa, b"new", p.clock.now)  # staged, and a new handshake
    p.link.pump()
    assert p.b.received() == [padded(b"new")]
    assert len(p.a.of(HandshakeCompleted)) == 2


def test_keys_zeroed_after_three_times_reject_after_time() -> None:
    p = make_pair()
    p.handshake()
    t0 = p.clock.now
    p.a.wg.send_keepalive(p.pa, t0)
    [held] = p.link.collect()
    p.link.run_until(t0 + 3 * REJECT_AFTER_TIME - 1)
    assert p.pa.current is not None and p.pb.current is not None
    p.link.run_until(t0 + 3 * REJECT_AFTER_TIME + 1)
    for peer in (p.pa, p.pb):
        assert (peer.current, peer.previous, peer.next, peer.handshake) == (None,) * 4
    assert p.a.wg._keypairs == {} and p.b.wg._keypairs == {}
    p.link.deliver(held)
    assert p.b.wg.drops["unknown_index"] == 1
    assert p.link.sent(p.a, MESSAGE_INITIATION)[1:] == []  # zeroing is silent


def test_staged_queue_is_bounded() -> None:
    p = make_pair()
    extra = 5
    packets = [i.to_bytes(2, "big") for i in range(MAX_STAGED_PACKETS + extra)]
    for pkt in packets:
        p.a.wg.send(p.pa, pkt, p.clock.now)
    assert len(p.pa.staged) == MAX_STAGED_PACKETS
    assert p.a.wg.drops["staged_overflow"] == extra
    p.link.pump()
    assert p.b.received() == [padded(pkt) for pkt in packets[extra:]]  # the oldest went


def test_packets_in_flight_across_a_rekey_use_the_previous_keypair() -> None:
    p = make_pair()
    p.handshake()
    link = p.link
    link.run_until(p.clock.now + REKEY_TIMEOUT + 1)
    old_a_kp, old_b_kp = p.pa.current, p.pb.current

    p.a.wg.send(p.pa, b"old from a", p.clock.now)
    [old_a] = link.collect()
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    [init] = link.collect()
    link.deliver(init)
    [resp] = link.collect()
    p.b.wg.send(p.pb, b"old from b", p.clock.now)  # b has not been confirmed: old keys
    [old_b] = link.collect()
    assert old_b.data[4:8] == struct.pack("<I", old_a_kp.local_index)  # type: ignore[union-attr]

    link.deliver(resp)
    assert p.pa.previous is old_a_kp and p.pa.current is not old_a_kp
    [confirm] = link.collect()
    link.deliver(old_b)  # arrives after a switched keys
    assert p.a.received() == [padded(b"old from b")]
    link.deliver(confirm)
    assert p.pb.previous is old_b_kp and p.pb.current is not old_b_kp
    link.deliver(old_a)  # arrives after b switched keys
    assert p.b.received() == [padded(b"old from a")]

    p.a.wg.send(p.pa, b"new from a", p.clock.now)
    p.b.wg.send(p.pb, b"new from b", p.clock.now)
    link.pump()
    assert p.b.received()[-1] == padded(b"new from a")
    assert p.a.received()[-1] == padded(b"new from b")
    assert sum(p.a.wg.drops.values()) == sum(p.b.wg.drops.values()) == 0


def test_timer_deadline_is_never_late() -> None:
    """get_timer() may be early (a stale deadline) but never later than a due timer."""
    p = make_pair(a_keepalive=7.0)
    p.a.wg.send(p.pa, b"x", p.clock.now)
    p.link.pump()
    for _ in range(50):
        for node in (p.a, p.b):
            armed = [t for peer in node.wg.peers.values() for t in peer.timers() if t is not None]
            deadline = node.wg.get_timer()
            if armed:
                assert deadline is not None and deadline <= min(armed)
        p.link.advance(3.3)
        if p.clock.now % 2 < 1:
            p.b.wg.send(p.pb, b"y", p.clock.now)


# --- rates and counters ----------------------------------------------------------------


def test_handshake_rate_above_threshold_demands_cookies() -> None:
    p = make_pair()
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    [init] = p.link.collect()
    flood = UNDER_LOAD_HANDSHAKES_PER_SECOND + 6
    for i in range(flood):  # the same valid initiation, all within one second, from
        # as many addresses (one alone would meet its per-source limit first)
        addr = (f"192.0.2.{i + 1}", 5000)
        p.b.wg.receive_datagram(init.data, addr, p.clock.now + i * 0.001)
    replies = [d for d, _ in p.b.wg.datagrams_to_send() if m.message_type(d) == 3]
    assert p.b.wg.drops["cookie"] == len(replies) == flood - UNDER_LOAD_HANDSHAKES_PER_SECOND
    assert p.b.wg.drops["replayed_handshake"] == UNDER_LOAD_HANDSHAKES_PER_SECOND - 1
    # The load passes: a handshake message is judged on mac1 alone again.
    later = p.clock.now + 1 + UNDER_LOAD_HOLD + 1
    p.b.wg.receive_datagram(init.data, p.a.addr, later)
    assert p.b.wg.drops["replayed_handshake"] == UNDER_LOAD_HANDSHAKES_PER_SECOND
    assert p.b.wg.datagrams_to_send() == []


def test_initiations_faster_than_the_rate_are_dropped() -> None:
    p = make_pair()
    # A second device with a's key and a clock one second ahead: its initiation has a
    # newer timestamp, yet arrives right after the first one.
    twin = WireGuard(p.a.wg._private.private_bytes_raw(), wall_offset=WALL_OFFSET + 1)
    twin_peer = twin.add_peer(p.b.wg.public_key, endpoint=p.b.addr)
    p.a.wg.initiate_handshake(p.pa, p.clock.now)
    twin.initiate_handshake(twin_peer, p.clock.now)
    [(first, _)] = p.a.wg.datagrams_to_send()
    [(second, _)] = twin.datagrams_to_send()
    p.b.wg.receive_datagram(first, p.a.addr, p.clock.now)
    p.b.wg.receive_datagram(second, p.a.addr, p.clock.now + HANDSHAKE_INITIATION_RATE / 2)
    assert p.b.wg.drops["handshake_flood"] == 1
    assert p.b.wg.handshakes_completed == 1
    # At the allowed rate it is accepted (and replaces the offered keypair).
    p.b.wg.receive_datagram(second, p.a.addr, p.clock.now + HANDSHAKE_INITIATION_RATE * 2)
    assert p.b.wg.handshakes_completed == 2


def test_send_counter_limits() -> None:
    p = make_pair()
    p.handshake()
    kp = p.pa.current
    assert kp is not None
    # Past REKEY_AFTER_MESSAGES the initiator still sends, and starts a new handshake;
    # the receiver's replay window takes the jump in its stride.
    p.link.advance(REKEY_TIMEOUT + 1)
    kp.send_counter = REKEY_AFTER_MESSAGES + 1
    p.a.wg.send(p.pa, b"many", p.clock.now)
    out = p.link.collect()
    assert [s.kind for s in out] == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
    assert out[0].data[8:16] == struct.pack("<Q", REKEY_AFTER_MESSAGES + 1)
    p.link.deliver(out[0])
    assert p.b.received() == [padded(b"many")]
    # At REJECT_AFTER_MESSAGES the keypair is never used again: the packet waits.
    kp.send_counter = REJECT_AFTER_MESSAGES
    p.a.wg.send(p.pa, b"waits", p.clock.now)
    assert p.link.collect() == []
    assert list(p.pa.staged) == [b"waits"]
    p.link.pump(out[1:])
    assert p.pa.current is not kp
    assert p.b.received()[-1] == padded(b"waits")


def test_counter_jump_from_an_authenticated_peer_does_not_raise() -> None:
    p = make_pair()
    p.handshake()
    kp = p.pa.current
    assert kp is not None
    for counter in (1 << 40, (1 << 62) + 5, REJECT_AFTER_MESSAGES - 1):
        kp.send_counter = counter
        p.a.wg.send_keepalive(p.pa, p.clock.now)
        p.link.pump()
    assert p.b.wg.drops["replay"] == 0
    assert p.pb.current is not None and p.pb.current.replay.would_accept(1) is False


# --- local indexes that name a worker ------------------------------------------------


def _index_fields(sent: Sent) -> tuple[int, ...]:
    """(sender,) of an initiation, (sender, receiver) of a response, (receiver,) else."""
    if sent.kind == MESSAGE_INITIATION:
        return (m.pull_initiation(sent.data).sender,)
    if sent.kind == MESSAGE_RESPONSE:
        r = m.pull_response(sent.data)
        return (r.sender, r.receiver)
    if sent.kind == MESSAGE_COOKIE_REPLY:
        return (m.pull_cookie_reply(sent.data).receiver,)
    return (m.pull_transport_header(sent.data).receiver,)


@pytest.mark.parametrize(("worker", "workers"), [(-1, 2), (2, 2), (0, 0), (0, 1025)])
def test_workers_reject_misuse(worker: int, workers: int) -> None:
    with pytest.raises(ValueError):
        WireGuard(_key(), worker=worker, workers=workers)


def test_every_index_on_the_wire_names_the_worker_that_allocated_it() -> None:
    """a is worker 1 of 3, b worker 2 of 3: every index a message carries for its
    receiver to look up (and every sender index, which becomes one) names the device
    that allocated it, through handshakes, rekeys and cookie replies."""
    clock = Clock()
    a = make_node("a", 1, worker=1, workers=3)
    b = make_node("b", 2, worker=2, workers=3)
    pa = a.wg.add_peer(b.wg.public_key, endpoint=b.addr)
    b.wg.add_peer(a.wg.public_key)
    link = Link(clock, a, b)
    for _ in range(20):  # each a fresh handshake: new indexes on both sides
        a.wg.initiate_handshake(pa, clock.now)
        link.pump()
        a.wg.send(pa, padded(b"x"), clock.now)
        link.advance(HANDSHAKE_INITIATION_RATE + REKEY_TIMEOUT)
    b.wg.force_under_load = True  # b answers the next initiation with a cookie reply
    link.advance(REKEY_AFTER_TIME)
    a.wg.send(pa, padded(b"y"), clock.now)
    link.advance(REKEY_TIMEOUT + 1.0)
    owner = {a.addr: 1, b.addr: 2}
    seen = {MESSAGE_INITIATION: 0, MESSAGE_RESPONSE: 0, MESSAGE_COOKIE_REPLY: 0}
    for sent in link.log:
        fields = _index_fields(sent)
        if sent.kind == MESSAGE_INITIATION:
            assert fields[0] % 3 == owner[sent.src]
        elif sent.kind == MESSAGE_RESPONSE:
            assert (fields[0] % 3, fields[1] % 3) == (owner[sent.src], owner[sent.dst])
        else:
            assert fields[0] % 3 == owner[sent.dst]
        seen[sent.kind] = seen.get(sent.kind, 0) + 1
    assert seen[MESSAGE_INITIATION] >= 20 and seen[MESSAGE_RESPONSE] >= 20
    assert seen[MESSAGE_COOKIE_REPLY] >= 1 and seen[MESSAGE_TRANSPORT] >= 20
    assert pa.has_session


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 1024])
def test_worker_indexes_cover_the_whole_32_bit_space(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lowest and highest draw of every worker's class are its own smallest and
    largest 32-bit indexes: the class is used whole and never overflows 32 bits."""
    from gtun.core.wg import device

    for worker in sorted({0, 1 % workers, workers - 1}):
        wg = WireGuard(_key(), worker=worker, workers=workers)
        monkeypatch.setattr(device.secrets, "randbelow", lambda n: 0)
        assert wg._new_index() == worker
        monkeypatch.setattr(device.secrets, "randbelow", lambda n: n - 1)
        top = wg._new_index()
        assert top % workers == worker and top < 1 << 32 and top + workers >= 1 << 32
        monkeypatch.undo()


def test_worker_indexes_are_random_and_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    from gtun.core.wg import device

    wg = WireGuard(_key(), worker=2, workers=5)
    drawn = [wg._new_index() for _ in range(2000)]
    assert all(i % 5 == 2 for i in drawn)
    assert len(set(drawn)) == len(drawn)
    # Spread over the whole space, not crowded low: the top byte takes many values.
    assert len({i >> 24 for i in drawn}) > 200
    # A draw that is already in use is drawn again.
    wg._keypairs[2 + 5 * 7] = None  # type: ignore[assignment]
    draws = iter([7, 7, 8])
    monkeypatch.setattr(device.secrets, "randbelow", lambda n: next(draws))
    assert wg._new_index() == 2 + 5 * 8
