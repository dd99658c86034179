"""Client failover between the relays of a mesh (issue 12, part 4), in memory with
injected time (tier 1): the push of the other relays, learning them, losing a relay,
moving to a nearer one make-before-break, and hostile pushes."""

from __future__ import annotations

import base64
from ipaddress import IPv4Address

from gtun.core import tunnel as tm
from gtun.core.client import (
    CHECK_INTERVAL,
    CHECK_PINGS,
    CONNECTED,
    LOCAL_CAUSES,
    MOVE_HOLD,
    REMOTE_CAUSES,
    STATES,
    SUSPECT_AFTER,
    TRANSITIONS,
    ClientCore,
    ConfigReceived,
    KnownRelay,
    RelayChanged,
    RelaysLearned,
)
from gtun.core.packet import build_udp4
from gtun.core.relay import SessionHere
from gtun.testing.mesh import MeshLink


def ping(src: str, dst: str, n: int) -> bytes:
    return build_udp4(IPv4Address(src), IPv4Address(dst), 5000, 6000, n.to_bytes(4, "big"))


def mesh(failover: bool = True) -> MeshLink:
    link = MeshLink({"a": (), "b": (), "c": ()})
    link.add_client("c1", "a", "10.66.0.10", "fd66::10", failover=failover)
    link.add_client("c2", "c", "10.66.0.20", "fd66::20", failover=failover)
    link.configure()
    return link


def events(link: MeshLink, name: str, kind: type) -> list:
    return [e for e in link.client_events[name] if isinstance(e, kind)]


def follow(link: MeshLink) -> None:
    """Do what the relays' edges do through the store: each client is held by the relay
    it uses now (the presence map every relay is given)."""
    names = {relay.wg.public_key: name for name, relay in link.relays.items()}
    home = {n: names[c.server.public_key] for n, c in link.clients.items()}
    if home != link.home:
        link.home.update(home)
        for relay in link.relays.values():
            relay.set_presence(link.presence())
        link.pump()


def tick(link: MeshLink, until: float, step: float = 0.05, send: bool = True) -> None:
    """Advance time to `until`: c1 and c2 send each other a packet every step."""
    n = 0
    while link.now < until:
        link.now = round(link.now + step, 6)
        for client in link.clients.values():
            deadline = client.get_timer()
            if deadline is not None and deadline <= link.now:
                client.handle_timer(link.now)
        for relay in link.relays.values():
            deadline = relay.get_timer()
            if deadline is not None and deadline <= link.now:
                relay.handle_timer(link.now)
        if send:
            n += 1
            link.clients["c1"].tun_packet(ping("10.66.0.10", "10.66.0.20", n), link.now)
            link.clients["c2"].tun_packet(ping("10.66.0.20", "10.66.0.10", n), link.now)
        link.pump()
        follow(link)


def test_failover_causes_have_their_rows() -> None:
    for state in STATES:  # a datagram can bring "moved" in any state; "lost" a timer
        assert (state, "moved") in TRANSITIONS and (state, "lost") in TRANSITIONS
    assert "moved" in REMOTE_CAUSES and "lost" in LOCAL_CAUSES


def test_push_carries_the_relays_only_when_negotiated() -> None:
    old = mesh(failover=False)
    config = old.clients["c1"].config
    assert config is not None and not config.relays_pushed and config.relays == ()
    assert len(old.clients["c1"].wg.peers) == 1  # learnt nothing
    new = mesh()
    config = new.clients["c1"].config
    assert config is not None and config.relays_pushed
    keys = {r.name: r.public_key for r in config.relays}
    assert keys == {"b": new.relays["b"].wg.public_key, "c": new.relays["c"].wg.public_key}
    assert {r.endpoint for r in config.relays} == {"b", "c"}
    # On the wire: no "relays" key for a client that did not ask.
    peer = old.relays["a"].wg.peers[old.clients["c1"].wg.public_key]
    assert b'"relays"' not in tm.push_config(old.relays["a"].config_for(peer))


def test_client_learns_the_relays() -> None:
    link = mesh()
    learnt = events(link, "c1", RelaysLearned)
    assert learnt and {r.name for r in learnt[-1].relays} == {"b", "c"}
    assert {r.name for r in link.clients["c1"].known_relays()} == {"b", "c"}
    # A client started with them measures each at start and keeps the first answer.
    c3 = link.add_client("c3", "a", "10.66.0.30", "fd66::30", known=learnt[-1].relays)
    link.configure(["c3"])
    assert c3.connected
    assert all(rtt is not None for rtt in c3.relay_rtts().values())


def test_losing_the_relay_moves_within_the_bound_with_the_same_address() -> None:
    link = mesh()
    c1 = link.clients["c1"]
    tick(link, link.now + 1.0)
    address = c1.config.address if c1.config else None
    lost_at = link.now
    link.down.add("a")
    link.take("c2")
    flowing_at = None
    while link.now < lost_at + 10.0 and flowing_at is None:
        tick(link, link.now + 0.05)
        if events(link, "c1", RelayChanged) and link.take("c2"):
            flowing_at = link.now
    assert flowing_at is not None
    bound = SUSPECT_AFTER + CHECK_PINGS * CHECK_INTERVAL + 0.5
    assert flowing_at - lost_at <= bound < 5.0
    assert c1.state == CONNECTED and c1.server.public_key != link.relays["a"].wg.public_key
    configs = events(link, "c1", ConfigReceived)
    assert configs[-1].config.address == address and not configs[-1].changed
    # And the way back (c2's relay was told where c1 is now).
    link.take("c1")
    tick(link, link.now + 0.5)
    assert link.take("c1")


def test_a_nearer_relay_is_joined_make_before_break() -> None:
    link = mesh()
    c1 = link.clients["c1"]
    tick(link, link.now + 1.0)
    c1.relay.rtt = 0.100  # as if relay a were across an ocean
    link.take("c1")
    link.take("c2")
    # The rare measurement: one other relay's handshake RTT (zero here).
    assert c1._t_measure is not None
    c1._t_measure = link.now + 0.5  # rather than MEASURE_INTERVAL from now
    n = 0
    sent_to = {"c1": 0, "c2": 0}
    end = c1._t_measure + 1.0
    while link.now < end:
        link.now = round(link.now + 0.05, 6)
        for client in link.clients.values():
            d = client.get_timer()
            if d is not None and d <= link.now:
                client.handle_timer(link.now)
        n += 1
        link.clients["c1"].tun_packet(ping("10.66.0.10", "10.66.0.20", n), link.now)
        link.clients["c2"].tun_packet(ping("10.66.0.20", "10.66.0.10", n), link.now)
        sent_to["c1"] += 1
        sent_to["c2"] += 1
        link.pump()
        follow(link)
    moved = events(link, "c1", RelayChanged)
    assert len(moved) == 1 and "RTT" in moved[0].reason
    assert c1.server.public_key != link.relays["a"].wg.public_key
    # Not one packet lost either way across the move.
    assert len(link.take("c1")) == sent_to["c1"]
    assert len(link.take("c2")) == sent_to["c2"]
    # No move back and forth: held for MOVE_HOLD.
    assert c1._moved_at + MOVE_HOLD > link.now


def test_stale_relay_entry_is_ignored_and_forgotten() -> None:
    link = MeshLink({"a": (), "b": ()})
    link.down.add("gone")
    stale = KnownRelay(
        "gone", ClientCore(bytes(31) + b"\x07", b"\x09" * 32, None).wg.public_key, "gone"
    )
    c1 = link.add_client("c1", "a", "10.66.0.10", "fd66::10", known=[stale])
    link.configure()
    assert c1.connected and c1.server.public_key == link.relays["a"].wg.public_key
    assert stale.public_key not in {r.public_key for r in c1.known_relays()}
    assert stale.public_key not in c1.wg.peers


def test_hostile_pushes_are_bounded_and_counted() -> None:
    low_order = base64.b64encode(bytes(32)).decode()
    good = base64.b64encode(b"\x11" * 32).decode()
    entries: list[object] = [
        "not an object",
        {"name": 5, "key": good, "endpoint": "x:1"},
        {"name": "n", "key": "not base64!", "endpoint": "x:1"},
        {"name": "n", "key": low_order, "endpoint": "x:1"},
        {"name": "n", "key": good, "endpoint": "e" * 300},
        {"name": "n", "key": good, "endpoint": 7},
    ]
    relays, dropped = tm.pull_relays(entries)
    assert relays == () and dropped == len(entries)
    many = [
        {"name": f"r{i}", "key": base64.b64encode(bytes([i + 1]) * 32).decode(), "endpoint": "x"}
        for i in range(100)
    ]
    relays, dropped = tm.pull_relays(many)
    assert len(relays) == tm.MAX_RELAYS and dropped == 100 - tm.MAX_RELAYS
    assert tm.pull_relays("nope") == ((), 1)
    assert tm.pull_relays([many[0], many[0]]) == (tm.pull_relays([many[0]])[0], 1)
    # Through the tunnel: a relay pushing them never makes the client raise.
    link = mesh()
    c1 = link.clients["c1"]
    relay = link.relays["a"]
    peer = relay.wg.peers[c1.wg.public_key]
    payload = tm.push_config(relay.config_for(peer))
    msg = tm.pull_message(payload).payload
    msg["relays"] = entries + many[:40]
    before = c1.drops["bad_relay"]
    relay.wg.send(peer, tm.push_message(tm.CONFIG, msg), link.now)
    link.pump()
    assert c1.drops["bad_relay"] - before >= len(entries) + 40 - tm.MAX_RELAYS
    assert len(c1.wg.peers) <= tm.MAX_RELAYS + 1
    assert c1.connected


def claims(link: MeshLink, relay: str, client: str) -> int:
    """How many times `client` claimed its session at `relay` (SessionHere)."""
    key = link.clients[client].wg.public_key
    return sum(
        1 for e in link.events[relay] if isinstance(e, SessionHere) and e.peer.public_key == key
    )


def test_measuring_a_relay_claims_nothing_there() -> None:
    """A failover client handshakes with every relay it knows (RTTs) but claims its
    session only where it joins: the others keep routing to the relay the map names."""
    link = mesh()
    learnt = events(link, "c1", RelaysLearned)[-1].relays
    c3 = link.add_client("c3", "a", "10.66.0.30", "fd66::30", known=learnt)
    link.configure(["c3"])
    assert all(rtt is not None for rtt in c3.relay_rtts().values())  # all three measured
    joined = {
        name for name, relay in link.relays.items() if relay.wg.public_key == c3.server.public_key
    }
    assert len(joined) == 1
    for name in link.relays:
        assert claims(link, name, "c3") == (1 if name in joined else 0), name
    follow(link)
    (home,) = joined
    for name, relay in link.relays.items():
        peer = relay.peer_by_name("c3")
        assert peer is not None
        assert relay.presence_of(peer) == (None if name == home else home)
    # Traffic both ways goes through the relay it joined, a measured one claims nothing.
    link.clients["c2"].tun_packet(ping("10.66.0.20", "10.66.0.30", 1), link.now)
    link.pump()
    assert link.take("c3")
    assert all(claims(link, n, "c3") == (1 if n == home else 0) for n in link.relays)


def test_data_in_flight_from_a_moved_client_claims_nothing() -> None:
    """A gtun client the map holds at another relay (it moved) does not claim its
    session back with a packet still on its way to the old relay."""
    link = mesh()
    a = link.relays["a"]
    c1 = link.clients["c1"]
    peer = a.peer_by_name("c1")
    assert peer is not None and peer.data.here and claims(link, "a", "c1") == 1
    a.update_presence({c1.wg.public_key: "b"})  # the store: c1 moved to b
    assert not peer.data.here and a.presence_of(peer) == "b"
    c1.tun_packet(ping("10.66.0.10", "10.66.0.20", 7), link.now)
    link.pump()  # c1 still sends through a (it does not know): a forwards it
    assert link.take("c2")
    assert a.presence_of(peer) == "b" and claims(link, "a", "c1") == 1
