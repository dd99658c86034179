"""Tier 1: path MTU discovery between the pure cores (client.py's PMTU table, the
relay's probe answers), over an in-memory path that drops datagrams above a size (a
black hole: no ICMP, nothing said), with injected time."""

from __future__ import annotations

import random
import secrets
import struct
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest

from gtun.core import tunnel as tm
from gtun.core.client import (
    BUSY_CONFIRM,
    CONFIRM,
    MAX_PROBES,
    MIN_MTU_IPV6,
    MIN_PROBE_TIMEOUT,
    PMTU_STEP,
    PROBE_TIMEOUT,
    ClientCore,
    MtuChanged,
)
from gtun.core.relay import PROBE_BURST, PeerSpec, Relay
from gtun.testing.link import relay_settings

WG_OVERHEAD = 32  # a transport message's header and tag around its plaintext


def ipv4(size: int, dst: str = "10.66.0.1") -> bytes:
    """A UDP/IPv4 packet of `size` bytes from the client (10.66.0.2)."""
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        size,
        0,
        0,
        64,
        17,
        0,
        IPv4Address("10.66.0.2").packed,
        IPv4Address(dst).packed,
    )
    return header + bytes(size - len(header))


class Path:
    """A client and a relay over a path that carries WireGuard datagrams up to `limit`
    bytes (None: any size) and silently drops larger ones, both ways."""

    def __init__(
        self,
        *,
        pmtu: bool = True,
        relay_mtu: int = 1420,
        raise_interval: float = 10.0,
        transport: str = "udp",
        ipv6: bool = False,
    ) -> None:
        extra = {"network6": IPv6Network("fd66::/64")} if ipv6 else {}
        self.relay = Relay(secrets.token_bytes(32), relay_settings(**extra))
        self.relay.settings.mtu = relay_mtu
        self.relay.wg.mtu = relay_mtu
        self.client = ClientCore(
            secrets.token_bytes(32),
            self.relay.wg.public_key,
            "R",
            transport=transport,
            pmtu=pmtu,
            raise_interval=raise_interval,
        )
        self.relay.set_peers(
            [
                PeerSpec(
                    "c1",
                    self.client.wg.public_key,
                    IPv4Address("10.66.0.2"),
                    address6=IPv6Address("fd66::2") if ipv6 else None,
                )
            ]
        )
        self.now = 100.0
        self.limit: int | None = None
        self.events: list[object] = []
        self.lost = 0  # datagrams the black hole ate
        self.client_sizes: list[int] = []  # every datagram the client sent

    def _carry(self, data: bytes) -> bool:
        if self.limit is not None and len(data) > self.limit:
            self.lost += 1
            return False
        return True

    def move(self) -> None:
        c, r = self.client, self.relay
        for _ in range(200):
            moved = False
            for data, _ in c.datagrams_to_send():
                self.client_sizes.append(len(data))
                if self._carry(data):
                    r.receive_datagram(data, "c1", self.now)
                    moved = True
            for data, _ in r.datagrams_to_send():
                if self._carry(data):
                    c.receive_datagram(data, "R", self.now)
                    moved = True
            while (ev := c.next_event()) is not None:
                self.events.append(ev)
            c.tun_writes()
            r.tun_writes()
            while r.next_event() is not None:
                pass
            if not moved:
                return
        raise AssertionError("path did not settle")

    def run(self, seconds: float, *, traffic: int | None = None) -> None:
        """Fire timers for `seconds`; with `traffic`, the client's device sends a packet of
        that size every 0.1 s (a transfer)."""
        until = self.now + seconds
        next_packet = self.now
        while True:
            self.move()
            times = [t for t in (self.client.get_timer(), self.relay.get_timer()) if t]
            if traffic is not None:
                times.append(next_packet)
            at = min(times) if times else until
            if at > until:
                self.now = until
                return
            self.now = max(self.now, at)
            if traffic is not None and self.now >= next_packet:
                self.client.tun_packet(ipv4(min(traffic, self.client.mtu or traffic)), self.now)
                next_packet = self.now + 0.1
            self.client.handle_timer(self.now)
            self.relay.handle_timer(self.now)

    def connect(self) -> None:
        self.client.start(self.now)
        self.run(1.0)
        assert self.client.config is not None

    def mtu_changes(self) -> list[MtuChanged]:
        return [e for e in self.events if isinstance(e, MtuChanged)]


def passes(mtu: int) -> int:
    """The largest datagram a path lets through when packets of `mtu` bytes pass."""
    return mtu + WG_OVERHEAD


def test_open_path_keeps_the_relays_mtu_and_confirms_it() -> None:
    p = Path()
    p.connect()
    c = p.client
    assert c.relay.caps.pmtu and c.config is not None and c.config.pmtu
    assert c.pmtu_state == CONFIRM and c.path_mtu == 1420 and c.mtu == 1420
    assert c.probes_answered >= 1
    assert passes(1420) in p.client_sizes  # the probe had exactly the datagram size tested
    p.run(120.0)
    assert not p.mtu_changes()
    assert p.relay.wg.peers[c.wg.public_key].data.path_mtu == 1420


def test_black_hole_is_found_and_the_search_converges() -> None:
    p = Path()
    p.connect()
    p.limit = passes(1340)  # a link that drops tunnel packets over 1340 bytes
    started = p.now
    p.run(20.0, traffic=1420)
    changes = p.mtu_changes()
    assert len(changes) == 1, changes
    # The largest multiple of PMTU_STEP that passes.
    assert changes[0].mtu == 1340 // PMTU_STEP * PMTU_STEP == p.client.path_mtu
    assert "black hole" in changes[0].reason
    assert p.client.wg.mtu == p.client.path_mtu  # padding stays within the new MTU
    assert started  # (the bound is checked below, to the tenth of a second)
    # Detected from traffic within BUSY_CONFIRM, then MAX_PROBES probes, then a few
    # search rounds.
    p2 = Path()
    p2.connect()
    p2.limit = passes(1340)
    t0 = p2.now
    for _ in range(200):
        p2.run(0.1, traffic=1420)
        if p2.mtu_changes():
            break
    # With a short RTT the probes wait MIN_PROBE_TIMEOUT, not PROBE_TIMEOUT: MAX_PROBES
    # confirmations and a few rounds.
    assert p2.mtu_changes()
    assert p2.now - t0 <= BUSY_CONFIRM + (MAX_PROBES + 6) * MIN_PROBE_TIMEOUT < PROBE_TIMEOUT * 4


def test_black_hole_found_without_traffic_by_the_idle_confirmation() -> None:
    p = Path()
    p.connect()
    p.limit = passes(1000)
    p.run(45.0)
    assert [e.mtu for e in p.mtu_changes()] == [992]


def test_raised_again_when_the_path_heals() -> None:
    p = Path(raise_interval=5.0)
    p.connect()
    p.limit = passes(1200)
    p.run(15.0, traffic=1420)
    assert p.client.path_mtu == 1200
    p.run(12.0)  # still narrow: raise attempts find nothing more
    assert [e.mtu for e in p.mtu_changes()] == [1200]
    p.limit = None
    p.run(7.0)
    changes = p.mtu_changes()
    assert [e.mtu for e in changes] == [1200, 1420], changes
    assert "again" in changes[-1].reason
    assert p.client.path_mtu == 1420 and p.client.wg.mtu == 1420


def test_partial_heal_raises_to_what_passes() -> None:
    p = Path(raise_interval=5.0)
    p.connect()
    p.limit = passes(1000)
    p.run(15.0, traffic=1420)
    p.limit = passes(1300)
    p.run(7.0)
    assert [e.mtu for e in p.mtu_changes()] == [992, 1296]


def test_random_loss_is_not_a_black_hole() -> None:
    """10% of the datagrams lost each way, at random, for ten minutes of transfer: the
    MTU stays (a black hole needs the MTU lost in 2 x MAX_PROBES tries in a row)."""
    p = Path()
    p.connect()
    rnd = random.Random(11)

    def lossy(data: bytes) -> bool:
        return rnd.random() >= 0.1

    p._carry = lossy  # type: ignore[method-assign]
    p.run(600.0, traffic=1420)
    assert not p.mtu_changes()
    assert p.client.path_mtu == 1420 and p.client.probes_answered > 300


def test_a_dead_path_is_not_a_black_hole() -> None:
    p = Path()
    p.connect()
    p.limit = 0  # nothing passes
    p.run(30.0, traffic=1420)
    assert not p.mtu_changes()
    assert p.client.path_mtu == 1420


def test_the_relays_mtu_is_the_ceiling() -> None:
    p = Path(relay_mtu=1280, raise_interval=5.0)
    p.connect()
    p.run(30.0, traffic=1400)
    assert not p.mtu_changes()
    assert max(p.client_sizes) <= passes(1280)


def test_ipv6_in_the_tunnel_keeps_the_mtu_at_1280() -> None:
    # Below 1280 Linux takes IPv6 off the device: nothing under the floor is probed.
    p = Path(ipv6=True)
    p.connect()
    p.limit = passes(1300)
    p.run(20.0, traffic=1420)
    assert [e.mtu for e in p.mtu_changes()] == [1296]
    p = Path(ipv6=True)
    p.connect()
    p.limit = passes(1000)
    p.run(20.0, traffic=1420)
    # Not even the floor passes: to the search, the path is down; the MTU stays.
    assert not p.mtu_changes() and p.client.path_mtu == 1420
    assert MIN_MTU_IPV6 == 1280


def test_no_probing_without_the_cap() -> None:
    p = Path(pmtu=False)
    p.connect()
    p.limit = passes(1200)
    p.run(30.0, traffic=1420)
    c = p.client
    assert not c.relay.caps.pmtu and c.pmtu_state is None and c.path_mtu is None
    assert c.probes_sent == 0 and not p.mtu_changes() and c.mtu == 1420
    assert p.relay.wg.peers[c.wg.public_key].data.probes == 0


def test_no_probing_over_tcp() -> None:
    p = Path(transport="tcp")
    p.connect()
    p.run(30.0, traffic=1420)
    assert p.client.probes_sent == 0 and p.client.pmtu_state is None


def test_an_old_relay_without_the_cap_gets_no_probes() -> None:
    """A relay that does not know "pmtu" pushes no "pmtu" key: the client never probes."""
    p = Path()
    real = tm.relay_caps

    def old_caps(request: tm.ConfigRequest, *, tap: bool, partial_ok: bool) -> tm.Caps:
        caps = real(request, tap=tap, partial_ok=partial_ok)
        return tm.Caps(bulk=caps.bulk, partial=caps.partial)

    mp = pytest.MonkeyPatch()
    mp.setattr(tm, "relay_caps", old_caps)
    try:
        p.connect()
        p.run(30.0, traffic=1420)
    finally:
        mp.undo()
    assert p.client.probes_sent == 0 and p.client.mtu == 1420


def probe_datagram(p: Path, plaintext: bytes) -> None:
    p.client.wg.send(p.client.server, plaintext, p.now)
    p.move()


def test_relay_rate_limits_probes_per_peer() -> None:
    p = Path(pmtu=False)
    p.connect()
    state = p.relay.wg.peers[p.client.wg.public_key].data
    for i in range(PROBE_BURST + 20):
        probe_datagram(p, tm.push_probe(tm.PROBE, i, 600))
    assert state.probes == PROBE_BURST
    assert state.drops["probe_ratelimited"] == 20
    assert p.relay.drops["probe_ratelimited"] == 20
    p.now += 1.0  # the bucket refills
    for i in range(5):
        probe_datagram(p, tm.push_probe(tm.PROBE, 100 + i, 600))
    assert state.probes == PROBE_BURST + 5


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"id": "1"},
        {"id": -1},
        {"id": 2**40},
        {"id": 1.5},
        {"id": True},
        {"id": 1, "mtu": 10},
        {"id": 1, "mtu": "1400"},
    ],
)
def test_malformed_probes_are_dropped_and_counted(payload: dict[str, object]) -> None:
    p = Path(pmtu=False)
    p.connect()
    state = p.relay.wg.peers[p.client.wg.public_key].data
    before = p.relay.drops["malformed"]
    probe_datagram(p, tm.push_message(tm.PROBE, payload) + bytes(600))
    assert p.relay.drops["malformed"] == before + 1
    assert state.drops["malformed"] >= 1 and state.probes == 0


def test_a_short_or_stray_answer_proves_nothing() -> None:
    p = Path()
    p.connect()
    c = p.client
    c._pmtu_confirm(p.now)  # noqa: SLF001 (white box: a confirmation in flight, its id)
    ((probe_id, size),) = c._pm_pending.items()  # noqa: SLF001
    before = c.drops["malformed"]
    # An answer shorter than its probe (it did not cross at that size): not proof.
    reply = tm.push_probe(tm.PROBE_ACK, probe_id, 600)
    c._on_packet(c.server, reply, p.now)  # noqa: SLF001
    assert c.drops["malformed"] == before + 1 and probe_id in c._pm_pending  # noqa: SLF001
    # A stray id is ignored.
    c._on_packet(c.server, tm.push_probe(tm.PROBE_ACK, probe_id + 7, size), p.now)  # noqa: SLF001
    assert probe_id in c._pm_pending  # noqa: SLF001


def test_probe_codec_round_trip_and_padding() -> None:
    wire = tm.push_probe(tm.PROBE, 42, 1400, mtu=1380)
    assert len(wire) == 1400 and tm.classify(wire) == tm.MESSAGE
    probe = tm.parse_probe(tm.pull_message(wire), len(wire))
    assert probe == tm.Probe(42, 1400, 1380)
    with pytest.raises(tm.LocalProtocolError):
        tm.push_probe(tm.PROBE, -1, 600)
    assert tm.parse_config_request({"pmtu": True}).pmtu
    assert not tm.parse_config_request({"pmtu": "yes"}).pmtu


def test_probing_stops_on_a_move_to_tcp_and_the_relays_mtu_comes_back() -> None:
    p = Path()
    p.connect()
    p.limit = passes(1200)
    p.run(15.0, traffic=1420)
    assert p.client.path_mtu == 1200
    p.limit = None
    p.client.transport = "tcp"  # as after a fallback (the next CONFIG finds it so)
    p.client._request_config(p.now)  # noqa: SLF001 (what a new session does)
    p.run(1.0)
    changes = p.mtu_changes()
    assert [e.mtu for e in changes] == [1200, 1420] and "not probed" in changes[-1].reason
    sent = p.client.probes_sent
    p.run(60.0, traffic=1420)
    assert p.client.probes_sent == sent and p.client.mtu == 1420
