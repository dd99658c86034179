"""Transport "auto" (core/client.py, "The auto transport"), tier 1: a client whose UDP
path drops everything falls back to TCP, tells blocked UDP from a relay that does not
know its key, and comes back to UDP make-before-break once UDP heals, all with injected
time over testing/link.py's paths (UDP blockable, a stream for TCP)."""

from __future__ import annotations

import secrets
from ipaddress import IPv4Address

import pytest

from gtun.core.client import (
    FALLBACK_AFTER,
    NO_HANDSHAKE,
    NO_HANDSHAKE_AFTER,
    PROBING,
    SWITCHING,
    UDP_BLOCKED,
    UDP_PROBE_MAX,
    UDP_PROBE_WAIT,
    ClientCore,
    Connected,
    Disconnected,
    Fallback,
    NoHandshake,
    UdpBack,
    UdpBlocked,
    UdpUnanswered,
)
from gtun.core.packet import build_udp4
from gtun.core.relay import PeerSpec, Relay
from gtun.testing.link import CoreLink, Stream, relay_settings

INTERVAL = 30.0  # the probe interval of these clients (the default)
CLIENT = "10.66.0.2"
RELAY = "10.66.0.1"


def ping(src: str, dst: str, n: int) -> bytes:
    return build_udp4(IPv4Address(src), IPv4Address(dst), 5000, 6000, n.to_bytes(4, "big"))


def numbers(writes: list[object]) -> set[int]:
    """The sequence numbers of the pings among a side's device writes."""
    return {int.from_bytes(w[-4:], "big") for w in writes if isinstance(w, bytes)}


class Auto:
    """A relay and one client with transport "auto" on the in-memory link, and what the
    client's daemon does on the core's events (app/client.py): dial on Fallback, close
    the connection on UdpBack."""

    def __init__(
        self, *, known: bool = True, blocked: bool = True, transport: str = "auto"
    ) -> None:
        self.relay = Relay(secrets.token_bytes(32), relay_settings())
        self.net = CoreLink(self.relay, now=100.0)
        self.client = ClientCore(
            secrets.token_bytes(32),
            self.relay.wg.public_key,
            "R" if transport != "tcp" else None,
            transport=transport,
            udp_probe_interval=INTERVAL,
        )
        self.net.add_client("c1", self.client)
        if known:
            self.add_peer()
        if blocked:
            self.net.blocked.add("c1")
        self.stream: Stream | None = None
        self.keep_open = False  # on UdpBack, leave the connection open (a test's choice)
        self.seen = 0  # events the daemon has acted on
        self.at: dict[type, list[float]] = {}  # when each kind of event came
        self.sent_up: set[int] = set()
        self.sent_down: set[int] = set()
        self.n = 0
        if transport == "tcp":
            self.dial()

    def add_peer(self) -> None:
        self.relay.set_peers([PeerSpec("c1", self.client.wg.public_key, IPv4Address(CLIENT))])

    def dial(self) -> None:
        self.stream = self.net.connect("c1")
        self.client.new_path(self.stream, self.net.now)

    def react(self) -> None:
        events = self.net.events["c1"]
        while self.seen < len(events):
            event = events[self.seen]
            self.seen += 1
            self.at.setdefault(type(event), []).append(self.net.now)
            if isinstance(event, Fallback):
                self.dial()
            elif isinstance(event, UdpBack):
                assert self.stream is not None and self.stream.open  # make-before-break
                if not self.keep_open:
                    self.net.disconnect(self.stream)
                    self.stream = None
            self.net.pump()

    def events(self, kind: type) -> list[object]:
        return [e for e in self.net.events["c1"] if isinstance(e, kind)]

    def tick(self, until: float, step: float = 0.05, traffic: bool = False) -> None:
        """Advance to `until`, firing timers; with `traffic` a ping each way every step
        (from the client to the relay's address, and from the relay's device back)."""
        net = self.net
        while net.now < until:
            net.now = round(net.now + step, 6)
            for core in (self.client, self.relay):
                deadline = core.get_timer()
                if deadline is not None and deadline <= net.now:
                    core.handle_timer(net.now)
            if traffic:
                self.n += 1
                self.client.tun_packet(ping(CLIENT, RELAY, self.n), net.now)
                self.relay.tun_packet(ping(RELAY, CLIENT, self.n), net.now)
                self.sent_up.add(self.n)
                self.sent_down.add(self.n)
            net.pump()
            self.react()

    def until(self, kind: type, limit: float, since: float | None = None, **options: bool) -> float:
        """Tick until an event of `kind` comes (one after those seen; with `since`, any
        from that time on), at most `limit` seconds; when it came."""
        seen = self.at.setdefault(kind, [])
        before = len(seen)
        end = self.net.now + limit
        while True:
            new = [t for t in seen if t >= since] if since is not None else seen[before:]
            if new:
                return new[0]
            assert self.net.now < end, f"no {kind.__name__} within {limit} s"
            self.tick(self.net.now + 0.05, **options)

    def lost(self) -> tuple[set[int], set[int]]:
        """Pings sent and not delivered: (client to relay, relay to client)."""
        up = self.sent_up - numbers(list(self.net.tun_in))
        down = self.sent_down - numbers(list(self.net.got["c1"]))
        return up, down

    def relay_endpoint(self) -> object:
        peer = self.relay.peer_by_name("c1")
        assert peer is not None
        return peer.endpoint


def on_tcp(a: Auto) -> None:
    """Start with UDP blocked: the fallback, the connection, the session over TCP."""
    a.client.start(a.net.now)
    a.net.pump()
    started = a.net.now
    fell = a.until(Fallback, FALLBACK_AFTER + 1)
    assert fell - started == pytest.approx(FALLBACK_AFTER, abs=0.06)
    a.until(Connected, 1, since=fell)
    assert a.client.transport == "tcp" and a.client.server.endpoint is a.stream
    assert a.stream is not None and a.relay_endpoint() is a.stream.other


def test_blocked_udp_falls_back_and_says_so_once() -> None:
    a = Auto()
    on_tcp(a)
    connected = a.net.now
    # At once after the TCP handshake, one UDP probe: was UDP blocked, or the relay down?
    a.tick(a.net.now + 0.1, traffic=True)
    assert a.client.probe_state == PROBING and a.client.udp_probes == 1
    told = a.until(UdpBlocked, UDP_PROBE_WAIT + 1, traffic=True)
    assert told - connected == pytest.approx(UDP_PROBE_WAIT, abs=0.1)
    assert a.events(UdpBlocked) == [UdpBlocked(INTERVAL)]
    assert a.client.reachability == UDP_BLOCKED
    assert a.client.next_udp_probe == pytest.approx(told + INTERVAL)
    # The later probes back off, and say nothing more than UdpUnanswered.
    a.until(UdpUnanswered, INTERVAL + UDP_PROBE_WAIT + 1, traffic=True)
    a.until(UdpUnanswered, 2 * INTERVAL + UDP_PROBE_WAIT + 1)
    assert a.events(UdpUnanswered) == [UdpUnanswered(2 * INTERVAL), UdpUnanswered(4 * INTERVAL)]
    assert len(a.events(UdpBlocked)) == 1 and not a.events(NoHandshake)
    # Every probe died on the blocked path, and TCP carried every ping both ways.
    assert a.client.udp_probes == 3
    assert a.net.dropped["c1"] >= 3
    assert a.lost() == (set(), set())
    assert a.net.carried.get(("c1", "udp", "down"), 0) == 0
    assert a.client.transport == "tcp" and a.relay_endpoint() is a.stream.other  # type: ignore[union-attr]


def test_probe_backoff_stops_at_its_cap() -> None:
    a = Auto()
    on_tcp(a)
    a.until(UdpBlocked, UDP_PROBE_WAIT + 1)
    a.tick(a.net.now + 2000, step=0.5)
    waits = [e.probe_in for e in a.events(UdpUnanswered)]  # type: ignore[attr-defined]
    assert waits[:4] == [2 * INTERVAL, 4 * INTERVAL, UDP_PROBE_MAX, UDP_PROBE_MAX]
    assert set(waits[2:]) == {UDP_PROBE_MAX}
    assert a.client.connected and a.client.transport == "tcp"  # TCP kept the session


def test_udp_healed_is_used_again_make_before_break() -> None:
    a = Auto()
    on_tcp(a)
    a.until(UdpBlocked, UDP_PROBE_WAIT + 1, traffic=True)
    a.tick(a.net.now + 5, traffic=True)
    healed = a.net.now
    a.net.blocked.discard("c1")
    udp_before = a.net.carried.get(("c1", "udp", "down"), 0)
    back = a.until(UdpBack, INTERVAL + 1, traffic=True)
    # The next probe (INTERVAL after the first one's failure) found UDP and came back.
    assert back - healed <= INTERVAL
    assert a.client.next_udp_probe is None and a.client.probe_state is None
    assert a.client.transport == "auto" and a.client.reachability is None
    assert a.client.udp_returns == 1
    assert a.events(UdpBack)[0].after == pytest.approx(back - a.at[Fallback][0])  # type: ignore[attr-defined]
    # The daemon closed TCP (react: it was still open when UdpBack came); both ends are on
    # UDP, and the relay's traffic goes there.
    assert a.stream is None
    assert a.client.server.endpoint == "R" and a.relay_endpoint() == "c1"
    tcp_down = a.net.carried[("c1", "tcp", "down")]
    a.tick(a.net.now + 3, traffic=True)
    assert a.net.carried[("c1", "tcp", "down")] == tcp_down
    assert a.net.carried[("c1", "udp", "down")] > udp_before
    # Not one ping lost, either way, through the fallback, the probes and the switch.
    assert a.lost() == (set(), set())
    assert a.client.connected and not a.events(Disconnected)


def test_the_relay_sends_over_udp_as_soon_as_the_probe_reaches_it() -> None:
    """The relay side: the probe's initiation alone moves the peer's endpoint from its
    TCP connection to the UDP address (WireGuard follows the latest authentic source),
    and closing the old connection later does not take that endpoint away."""
    a = Auto()
    on_tcp(a)
    a.until(UdpBlocked, UDP_PROBE_WAIT + 1)
    a.net.blocked.discard("c1")
    probe_at = a.client.next_udp_probe
    assert probe_at is not None
    a.tick(probe_at - 0.1)  # the timers before it (PINGs), through the link
    a.net.now = probe_at
    a.client.handle_timer(a.net.now)
    out = a.client.datagrams_to_send()
    assert [addr for _, addr in out] == ["R"] and out[0][0][0] == 1  # an initiation, UDP
    a.relay.receive_datagram(out[0][0], "c1", a.net.now)  # it reaches the relay ...
    assert a.relay_endpoint() == "c1"
    a.relay.tun_packet(ping(RELAY, CLIENT, 1), a.net.now)  # ... whose next packet is UDP
    sent = a.relay.datagrams_to_send()
    assert [addr for _, addr in sent] == ["c1", "c1"]  # the response, then the data
    for data, _ in sent:
        a.client.receive_datagram(data, "R", a.net.now)
    # The client's session is up over UDP, TCP still open; the data already came.
    assert a.client.probe_state is None and a.client.transport == "auto"
    assert 1 in numbers(a.client.tun_writes())
    assert a.events(UdpBack) == [] and any(
        isinstance(e, UdpBack) for e in iter(a.client.next_event, None)
    )
    stream = a.stream
    assert stream is not None and stream.open
    a.net.disconnect(stream)  # the daemon closes the connection: the relay keeps UDP
    assert a.relay_endpoint() == "c1" and a.client.server.endpoint == "R"


def test_late_tcp_data_neither_is_lost_nor_moves_the_client_off_udp() -> None:
    """Make-before-break, the other way: what the relay sends over the old connection
    after the switch (it followed a late TCP message) still arrives, and the client
    stays on UDP, where its next packet brings the relay back."""
    a = Auto()
    on_tcp(a)
    a.until(UdpBlocked, UDP_PROBE_WAIT + 1)
    a.net.blocked.discard("c1")
    a.keep_open = True  # to send through it after the switch
    stream = a.stream
    assert stream is not None
    a.until(UdpBack, INTERVAL + 1)
    peer = a.relay.peer_by_name("c1")
    assert peer is not None
    peer.endpoint = stream.other  # as after a late message over TCP
    a.relay.tun_packet(ping(RELAY, CLIENT, 7), a.net.now)
    a.net.pump()
    assert a.net.carried[("c1", "tcp", "down")] >= 1 and 7 in numbers(a.net.take("c1"))
    assert a.client.server.endpoint == "R" and a.client.transport == "auto"
    a.client.tun_packet(ping(CLIENT, RELAY, 8), a.net.now)
    a.net.pump()
    assert a.relay_endpoint() == "c1"
    a.net.disconnect(stream)
    assert a.relay_endpoint() == "c1"


def test_a_switch_without_udp_data_goes_back_to_tcp() -> None:
    """UDP carries the probe's handshake, then nothing: the client does not wait on a
    path that does not carry data; TCP takes the data again, and the relay follows."""
    a = Auto()
    on_tcp(a)
    a.until(UdpBlocked, UDP_PROBE_WAIT + 1)
    a.net.blocked.discard("c1")
    probe_at = a.client.next_udp_probe
    assert probe_at is not None
    a.tick(probe_at - 0.1)  # the timers before it (PINGs), through the link
    a.net.now = probe_at
    a.client.handle_timer(a.net.now)
    ((initiation, _),) = a.client.datagrams_to_send()
    a.relay.receive_datagram(initiation, "c1", a.net.now)
    ((response, _),) = a.relay.datagrams_to_send()
    a.net.blocked.add("c1")  # blocked again, before any data crossed
    a.client.receive_datagram(response, "R", a.net.now)
    assert a.client.probe_state == SWITCHING and a.client.transport == "auto"
    a.net.pump()
    a.until(UdpUnanswered, UDP_PROBE_WAIT + 1, traffic=True)
    assert a.events(UdpUnanswered) == [UdpUnanswered(2 * INTERVAL)]
    assert a.client.transport == "tcp" and a.client.server.endpoint is a.stream
    assert a.relay_endpoint() is a.stream.other  # type: ignore[union-attr]  # keepalive
    before = a.lost()
    a.tick(a.net.now + 2, traffic=True)
    assert a.lost() == before  # TCP carries everything again
    assert not a.events(UdpBack) and a.client.connected


def test_back_on_udp_the_fallback_rules_apply_again() -> None:
    a = Auto()
    on_tcp(a)
    a.until(UdpBlocked, UDP_PROBE_WAIT + 1)
    a.net.blocked.discard("c1")
    a.until(UdpBack, INTERVAL + 1)
    a.net.blocked.add("c1")  # UDP goes away again mid-session
    lost = a.until(Disconnected, 3 * a.client.ping_interval + 10, traffic=True)
    fell = a.until(Fallback, FALLBACK_AFTER + 1)
    assert fell - lost == pytest.approx(FALLBACK_AFTER, abs=0.06)
    a.until(Connected, 1, since=fell)
    assert a.client.transport == "tcp" and a.relay_endpoint() is a.stream.other  # type: ignore[union-attr]
    a.until(UdpBlocked, UDP_PROBE_WAIT + 1)  # said again: this is another fallback
    assert len(a.events(UdpBlocked)) == 2
    a.tick(a.net.now + 1, traffic=True)
    up, down = a.lost()
    a.tick(a.net.now + 1, traffic=True)
    assert a.lost() == (up, down)  # flowing again over TCP


def test_a_relay_that_was_down_is_not_called_udp_blocked() -> None:
    """UDP and TCP both unanswered for a while (the relay was down), then the relay is
    back: TCP handshakes first, the probe at once finds UDP, and nothing says blocked."""
    a = Auto(known=False, blocked=False)
    a.client.start(a.net.now)
    a.net.pump()
    a.until(Fallback, FALLBACK_AFTER + 1)
    a.tick(a.net.now + 1)
    a.add_peer()  # the relay is back (here: it learns the peer)
    joined = a.until(Connected, 10)
    back = a.until(UdpBack, UDP_PROBE_WAIT + 1, since=joined)
    assert back - joined < 0.5  # the probe right after the TCP handshake
    assert not a.events(UdpBlocked) and a.client.reachability is None
    assert a.client.transport == "auto" and a.relay_endpoint() == "c1"


def test_unknown_key_is_told_from_blocked_udp() -> None:
    a = Auto(known=False, blocked=False)
    a.client.start(a.net.now)
    a.net.pump()
    a.until(Fallback, FALLBACK_AFTER + 1)
    dialed = a.net.now
    told = a.until(NoHandshake, NO_HANDSHAKE_AFTER + 1)
    assert told - dialed == pytest.approx(NO_HANDSHAKE_AFTER, abs=0.06)
    assert a.events(NoHandshake) == [NoHandshake(("UDP", "TCP"), NO_HANDSHAKE_AFTER)]
    assert a.client.reachability == NO_HANDSHAKE and not a.client.connected
    assert not a.events(UdpBlocked)
    assert a.relay.wg.drops["unknown_peer"] >= 2  # the relay heard both and knew no key
    # Said once, however long it lasts.
    a.tick(a.net.now + 60, step=0.5)
    assert len(a.events(NoHandshake)) == 1 and a.client.reachability == NO_HANDSHAKE
    # `gtun peer add`: the next attempt over TCP joins, then the probe brings UDP back.
    a.add_peer()
    joined = a.until(Connected, 10)
    a.until(UdpBack, UDP_PROBE_WAIT + 1, since=joined)
    assert a.client.transport == "auto" and a.client.reachability is None


def test_tcp_only_unknown_key_is_told_too() -> None:
    a = Auto(known=False, blocked=False, transport="tcp")
    a.client.start(a.net.now)
    a.net.pump()
    a.until(NoHandshake, NO_HANDSHAKE_AFTER + 1)
    assert a.events(NoHandshake) == [NoHandshake(("TCP",), NO_HANDSHAKE_AFTER)]
    a.tick(a.net.now + 40, step=0.5)
    assert a.client.udp_probes == 0 and a.client.next_udp_probe is None


def test_a_known_key_over_tcp_is_never_called_unknown() -> None:
    a = Auto(blocked=False, transport="tcp")
    a.client.start(a.net.now)
    a.net.pump()
    a.until(Connected, 1)
    a.tick(a.net.now + 60, step=0.5)
    assert not a.events(NoHandshake) and a.client.reachability is None
    assert a.client.udp_probes == 0  # only "auto" probes UDP


def test_probe_interval_must_be_positive() -> None:
    key = secrets.token_bytes(32)
    with pytest.raises(ValueError, match="udp_probe_interval"):
        ClientCore(key, secrets.token_bytes(32), "R", transport="auto", udp_probe_interval=0)
