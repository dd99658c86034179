"""Tier 1: the relay's health asked over the tunnel (HEALTH_REQUEST -> HEALTH), between
the pure cores through the in-memory link: the answer is the snapshot the relay's edge
gave, with its age; only a client that negotiated the capability is answered, within a
per-peer token bucket; an old client or an old relay sees nothing new; and the answer's
parser takes anything a hostile relay could send."""

from __future__ import annotations

import json
import secrets
from dataclasses import replace
from ipaddress import IPv4Address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtun.core import tunnel as tm
from gtun.core.client import ClientCore, HealthReceived
from gtun.core.errors import LocalProtocolError
from gtun.core.relay import HEALTH_BURST, HEALTH_RATE, PeerSpec, Relay
from gtun.core.tunnel import RelayHealth
from gtun.core.wg import WireGuard
from gtun.testing.link import CoreLink, relay_settings

SICK = RelayHealth(
    device="gtun0",
    forwarding=False,
    dev_forwarding=True,
    forwarding6=True,
    nat=False,
    device_up=True,
    missing_routes=(ip_network("192.168.88.0/24"),),
)


class Net(CoreLink):
    """A relay at "R", gtun clients c1 and c2, and a stock WireGuard peer at "S"."""

    def __init__(self) -> None:
        super().__init__(Relay(secrets.token_bytes(32), relay_settings()), now=1000.0)
        specs = []
        for i, name in enumerate(("c1", "c2"), start=2):
            client = ClientCore(secrets.token_bytes(32), self.relay.wg.public_key, "R")
            self.add_client(name, client)
            specs.append(PeerSpec(name, client.wg.public_key, IPv4Address(f"10.66.0.{i}")))
        self.stock = WireGuard(secrets.token_bytes(32))
        self.stock.add_peer(self.relay.wg.public_key, endpoint="R")
        specs.append(PeerSpec("stock", self.stock.public_key, IPv4Address("10.66.0.9")))
        self.relay.set_peers(specs)

    def answers(self, name: str) -> list[HealthReceived]:
        return [e for e in self.events[name] if isinstance(e, HealthReceived)]

    def ask(self, name: str) -> int:
        request_id = self.clients[name].ask_health(self.now)
        assert request_id is not None
        self.pump()
        return request_id


def test_the_answer_is_the_edges_snapshot_with_its_age() -> None:
    net = Net()
    net.start()
    c1 = net.clients["c1"]
    assert c1.config is not None and c1.config.health and c1.relay.caps.health
    net.relay.set_health(SICK, net.now)
    net.now += 3.0
    request_id = net.ask("c1")
    [answer] = net.answers("c1")
    assert answer.id == request_id
    assert answer.health == replace(SICK, age=3.0)
    # A newer snapshot is what the next answer carries.
    net.relay.set_health(replace(SICK, forwarding=True), net.now)
    net.now += 1.0
    second = net.ask("c1")
    assert second != request_id
    latest = net.answers("c1")[-1]
    assert latest.id == second and latest.health.forwarding is True
    assert latest.health.age == 1.0


def test_before_the_first_snapshot_nothing_is_known() -> None:
    net = Net()
    net.start()
    net.ask("c1")
    [answer] = net.answers("c1")
    assert answer.health == RelayHealth() and not answer.health.known


def test_only_the_asking_client_is_answered() -> None:
    net = Net()
    net.start()
    net.relay.set_health(SICK, net.now)
    net.ask("c1")
    assert len(net.answers("c1")) == 1 and net.answers("c2") == []


def test_not_connected_means_not_asked() -> None:
    net = Net()
    c1 = net.clients["c1"]
    assert c1.ask_health(net.now) is None  # no session, no configuration yet
    assert c1.datagrams_to_send() == []


def test_per_peer_token_bucket() -> None:
    net = Net()
    net.start()
    net.relay.set_health(SICK, net.now)
    c1 = net.clients["c1"]
    for _ in range(HEALTH_BURST + 3):
        assert c1.ask_health(net.now) is not None
    net.pump()
    assert len(net.answers("c1")) == HEALTH_BURST
    state = net.relay.peer_by_name("c1").data  # type: ignore[union-attr]
    assert state.drops["health_ratelimited"] == 3
    assert net.relay.drops["health_ratelimited"] == 3
    # Another peer has its own bucket.
    net.ask("c2")
    assert len(net.answers("c2")) == 1
    # The bucket refills at HEALTH_RATE.
    net.now += 1.0 / HEALTH_RATE
    net.ask("c1")
    assert len(net.answers("c1")) == HEALTH_BURST + 1


def _stock_messages(net: Net) -> list[tm.TunnelMessage]:
    out = []
    for plaintext in net.stock_got:
        if tm.classify(plaintext) == tm.MESSAGE:
            out.append(tm.pull_message(plaintext))
    return out


def test_an_old_client_is_neither_granted_nor_answered() -> None:
    """A client that does not ask for the capability (an older gtun, played by a bare
    WireGuard device speaking gtun's messages) gets no "health" in its CONFIG, and its
    health requests go unanswered, counted."""
    net = Net()
    net.start()
    net.relay.set_health(SICK, net.now)
    assert net.stock is not None
    relay_peer = net.stock.peers[net.relay.wg.public_key]
    net.stock.send(relay_peer, tm.push_config_request(tm.ConfigRequest(bulk=True)), net.now)
    net.pump()
    [config] = [m for m in _stock_messages(net) if m.type == tm.CONFIG]
    assert "health" not in config.payload
    net.stock.send(relay_peer, tm.push_health_request(1), net.now)
    net.pump()
    assert [m for m in _stock_messages(net) if m.type == tm.HEALTH] == []
    assert net.relay.peer_by_name("stock").data.drops["not_negotiated"] == 1  # type: ignore[union-attr]


def test_an_old_relay_is_never_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay whose CONFIG does not grant the capability (an older gtun) is never sent
    a request: an older relay would count an unknown message type as malformed."""
    net = Net()
    pushed = net.relay.config_for
    monkeypatch.setattr(net.relay, "config_for", lambda peer: replace(pushed(peer), health=False))
    net.start()
    c1 = net.clients["c1"]
    assert c1.connected and c1.config is not None and not c1.config.health
    assert c1.ask_health(net.now) is None
    assert c1.datagrams_to_send() == []


def test_an_unasked_answer_is_ignored() -> None:
    net = Net()
    net.start()
    peer = net.relay.peer_by_name("c1")
    assert peer is not None
    net.relay.wg.send(peer, tm.push_health(77, SICK), net.now)
    net.pump()
    assert net.answers("c1") == []
    assert net.clients["c1"].drops["malformed"] == 0


def test_a_malformed_request_is_counted() -> None:
    net = Net()
    net.start()
    c1 = net.clients["c1"]
    c1.wg.send(c1.server, tm.push_message(tm.HEALTH_REQUEST, {"id": "one"}), net.now)
    net.pump()
    assert net.relay.drops["malformed"] == 1 and net.answers("c1") == []


# --- the codec -----------------------------------------------------------------------


def test_payload_round_trip_and_unknowns_left_out() -> None:
    health = replace(SICK, store=True, age=2.25)
    payload = tm.health_payload(health)
    assert payload["age"] == 2.2 or payload["age"] == 2.3
    assert tm.pull_health(json.loads(json.dumps(payload))) == replace(health, age=payload["age"])
    assert tm.health_payload(RelayHealth()) == {}
    assert tm.pull_health({}) == RelayHealth()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"device": "gtun0; rm -rf /"}, RelayHealth()),  # a fix line would name it
        ({"device": "x" * 16}, RelayHealth()),
        ({"forwarding": 0, "nat": "yes"}, RelayHealth()),
        ({"age": float("nan")}, RelayHealth()),
        ({"age": -1}, RelayHealth()),
        ({"age": True}, RelayHealth()),
        ({"missing_routes": "10.0.0.0/8"}, RelayHealth()),
        (
            {"missing_routes": ["nonsense", 7, "10.9.0.0/16"]},
            RelayHealth(missing_routes=(ip_network("10.9.0.0/16"),)),
        ),
    ],
)
def test_hostile_payloads_read_as_unknown(payload: dict[str, Any], expected: RelayHealth) -> None:
    assert tm.pull_health(payload) == expected


def test_routes_are_bounded() -> None:
    many = [f"10.{i}.0.0/16" for i in range(100)]
    assert len(tm.pull_health({"missing_routes": many}).missing_routes) == tm.MAX_HEALTH_ROUTES
    health = RelayHealth(missing_routes=tuple(ip_network(r) for r in many))
    # The answer fits a message, whatever the relay's edge found.
    assert len(tm.push_health(tm.MAX_HEALTH_ID, health)) < tm.MAX_PAYLOAD


def test_ids_are_checked() -> None:
    with pytest.raises(LocalProtocolError):
        tm.push_health_request(tm.MAX_HEALTH_ID + 1)
    for bad in (-1, "1", 1.0, None, True):
        with pytest.raises(tm.TunnelMessageError):
            tm.health_id(tm.TunnelMessage(tm.HEALTH, {"id": bad}))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
KEYS = st.sampled_from([*tm._HEALTH_FLAGS, "device", "missing_routes", "age", "id", "x"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, JSON))
def test_pull_health_takes_anything(payload: dict[str, Any]) -> None:
    health = tm.pull_health(payload)
    # Whatever came, what is kept is well-typed and bounded.
    assert health.device is None or len(health.device) <= tm.MAX_DEVICE_NAME
    assert len(health.missing_routes) <= tm.MAX_HEALTH_ROUTES
    assert health.age is None or 0.0 <= health.age <= tm.MAX_HEALTH_AGE
    for name in tm._HEALTH_FLAGS:
        assert getattr(health, name) in (None, True, False)
