"""The transport interface (gtun.io.transport) through its in-memory fake
(gtun.testing.transport): the fake itself, the Driver's dispatch of datagrams to
transports, and a relay and a client, each on its own Driver, meeting over the fake
on one event loop (tier 2, no sockets, no root)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from typing import Any

import pytest

from corelink import relay_settings
from gtun.core.client import CONFIG_RETRY, ClientCore, ConfigReceived, Connected
from gtun.core.relay import PeerSpec, Relay
from gtun.core.wg.constants import MESSAGE_TRANSPORT
from gtun.core.wg.events import Event
from gtun.core.wg.messages import message_type
from gtun.io.driver import Driver
from gtun.io.transport import Receive
from gtun.testing.core import FakeCore
from gtun.testing.transport import INBOX, FakeTransport, fake_pair

BOUND = 5.0  # seconds any wait in these tests may take
RELAY_AT = ("192.0.2.1", 51820)
CLIENT_AT = ("198.51.100.7", 40001)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


async def until(cond: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    deadline = asyncio.get_running_loop().time() + bound
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


# --- the fake ---------------------------------------------------------------------------


def test_the_fake_delivers_later_in_one_batch_from_the_senders_address() -> None:
    async def main() -> None:
        a, b = fake_pair(asyncio.get_running_loop())
        got: list[tuple[list[tuple[bytes, Any]], float]] = []
        b.open(lambda batch, now: got.append((batch, now)))
        assert a.send([(b"one", b.address), (b"two", b.address)]) == 0
        assert got == []  # never from inside send()
        await asyncio.sleep(0)
        assert [batch for batch, _ in got] == [[(b"one", a.address), (b"two", a.address)]]
        assert a.stats["sent"] == 2 and b.stats["received"] == 2
        # Another address is not on this link: dropped, and said so by send().
        assert a.send([(b"x", ("203.0.113.9", 1)), (b"three", b.address)]) == 1
        await asyncio.sleep(0)
        assert got[-1][0] == [(b"three", a.address)] and a.stats["unroutable"] == 1
        assert [d for d, _ in a.sent] == [b"one", b"two", b"x", b"three"]

    run(main)


def test_the_fake_loses_what_it_is_told_to_and_is_bounded() -> None:
    async def main() -> None:
        a, b = fake_pair(asyncio.get_running_loop())
        got: list[bytes] = []
        b.open(lambda batch, now: got.extend(d for d, _ in batch))
        a.lose = lambda data, addr: data.startswith(b"lose")
        assert a.send([(b"keep 1", b.address), (b"lose 2", b.address), (b"keep 3", b.address)]) == 0
        await asyncio.sleep(0)
        assert got == [b"keep 1", b"keep 3"] and a.stats["lost"] == 1
        a.lose = None
        assert a.send([(b"%d" % i, b.address) for i in range(INBOX + 5)]) == 0
        await asyncio.sleep(0)
        assert len(got) == 2 + INBOX and b.stats["overflow"] == 5
        # A closed side sends nothing and takes nothing.
        b.close()
        assert a.send([(b"late", b.address)]) == 0
        assert b.send([(b"gone", a.address)]) == 1
        await asyncio.sleep(0)
        assert got[-1] != b"late"

    run(main)


# --- the Driver's dispatch ------------------------------------------------------------


class Connection:
    """A connection endpoint (as gtun.io.tcp.TcpEndpoint): its owner sends to it."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner


class Recorder:
    """A connection transport that records each send() call."""

    addressed = False

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[list[tuple[bytes, Any]]] = []
        self.refuse = refuse
        self.receive: Receive | None = None
        self.closed = 0

    def open(self, receive: Receive) -> None:
        self.receive = receive

    def send(self, datagrams: Any) -> int:
        self.calls.append(list(datagrams))
        return len(datagrams) if self.refuse else 0

    def close(self) -> None:
        self.closed += 1


def test_sends_are_grouped_per_transport_in_order_and_refusals_counted() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = FakeCore()
        driver = Driver(core, loop, lambda e: None)
        here, there = fake_pair(loop)
        seen: list[bytes] = []
        there.open(lambda batch, now: seen.extend(d for d, _ in batch))
        tcp, full = Recorder(), Recorder(refuse=True)
        for transport in (here, tcp, full):
            driver.attach(transport)
        with pytest.raises(ValueError):
            driver.attach(FakeTransport(loop, ("192.0.2.99", 1)))  # a second for addresses
        c1, c2, c3 = Connection(tcp), Connection(tcp), Connection(full)
        core.out = [
            (b"u1", there.address),
            (b"t1", c1),
            (b"f1", c3),
            (b"u2", there.address),
            (b"t2", c2),
            (b"nowhere", "an endpoint no transport owns"),
            (b"t3", c1),
        ]
        driver.after()
        assert tcp.calls == [[(b"t1", c1), (b"t2", c2), (b"t3", c1)]]
        assert full.calls == [[(b"f1", c3)]]
        assert here.sent == [(b"u1", there.address), (b"u2", there.address)]
        assert core.drops["queue_full"] == 2  # the refused one and the one with no owner
        # What a transport delivers reaches the core; the driver then transmits.
        assert tcp.receive is not None
        core.out = [(b"answer", there.address)]
        tcp.receive([(b"hello", c1), (b"again", c2)], loop.time())
        assert core.received == [(b"hello", c1), (b"again", c2)]
        await asyncio.sleep(0)
        assert seen == [b"u1", b"u2", b"answer"]
        # Without an addressed transport, datagrams to addresses are dropped and counted.
        driver.detach(here)
        assert here.closed and driver.udp is None
        core.out = [(b"u3", there.address)]
        driver.after()
        assert core.drops["queue_full"] == 3
        driver.close()
        assert tcp.closed and full.closed and driver.transports == []

    run(main)


# --- a relay and a client over the fake -------------------------------------------------


class Pair:
    """A relay and a client core, each on its own Driver, joined by a fake link."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.relay = Relay(secrets.token_bytes(32), relay_settings())
        self.client = ClientCore(secrets.token_bytes(32), self.relay.wg.public_key, RELAY_AT)
        spec = PeerSpec("c1", self.client.wg.public_key, IPv4Address("10.66.0.5"))
        self.relay.set_peers([spec])
        self.events: list[Event] = []
        self.relay_driver = Driver(self.relay, loop, lambda e: None)
        self.client_driver = Driver(self.client, loop, self.events.append)
        self.at_relay, self.at_client = fake_pair(loop, RELAY_AT, CLIENT_AT)
        self.relay_driver.attach(self.at_relay)
        self.client_driver.attach(self.at_client)

    def start(self) -> None:
        self.client.start(self.loop.time())
        self.client_driver.poke()

    def config(self) -> ConfigReceived | None:
        return next((e for e in self.events if isinstance(e, ConfigReceived)), None)

    def close(self) -> None:
        self.relay_driver.close()
        self.client_driver.close()


def test_relay_and_client_handshake_and_push_config_over_the_fake() -> None:
    async def main() -> None:
        pair = Pair()
        pair.start()
        await until(lambda: pair.config() is not None, "the pushed configuration")
        assert any(isinstance(e, Connected) for e in pair.events)
        config = pair.config()
        assert config is not None and config.config.address == IPv4Address("10.66.0.5")
        peer = pair.relay.peer_by_name("c1")
        assert peer is not None and peer.endpoint == CLIENT_AT  # learnt from the datagrams
        assert pair.at_client.stats["lost"] == pair.at_relay.stats["lost"] == 0
        pair.close()

    run(main)


def test_a_lost_config_request_is_asked_again() -> None:
    async def main() -> None:
        pair = Pair()
        lost: list[bytes] = []

        def lose_first_data(data: bytes, addr: Any) -> bool:
            # Past the handshake's confirming keepalive (32 bytes): the config request.
            if not lost and message_type(data) == MESSAGE_TRANSPORT and len(data) > 32:
                lost.append(data)
                return True
            return False

        pair.at_client.lose = lose_first_data
        started = pair.loop.time()
        pair.start()
        await until(lambda: any(isinstance(e, Connected) for e in pair.events), "handshake")
        await until(lambda: pair.config() is not None, "the configuration, asked again")
        assert len(lost) == 1 and pair.at_client.stats["lost"] == 1
        assert pair.loop.time() - started >= CONFIG_RETRY - 0.1
        pair.close()

    run(main)
