"""CoDel (gtun.core.codel) with synthetic arrivals, the Driver's use of it (io/driver.py,
Delay), and the UDP socket's receive timestamps that feed it (io/udp.py)."""

from __future__ import annotations

import asyncio
import math
import select
import socket
import sys
import time
from typing import Any

import pytest

from gtun.core.codel import CoDel
from gtun.core.drops import CLIENT_DROP_REASONS, RELAY_DROP_REASONS
from gtun.io.driver import CODEL_MIN_BYTES, SMALL_FIRST, Driver, codel_victim
from gtun.io.udp import UdpBatch, UdpTransport
from gtun.testing.core import FakeCore

LINUX = sys.platform.startswith("linux")
T, IV = 0.005, 0.100  # target, interval
STEP = 0.001  # a packet leaves the queue every millisecond in these runs


def run(codel: CoDel, sojourn: Any, start: float, end: float) -> list[float]:
    """Times of the drops while packets leave every STEP seconds from `start` to `end`
    with sojourn `sojourn(now)`."""
    drops = []
    now = start
    while now < end:
        if codel.should_drop(sojourn(now), now):
            drops.append(now)
        now = round(now + STEP, 9)
    return drops


def test_a_queue_under_target_is_never_dropped_from() -> None:
    codel = CoDel(T, IV)
    assert run(codel, lambda now: T * 0.99, 0.0, 5.0) == []
    assert not codel.dropping and codel.drops == 0


def test_a_burst_shorter_than_an_interval_passes() -> None:
    codel = CoDel(T, IV)
    # 90 ms above target (a burst draining), then under: never a drop.
    assert run(codel, lambda now: 0.050 if now < 0.090 else 0.001, 0.0, 2.0) == []
    # Bursts again and again, each shorter than an interval: each restarts the clock.
    assert run(codel, lambda now: 0.050 if (now % 0.2) < 0.09 else 0.0, 2.0, 4.0) == []


def test_a_standing_queue_is_dropped_from_after_an_interval_then_faster() -> None:
    codel = CoDel(T, IV)
    drops = run(codel, lambda now: 0.020, 0.0, 1.0)
    # The first drop one interval after the sojourn first stood above target.
    assert drops[0] == pytest.approx(IV, abs=STEP)
    assert codel.dropping
    # Then at interval/sqrt(count): the gaps shrink as 1/sqrt(n).
    gaps = [b - a for a, b in zip(drops, drops[1:], strict=False)]
    for n, gap in enumerate(gaps[:8], start=1):
        assert gap == pytest.approx(IV / math.sqrt(n), abs=STEP + 1e-9)
    assert all(b <= a + STEP for a, b in zip(gaps, gaps[1:], strict=False))
    assert codel.drops == len(drops) == codel.count


def test_the_dropping_state_ends_when_the_queue_drains_and_resumes_near_its_count() -> None:
    codel = CoDel(T, IV)
    run(codel, lambda now: 0.020, 0.0, 1.0)
    count = codel.count
    assert count > 5
    assert run(codel, lambda now: 0.001, 1.0, 1.2) == []  # drained: no drops ...
    assert not codel.dropping  # ... and out of the dropping state
    # Standing again soon after: one interval, then about the old rate at once.
    drops = run(codel, lambda now: 0.020, 1.2, 1.5)
    assert drops[0] == pytest.approx(1.2 + IV, abs=STEP)
    assert codel.count > 1 and drops[1] - drops[0] < IV / 2


def test_after_a_long_quiet_the_count_starts_over() -> None:
    codel = CoDel(T, IV)
    run(codel, lambda now: 0.020, 0.0, 1.0)
    run(codel, lambda now: 0.0, 1.0, 10.0)
    drops = run(codel, lambda now: 0.020, 10.0, 10.5)
    assert drops[1] - drops[0] == pytest.approx(IV, abs=STEP)


def test_sparse_calls_drop_at_most_once_each_and_keep_the_law_in_time() -> None:
    codel = CoDel(T, IV)
    # Called every 50 ms only: drops follow the clock, not the number of calls.
    times = [i * 0.05 for i in range(40)]
    drops = [t for t in times if codel.should_drop(0.020, t)]
    assert drops[0] == pytest.approx(IV, abs=0.05 + 1e-9)
    assert len(drops) <= len(times) and codel.drops == len(drops)


def test_bad_parameters_are_refused() -> None:
    for target, interval in ((0.0, IV), (IV, IV), (0.2, IV), (-1.0, IV)):
        with pytest.raises(ValueError):
            CoDel(target, interval)


# --- the Driver ----------------------------------------------------------------------------

A, B = ("192.0.2.1", 1), ("192.0.2.2", 2)


def transport_message(i: int, size: int = 1200) -> bytes:
    return bytes([4, 0, 0, 0]) + i.to_bytes(4, "big") + bytes(size - 8)


class Wire:
    """An addressed transport that, as UDP's, says how long each delivery waited."""

    addressed = True

    def __init__(self) -> None:
        self.deliver: Any = None
        self.waited = 0.0

    def open(self, receive: Any) -> None:
        self.deliver = receive

    def send(self, batch: Any) -> int:
        return 0

    def close(self) -> None:
        pass


def test_only_large_transport_messages_are_victims() -> None:
    small = (transport_message(0, CODEL_MIN_BYTES - 1), A)
    handshake = (bytes([1]) + bytes(147 + 200), A)
    big = (transport_message(1), A)
    other = (transport_message(2), B)
    assert codel_victim([small, handshake, other, big, big], A) == 3
    assert codel_victim([small, handshake, big], B) == -1
    assert codel_victim([small, handshake], A) == -1


def test_a_standing_delay_is_dropped_from_and_counted_a_short_one_is_not() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = FakeCore()
        driver = Driver(core, loop, lambda e: None)
        wire = Wire()
        driver.attach(wire)
        driver.codel_target, driver.codel_interval = T, IV
        now = loop.time()
        ping = (bytes([4]) + bytes(127), B)  # a ping's size: never dropped
        sent = 0
        # 300 ms of deliveries every millisecond, each having waited 10 ms in the
        # socket: the delay stands, CoDel drops from it at its pace.
        for i in range(300):
            wire.waited = 0.010
            wire.deliver([(transport_message(i), A), ping], now + i * STEP)
            sent += 1
        drops = core.drops.get("codel", 0)
        assert 1 <= drops < 20  # after one interval, then at interval/sqrt(n)
        received = core.received
        assert received.count(ping) == sent  # small datagrams all went through
        assert len(received) == 2 * sent - drops
        # Short waits: no more drops, however long it goes on.
        for i in range(300, 600):
            wire.waited = 0.0005
            wire.deliver([(transport_message(i), A)], now + i * STEP)
        assert core.drops["codel"] == drops
        assert not driver.codels[A].dropping
        driver.close()

    asyncio.run(main())


def test_what_waits_in_the_queues_counts_toward_the_delay() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = FakeCore()
        driver = Driver(core, loop, lambda e: None)
        wire = Wire()
        driver.attach(wire)
        driver.budget = 2
        # Deliveries that waited no time in the socket but came faster than the core is
        # fed (two datagrams a wake-up): they wait in the per-source queues, and that
        # is a sojourn too.
        driver.codel_target, driver.codel_interval = 0.001, 0.005
        for i in range(64):
            wire.deliver([(transport_message(i * 64 + j), A) for j in range(64)], loop.time())
        start = loop.time()
        while len(driver.fair) and loop.time() < start + 5:
            await asyncio.sleep(0)
        assert len(driver.fair) == 0
        assert loop.time() - start > 0.005  # the last waited more than an interval
        drops = core.drops.get("codel", 0)
        assert drops > 0
        assert len(core.received) == 64 * 64 - drops - core.drops.get("fair_queue_full", 0)
        driver.close()

    asyncio.run(main())


def test_the_drop_reason_is_registered() -> None:
    assert "codel" in RELAY_DROP_REASONS and "codel" in CLIENT_DROP_REASONS


# --- receive timestamps ------------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="SO_TIMESTAMPNS and UDP GRO are Linux's")
@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_read_says_when_its_first_datagram_arrived(family: int, host: str) -> None:
    with (
        socket.socket(family, socket.SOCK_DGRAM) as rx,
        socket.socket(family, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((host, 0))
        rx.setblocking(False)
        batch = UdpBatch(rx)
        assert batch.gro and batch.stamps
        assert batch.recv(10) == [] and batch.arrived == 0.0
        before = time.time()
        tx.sendto(b"first", rx.getsockname()[:2])
        # Queued by now (a busy machine may deliver even loopback a moment later).
        assert select.select([rx], [], [], 5.0)[0]
        queued = time.time()
        time.sleep(0.05)  # it waits in the socket's buffer
        tx.sendto(b"second", rx.getsockname()[:2])
        got = batch.recv(10)
        stamp = batch.arrived  # of the read that returned the first datagram
        deadline = time.monotonic() + 5.0
        while len(got) < 2 and time.monotonic() < deadline:  # the second, if late
            select.select([rx], [], [], 0.1)
            got += batch.recv(10)
        assert [d for d, _ in got] == [b"first", b"second"]
        # The first datagram's arrival, not the read's nor the second's.
        assert before - 0.01 <= stamp <= queued + 0.001
        assert time.time() - stamp >= 0.05
        # A GRO train (GSO send) split over two calls: both parts say the train's time.
        sender = UdpBatch(tx)
        train = [(bytes([i]) * 1000, rx.getsockname()[:2]) for i in range(20)]
        sent = time.time()
        assert sender.send(train) == 0
        assert select.select([rx], [], [], 5.0)[0]
        queued = time.time()  # the train's first datagram is in by now
        time.sleep(0.02)
        first = batch.recv(5)
        stamp = batch.arrived
        assert len(first) == 5 and sent - 0.01 <= stamp <= queued + 0.001
        rest = []
        for _ in range(20):
            rest += batch.recv(100)
            if len(first) + len(rest) == 20:
                break
        assert batch.arrived == stamp or not sender.gso
        assert [d for d, _ in first + rest] == [d for d, _ in train]


@pytest.mark.skipif(not LINUX, reason="SO_TIMESTAMPNS and UDP GRO are Linux's")
def test_the_transport_tells_the_driver_how_long_a_delivery_waited() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        transport = UdpTransport(rx, loop)
        seen: list[float] = []
        transport.open(lambda batch, now: seen.append(transport.waited))
        transport.loop.remove_reader(rx.fileno())  # read by hand below, after a wait
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"x" * 100, rx.getsockname())
            await asyncio.sleep(0.03)
            transport._readable()
        assert len(seen) == 1 and 0.03 <= seen[0] < 1.0
        transport._receive = None
        transport.close()

    asyncio.run(main())


def test_while_a_backlog_waits_small_datagrams_skip_it_within_a_bound() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = FakeCore()
        driver = Driver(core, loop, lambda e: None)
        wire = Wire()
        driver.attach(wire)
        driver.budget = 8
        wire.deliver([(transport_message(i), A) for i in range(200)], loop.time())
        assert len(driver.fair) > 0  # A's backlog
        ping = (bytes([4]) + bytes(127), A)  # small, from the same source
        before = len(core.received)
        wire.deliver([(transport_message(1000), A), ping], loop.time())
        # The ping went to the core at once, ahead of A's large datagrams.
        assert core.received[before:] == [ping]
        # A flood of small datagrams skips the queues by SMALL_FIRST a delivery only.
        smalls = [(bytes([4]) + i.to_bytes(4, "big") + bytes(60), B) for i in range(100)]
        before = len(core.received)
        wire.deliver(smalls, loop.time())
        # (then B, a source that was idle, is served one wake-up's budget: fairness)
        got = core.received[before:]
        assert got[:SMALL_FIRST] == smalls[:SMALL_FIRST]
        assert len(got) <= SMALL_FIRST + driver.budget < len(smalls)
        while len(driver.fair):
            await asyncio.sleep(0)
        assert len(core.received) == 200 + 1 + 1 + 100  # nothing lost, all in the end
        got_a = [d for d, a in core.received if a == A and len(d) >= CODEL_MIN_BYTES]
        assert got_a == [transport_message(i) for i in [*range(200), 1000]]  # in order
        driver.close()

    asyncio.run(main())
