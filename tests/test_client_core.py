"""The client core's state machine (core/client.py) in milliseconds: fallback to TCP,
"no answer" notices, backoff between rounds, new paths, silence (tier 1, pure)."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address

import pytest

from gtun.core import tunnel as tm
from gtun.core.client import (
    CONNECTED,
    FALLBACK_AFTER,
    FIRST_BACKOFF,
    REFUSED,
    REMOTE_CAUSES,
    STATES,
    TRANSITIONS,
    ClientCore,
    Connected,
    Disconnected,
    Fallback,
    GaveUpRound,
    NoAnswer,
    Refused,
)
from gtun.core.errors import LocalProtocolError
from gtun.core.relay import PeerSpec, Relay
from gtun.core.wg.constants import REKEY_TIMEOUT
from gtun.testing.link import CoreLink, relay_settings


def lone_client(transport: str = "udp") -> ClientCore:
    """A client whose relay never answers."""
    relay_key = Relay(secrets.token_bytes(32), relay_settings()).wg.public_key
    return ClientCore(secrets.token_bytes(32), relay_key, ("192.0.2.1", 9621), transport=transport)


def run(client: ClientCore, start: float, until: float) -> list[object]:
    """Fire the client's timers up to `until`; its events (datagrams go nowhere)."""
    events: list[object] = []
    now = start
    while True:
        client.datagrams_to_send()
        while (ev := client.next_event()) is not None:
            events.append(ev)
        deadline = client.get_timer()
        if deadline is None or deadline > until:
            return events
        now = max(now, deadline)
        client.handle_timer(now)


def linked(transport: str = "udp") -> tuple[CoreLink, ClientCore]:
    relay = Relay(secrets.token_bytes(32), relay_settings())
    net = CoreLink(relay, now=100.0)
    client = ClientCore(secrets.token_bytes(32), relay.wg.public_key, "R", transport=transport)
    net.add_client("c1", client)
    relay.set_peers([PeerSpec("c1", client.wg.public_key, IPv4Address("10.66.0.2"))])
    return net, client


def test_auto_falls_back_to_tcp_when_udp_brings_no_handshake() -> None:
    client = lone_client("auto")
    client.start(0.0)
    events = run(client, 0.0, FALLBACK_AFTER + 0.5)
    fallbacks = [e for e in events if isinstance(e, Fallback)]
    assert fallbacks == [Fallback(FALLBACK_AFTER)]
    assert client.transport == "tcp" and client.server.endpoint is None
    assert not client.connected


def test_udp_only_never_falls_back() -> None:
    client = lone_client("udp")
    client.start(0.0)
    events = run(client, 0.0, 60.0)
    assert not any(isinstance(e, Fallback) for e in events)
    assert client.server.endpoint == ("192.0.2.1", 9621)


def test_auto_does_not_fall_back_once_connected() -> None:
    net, client = linked("auto")
    net.start()
    assert client.connected and any(isinstance(e, Connected) for e in net.events["c1"])
    net.now += FALLBACK_AFTER + 1
    client.handle_timer(net.now)
    net.pump()
    assert not any(isinstance(e, Fallback) for e in net.events["c1"])
    assert client.transport == "auto" and client.server.endpoint == "R"


def test_no_answer_counts_attempts_and_rounds_back_off() -> None:
    client = lone_client()
    client.start(0.0)
    events = run(client, 0.0, 400.0)
    attempts = [e.attempts for e in events if isinstance(e, NoAnswer)]
    assert attempts[:3] == [1, 2, 3] and all(a >= 1 for a in attempts)
    rounds = [e.retry_in for e in events if isinstance(e, GaveUpRound)]
    assert rounds[:3] == [FIRST_BACKOFF, 2 * FIRST_BACKOFF, 4 * FIRST_BACKOFF]


def test_new_path_handshakes_at_once_despite_the_rate_limit() -> None:
    client = lone_client("tcp")
    client.set_endpoint(None)
    client.start(0.0)
    client.datagrams_to_send()
    # Within REKEY_TIMEOUT of the last initiation WireGuard would not send another...
    client.new_path("conn-1", REKEY_TIMEOUT / 2)
    sent = client.datagrams_to_send()
    assert [addr for _, addr in sent] == ["conn-1"]
    assert sent[0][0][0] == 1  # a handshake initiation
    client.path_lost("conn-2")  # another path: nothing changes
    assert client.server.endpoint == "conn-1"
    client.path_lost("conn-1")
    assert client.server.endpoint is None


def test_silent_relay_is_reported_disconnected() -> None:
    net, client = linked()
    net.start()
    assert client.connected
    silent_from = net.now
    for _ in range(5):  # the relay stops answering: nothing is delivered any more
        net.now += client.ping_interval
        client.handle_timer(net.now)
        client.datagrams_to_send()
    events = list(iter(client.next_event, None))
    lost = [e for e in events if isinstance(e, Disconnected)]
    assert len(lost) == 1 and lost[0].silent_for > client.dead_after
    assert not client.connected and net.now - silent_from > client.dead_after


def test_every_remote_cause_has_a_move_from_every_state() -> None:
    """No datagram can make the state machine fail: the table covers what remote input
    brings about, from every state."""
    for state in STATES:
        for cause in REMOTE_CAUSES:
            assert (state, cause) in TRANSITIONS, (state, cause)


def test_refused_is_final_and_an_impossible_move_is_a_local_error() -> None:
    net, client = linked()
    net.start()
    assert client.state == CONNECTED
    peer = net.relay.peer_by_name("c1")
    assert peer is not None
    for _ in range(2):  # twice: a second REFUSED is no error
        net.relay.wg.send(peer, tm.push_message(tm.REFUSED, {"reason": "go away"}), net.now)
        net.pump()
    assert client.state == REFUSED and not client.connected
    assert [e for e in net.events["c1"] if isinstance(e, Refused)] == [Refused("go away")] * 2
    with pytest.raises(LocalProtocolError):
        client._move("silence")  # silence is only noticed while connected
