"""Tier 1: the per-source handshake rate limiter, alone and in the WireGuard core, and
keys the core must refuse (low-order points), from the caller and from the network.

No clock: time is the `now` each call is given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gtun.core.errors import LocalProtocolError
from gtun.core.wg import PeerUnknown, WireGuard, noise
from gtun.core.wg import messages as m
from gtun.core.wg.constants import (
    COOKIE_REPLIES_PER_SECOND_PER_SOURCE,
    COOKIE_REPLY_BURST_PER_SOURCE,
    HANDSHAKE_BURST_PER_SOURCE,
    HANDSHAKES_PER_SECOND_PER_SOURCE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_RESPONSE,
)
from gtun.core.wg.crypto import (
    INITIAL_CHAIN_KEY,
    INITIAL_HASH,
    aead_encrypt,
    dh,
    hash_,
    is_degenerate_key,
    kdf1,
    kdf2,
    mac,
)
from gtun.core.wg.endpoint import address_key, mark_authentic, source_key
from gtun.core.wg.ratelimiter import RateLimiter

T0 = 1000.0
RATE = HANDSHAKES_PER_SECOND_PER_SOURCE
BURST = HANDSHAKE_BURST_PER_SOURCE
COOKIE_RATE = COOKIE_REPLIES_PER_SECOND_PER_SOURCE
COOKIE_BURST = COOKIE_REPLY_BURST_PER_SOURCE

# Points of small order on Curve25519 (and its twist), as u-coordinates, little-endian:
# every X25519 with them is all zeros (libsodium's blocklist, RFC 7748 section 6.1).
LOW_ORDER = [
    bytes(32),  # 0
    (1).to_bytes(32, "little"),  # 1
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    ((1 << 255) - 19 - 1).to_bytes(32, "little"),  # p - 1
    ((1 << 255) - 19).to_bytes(32, "little"),  # p (reduces to 0)
    ((1 << 255) - 19 + 1).to_bytes(32, "little"),  # p + 1 (reduces to 1)
]


def _key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


# --- the limiter alone ---------------------------------------------------------------


def test_a_burst_then_the_rate() -> None:
    rl = RateLimiter()
    src = b"\x0a\x00\x00\x01"
    assert [rl.allow(src, T0) for _ in range(BURST + 3)] == [True] * BURST + [False] * 3
    # One token comes back every 1/RATE seconds, not before.
    assert not rl.allow(src, T0 + 0.9 / RATE)
    assert rl.allow(src, T0 + 1.01 / RATE)
    assert not rl.allow(src, T0 + 1.01 / RATE)
    # Sustained: over 10 s at 200 attempts a second, about RATE a second get through.
    allowed = sum(rl.allow(src, T0 + 1 + i / 200) for i in range(2000))
    assert 10 * RATE - 1 <= allowed <= 10 * RATE + BURST
    # Idle long enough, the bucket is full again, never fuller.
    later = T0 + 100
    assert [rl.allow(src, later) for _ in range(BURST + 1)] == [True] * BURST + [False]


def test_sources_are_independent() -> None:
    rl = RateLimiter()
    a, b = b"a", b"b"
    for _ in range(BURST):
        assert rl.allow(a, T0)
    assert not rl.allow(a, T0)
    assert all(rl.allow(b, T0) for _ in range(BURST))  # a's flood costs b nothing
    assert not rl.allow(b, T0)


def test_idle_buckets_are_collected_and_the_table_is_bounded() -> None:
    rl = RateLimiter(max_entries=100)
    for i in range(100):
        assert rl.allow(i.to_bytes(4, "big"), T0)
    assert len(rl) == 100
    # Full: a new source is refused (not tracked, not let through) ...
    assert not rl.allow(b"new", T0 + 0.01)
    assert len(rl) == 100
    # ... until the idle ones are full again and forgotten.
    assert rl.allow(b"new", T0 + rl.full_after)
    assert len(rl) == 1
    # Collection also runs by itself, at most every gc_interval, from allow().
    for i in range(50):
        rl.allow(i.to_bytes(4, "big"), T0 + 10)
    assert len(rl) == 50
    rl.allow(b"other", T0 + 10 + rl.gc_interval + rl.full_after)
    assert len(rl) == 1


def test_source_keys_ignore_the_port_and_take_an_ipv6_slash_64() -> None:
    assert source_key(("192.0.2.1", 1)) == source_key(("192.0.2.1", 2)) == bytes([192, 0, 2, 1])
    assert source_key(("::ffff:192.0.2.1", 9)) == bytes([192, 0, 2, 1])
    assert source_key(("2001:db8::1", 1)) == source_key(("2001:db8::ffff:2", 7))
    assert source_key(("2001:db8::1", 1)) != source_key(("2001:db8:0:1::1", 1))
    assert address_key("2001:db8::1") == bytes.fromhex("20010db800000000")
    assert source_key("name") == source_key("name") != source_key("other")  # test names

    class Conn:
        source_key = b"conn"
        marked = 0

        def authenticated(self) -> None:
            self.marked += 1

    conn = Conn()
    assert source_key(conn) == b"conn"  # type: ignore[arg-type]
    mark_authentic(conn)  # type: ignore[arg-type]
    mark_authentic(("192.0.2.1", 1))  # a tuple has no such method: nothing happens
    assert conn.marked == 1


# --- in the core ---------------------------------------------------------------------


class Rig:
    """A responder `wg` with one peer (`friend`), and initiators made on demand."""

    def __init__(self) -> None:
        self.wg = WireGuard(_key(), wall_offset=1.7e9)
        self.friend = WireGuard(_key(), wall_offset=1.7e9)
        self.fpeer = self.friend.add_peer(self.wg.public_key, endpoint="responder")
        self.wg.add_peer(self.friend.public_key)

    def initiation(self, sender: WireGuard | None = None, now: float = T0) -> bytes:
        """A fresh initiation to `wg` (from an unknown key unless `sender` is given)."""
        sender = sender or WireGuard(_key(), wall_offset=1.7e9)
        peer = sender.peers.get(self.wg.public_key) or sender.add_peer(
            self.wg.public_key, endpoint="responder"
        )
        peer.last_initiation_sent = None  # no per-peer pacing: a flood
        sender.initiate_handshake(peer, now)
        [(data, _)] = sender.datagrams_to_send()
        return data


def count_dh(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts the responder's first DH of each initiation (consume_initiation_static)."""
    calls = [0]
    real = noise.consume_initiation_static

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(noise, "consume_initiation_static", counted)
    return lambda: calls[0]


def test_a_flood_from_one_source_is_limited_before_any_dh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig()
    dhs = count_dh(monkeypatch)
    flood = [rig.initiation() for _ in range(3 * BURST)]
    for data in flood:  # all at once, from one address (many ports)
        rig.wg.receive_datagram(data, ("203.0.113.9", 40000 + len(data)), T0)
    assert dhs() == BURST
    assert rig.wg.drops["unknown_peer"] == BURST
    assert rig.wg.drops["handshake_ratelimited"] == 2 * BURST
    events = []
    while (e := rig.wg.next_event()) is not None:
        events.append(e)
    assert len(events) == BURST and all(isinstance(e, PeerUnknown) for e in events)
    assert rig.wg.datagrams_to_send() == []  # no answer to anyone
    # The friend at another address is not held up by the flood.
    rig.wg.receive_datagram(rig.initiation(rig.friend), ("198.51.100.2", 5), T0)
    [(reply, _)] = rig.wg.datagrams_to_send()
    assert m.message_type(reply) == MESSAGE_RESPONSE


def test_under_load_no_mac2_gets_a_cookie_reply_and_costs_no_dh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig()
    rig.wg.force_under_load = True
    dhs = count_dh(monkeypatch)
    for i in range(20):  # each from its own address (one alone meets its cookie bucket)
        rig.wg.receive_datagram(rig.initiation(), (f"203.0.113.{i + 1}", 1000), T0)
    out = rig.wg.datagrams_to_send()
    assert len(out) == 20 and {m.message_type(d) for d, _ in out} == {MESSAGE_COOKIE_REPLY}
    assert dhs() == 0 and rig.wg.drops["cookie"] == 20


def test_under_load_cookie_replies_to_one_source_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flood without mac2 in one address's name (its own, or forged to reflect off us)
    gets that address at most the cookie bucket's rate of replies, each refusal counted;
    another address still gets its cookie at once."""
    rig = Rig()
    rig.wg.force_under_load = True
    dhs = count_dh(monkeypatch)
    data = rig.initiation()
    victim = ("192.0.2.77", 9)
    seconds, per_second = 3.0, 500
    sent = int(seconds * per_second)
    replies = 0
    for i in range(sent):
        now = T0 + i / per_second
        rig.wg.receive_datagram(data, (victim[0], 1024 + i % 60000), now)
        replies += sum(1 for d, a in rig.wg.datagrams_to_send() if a[0] == victim[0])
    bound = COOKIE_BURST + COOKIE_RATE * seconds
    assert 0 < replies <= bound + 1
    assert replies >= COOKIE_RATE * seconds  # the bucket refills: not silenced for good
    assert rig.wg.drops["cookie"] == replies
    assert rig.wg.drops["cookie_ratelimited"] == sent - replies
    assert dhs() == 0
    rig.wg.receive_datagram(data, ("198.51.100.2", 5), T0 + seconds)
    [(reply, addr)] = rig.wg.datagrams_to_send()
    assert m.message_type(reply) == MESSAGE_COOKIE_REPLY and addr == ("198.51.100.2", 5)


def test_a_client_under_a_flood_gets_its_cookie_and_connects() -> None:
    """A flood of initiations without mac2 from one address puts the responder under
    load (nothing forced); a real peer at another address is sent a cookie, retries
    with mac2 when its retransmission timer fires, and completes its handshake."""
    rig = Rig()
    flood = rig.initiation()
    attacker = ("203.0.113.9", 4444)
    friend_addr = ("198.51.100.2", 5)
    now = T0
    rate = 400  # flood datagrams a second: well above the under-load threshold
    step = 1.0 / rate

    def flood_until(end: float) -> None:
        nonlocal now
        while now < end:
            rig.wg.receive_datagram(flood, attacker, now)
            now += step

    flood_until(T0 + 1.0)
    assert rig.wg.drops["cookie_ratelimited"] > 0  # under load, the attacker is limited
    rig.friend.initiate_handshake(rig.fpeer, now)
    [(init, _)] = rig.friend.datagrams_to_send()
    rig.wg.datagrams_to_send()  # what went to the attacker
    rig.wg.receive_datagram(init, friend_addr, now)
    [(cookie, to)] = [(d, a) for d, a in rig.wg.datagrams_to_send() if a == friend_addr]
    assert m.message_type(cookie) == MESSAGE_COOKIE_REPLY
    rig.friend.receive_datagram(cookie, "responder", now)
    assert rig.friend.drops["handshake"] == 0  # the cookie was accepted
    # The friend retries when its timer fires; the flood goes on meanwhile.
    deadline = rig.friend.get_timer()
    assert deadline is not None
    flood_until(deadline)
    rig.friend.handle_timer(now)
    [(retry, _)] = rig.friend.datagrams_to_send()
    completed = rig.wg.handshakes_completed
    rig.wg.receive_datagram(retry, friend_addr, now)
    responses = [d for d, a in rig.wg.datagrams_to_send() if a == friend_addr]
    assert [m.message_type(d) for d in responses] == [MESSAGE_RESPONSE]
    assert rig.wg.handshakes_completed == completed + 1
    rig.friend.receive_datagram(responses[0], "responder", now)
    assert rig.fpeer.has_session


def test_under_load_a_reused_cookie_is_still_rate_limited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker that earned a cookie for its address sends valid mac2s: the bucket
    of that address still bounds its DH work."""
    rig = Rig()
    rig.wg.force_under_load = True
    attacker = WireGuard(_key(), wall_offset=1.7e9)
    addr = ("203.0.113.9", 7)
    rig.wg.receive_datagram(rig.initiation(attacker), addr, T0)
    [(cookie, _)] = rig.wg.datagrams_to_send()
    attacker.receive_datagram(cookie, "responder", T0)  # now it has the cookie
    dhs = count_dh(monkeypatch)
    for _ in range(4 * BURST):
        rig.wg.receive_datagram(rig.initiation(attacker), addr, T0 + 0.01)
    assert rig.wg.drops["cookie"] == 1  # mac2 was valid every time after the first
    assert dhs() == BURST
    assert rig.wg.drops["handshake_ratelimited"] == 3 * BURST


def test_a_legitimate_peer_rekeying_is_never_limited() -> None:
    rig = Rig()
    now = T0
    for _ in range(50):  # one initiation per REKEY_TIMEOUT would be the real rate; 4/s
        rig.wg.receive_datagram(rig.initiation(rig.friend, now), ("198.51.100.2", 5), now)
        rig.wg.datagrams_to_send()
        now += 0.25
    assert rig.wg.drops["handshake_ratelimited"] == 0
    assert rig.wg.handshakes_completed == 50


# --- low-order keys ------------------------------------------------------------------


@pytest.mark.parametrize("point", LOW_ORDER)
def test_a_low_order_peer_key_is_a_local_error(point: bytes) -> None:
    assert is_degenerate_key(point)
    wg = WireGuard(_key())
    with pytest.raises(LocalProtocolError):
        wg.add_peer(point)
    assert wg.peers == {}


def test_real_keys_are_not_degenerate() -> None:
    for _ in range(20):
        assert not is_degenerate_key(WireGuard(_key()).public_key)


@pytest.mark.parametrize("point", LOW_ORDER[:4])
def test_an_initiation_carrying_a_low_order_static_is_a_counted_drop(point: bytes) -> None:
    """A sender cannot hold a low-order key's private key, but it can put the point in
    an initiation (the static is only encrypted under DH(e, S_r), which it knows).  The
    responder must drop it as an unknown key, never reach a DH with it."""
    rig = Rig()
    wg = rig.wg
    e = X25519PrivateKey.generate()
    e_pub = e.public_key().public_bytes_raw()
    h = hash_(INITIAL_HASH, wg.public_key)
    ck = kdf1(INITIAL_CHAIN_KEY, e_pub)
    h = hash_(h, e_pub)
    ck, k = kdf2(ck, dh(e, wg.public_key))
    encrypted_static = aead_encrypt(k, 0, point, h)
    msg = m.Initiation(1234, e_pub, encrypted_static, bytes(28))
    body = m.push_initiation(msg)[:-32]
    data = body + mac(hash_(b"mac1----", wg.public_key), body) + bytes(16)
    wg.receive_datagram(data, ("203.0.113.9", 1), T0)
    assert wg.drops["unknown_peer"] == 1
    assert sum(wg.drops.values()) == 1
