"""Batched UDP I/O (gtun.io.udp): GSO sends and GRO reads on loopback, their fallbacks,
and a GSO/GRO transfer over a real veth between two namespaces."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gtun.io.udp import (
    MAX_GSO_BYTES,
    MAX_GSO_SEGMENTS,
    SOL_UDP,
    UDP_BATCH,
    UDP_SEGMENT,
    UdpBatch,
    UdpTransport,
)
from gtun.lab.netns import Lab
from labkit import run_python

LINUX = sys.platform.startswith("linux")
FAMILIES = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
SO_NO_CHECK = 11  # <asm-generic/socket.h>: no UDP checksum on send, which GSO refuses


@pytest.fixture
def lab_prefix() -> str:
    return "gtu"


class SpySocket(socket.socket):
    """A real UDP socket whose sendmsg calls are recorded (segments per call) and can be
    made to fail with `refuse` (an errno)."""

    def __init__(self, family: int) -> None:
        super().__init__(family, socket.SOCK_DGRAM)
        self.gso_calls: list[int] = []
        self.gso_bytes: list[int] = []
        self.refuse: int | None = None

    def sendmsg(self, buffers: Any, ancdata: Any = (), *args: Any) -> int:  # type: ignore[override]
        buffers = list(buffers)
        if self.refuse is not None:
            raise OSError(self.refuse, "refused by the test")
        [(level, kind, data)] = ancdata
        assert (level, kind) == (SOL_UDP, UDP_SEGMENT)
        segment = struct.unpack("=H", data)[0]
        total = sum(len(b) for b in buffers)
        self.gso_calls.append(-(-total // segment))
        self.gso_bytes.append(total)
        return super().sendmsg(buffers, ancdata, *args)


@pytest.fixture
def sockets() -> Iterator[Callable[..., socket.socket]]:
    made: list[socket.socket] = []

    def make(family: int, host: str, *, spy: bool = False) -> socket.socket:
        sock = SpySocket(family) if spy else socket.socket(family, socket.SOCK_DGRAM)
        made.append(sock)
        sock.bind((host, 0))
        sock.setblocking(False)
        return sock

    yield make
    for sock in made:
        sock.close()


def collect(read: Callable[[], list[tuple[bytes, Any]]], sock: socket.socket, want: int):
    """Read with `read` until `want` datagrams arrived (or 3 s passed)."""
    got: list[tuple[bytes, Any]] = []
    deadline = time.monotonic() + 3
    while len(got) < want and time.monotonic() < deadline:
        select.select([sock], [], [], 0.05)
        got += read()
    return got


def plain_reader(sock: socket.socket) -> Callable[[], list[tuple[bytes, Any]]]:
    def read() -> list[tuple[bytes, Any]]:
        out = []
        while True:
            try:
                out.append(sock.recvfrom(70000))
            except BlockingIOError:
                return out

    return read


def train(addr: Any, count: int = 40, size: int = 1456) -> list[tuple[bytes, Any]]:
    """`count` datagrams of `size` bytes, numbered, then one short one."""
    body = [(i.to_bytes(2, "big") + bytes([i]) * (size - 2), addr) for i in range(count)]
    return [*body, (b"the short one", addr)]


# -- loopback -------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "host"), FAMILIES)
@pytest.mark.parametrize("receiver", ["plain", "gro"])
def test_a_train_arrives_whole_and_in_order(sockets, family, host, receiver) -> None:
    tx, rx = sockets(family, host, spy=True), sockets(family, host)
    sender = UdpBatch(tx)
    batch = UdpBatch(rx, gro=receiver == "gro")  # GRO must be on before the train arrives
    datagrams = train(rx.getsockname())
    assert sender.send(datagrams) == 0
    if receiver == "gro":
        got = collect(lambda: batch.recv(64), rx, len(datagrams))
    else:
        got = collect(plain_reader(rx), rx, len(datagrams))
    assert [d for d, _ in got] == [d for d, _ in datagrams]
    assert {a for _, a in got} == {tx.getsockname()}
    assert sender.stats["datagrams_sent"] == 41
    if LINUX:
        # 40 equal datagrams and the short one that ends the group: one sendmsg.
        assert sender.gso
        assert tx.gso_calls == [41]
        assert sender.stats["gso_sends"] == 1
        if receiver == "gro":
            assert batch.gro
            assert batch.stats["gro_reads"] == 1  # loopback keeps the train whole
            assert batch.stats["datagrams_received"] == 41


def test_groups_break_on_address_size_and_limits(sockets) -> None:
    tx = sockets(socket.AF_INET, "127.0.0.1", spy=True)
    rx1, rx2 = sockets(socket.AF_INET, "127.0.0.1"), sockets(socket.AF_INET, "127.0.0.1")
    a1, a2 = rx1.getsockname(), rx2.getsockname()
    sizes_and_addrs = (
        [(100, a1)] * 3  # group of 3
        + [(100, a2)] * 2  # another address: group of 2
        + [(100, a1)]  # alone: the next is bigger
        + [(200, a1)] * 4 + [(150, a1)]  # group of 5, the short one ends it
        + [(150, a1)] * 2  # group of 2
        + [(50, a2)] * (MAX_GSO_SEGMENTS + 6)  # 64, then 6
        + [(1456, a2)] * 50  # 65000 bytes at most: 44, then 6
        + [(300, a1), (300, a2), (300, a1)]  # three alone
    )  # fmt: skip
    datagrams = [
        (i.to_bytes(2, "big") + bytes([i % 256]) * (size - 2), addr)
        for i, (size, addr) in enumerate(sizes_and_addrs)
    ]
    sender = UdpBatch(tx)
    if not sender.gso:
        pytest.skip("no UDP GSO on this kernel")
    assert sender.send(datagrams) == 0
    assert tx.gso_calls == [3, 2, 5, 2, 64, 6, 44, 6]
    assert sender.stats["gso_sends"] == 8
    for rx, addr in ((rx1, a1), (rx2, a2)):
        want = [d for d, a in datagrams if a == addr]
        got = collect(plain_reader(rx), rx, len(want))
        assert [d for d, _ in got] == want


def test_random_batches_keep_order_per_destination(sockets) -> None:
    rng = random.Random(4)
    tx = sockets(socket.AF_INET, "127.0.0.1", spy=True)
    rxs = [sockets(socket.AF_INET, "127.0.0.1") for _ in range(3)]
    addrs = [rx.getsockname() for rx in rxs]
    sender = UdpBatch(tx)
    sent: dict[Any, list[bytes]] = {addr: [] for addr in addrs}
    got: dict[Any, list[bytes]] = {addr: [] for addr in addrs}
    serial = 0
    for _ in range(20):
        batch = []
        while len(batch) < 60:
            addr, size = rng.choice(addrs), rng.choice([1, 37, 100, 1200, 1456, 1456, 3000])
            for _ in range(rng.choice([1, 2, 5, 30])):
                data = serial.to_bytes(4, "big") + bytes([serial % 256]) * size
                serial += 1
                batch.append((data, addr))
                sent[addr].append(data)
        assert sender.send(batch) == 0
        for rx, addr in zip(rxs, addrs, strict=True):
            want = len(sent[addr]) - len(got[addr])
            got[addr] += [d for d, _ in collect(plain_reader(rx), rx, want)]
    assert got == sent
    assert sender.stats["datagrams_sent"] == serial
    if sender.gso:
        assert tx.gso_calls and max(tx.gso_calls) <= MAX_GSO_SEGMENTS
        assert max(tx.gso_bytes) <= MAX_GSO_BYTES
        assert sender.stats["gso_sends"] == len(tx.gso_calls)


def test_dual_stack_socket_sends_gso_to_a_mapped_ipv4_address(sockets) -> None:
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        tx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tx.bind(("::", 0))
        tx.setblocking(False)
        rx = sockets(socket.AF_INET, "127.0.0.1")
        mapped = ("::ffff:127.0.0.1", rx.getsockname()[1], 0, 0)
        sender = UdpBatch(tx)
        datagrams = train(mapped, count=10)
        assert sender.send(datagrams) == 0
        got = collect(plain_reader(rx), rx, len(datagrams))
        assert [d for d, _ in got] == [d for d, _ in datagrams]
        if LINUX:
            assert sender.stats["gso_sends"] == 1
    finally:
        tx.close()


def test_without_gso_each_datagram_is_one_sendto(sockets) -> None:
    tx, rx = sockets(socket.AF_INET, "127.0.0.1", spy=True), sockets(socket.AF_INET, "127.0.0.1")
    sender = UdpBatch(tx, gso=False)
    assert not sender.gso
    datagrams = train(rx.getsockname())
    assert sender.send(datagrams) == 0
    assert tx.gso_calls == []
    assert sender.stats["gso_sends"] == 0
    got = collect(plain_reader(rx), rx, len(datagrams))
    assert [d for d, _ in got] == [d for d, _ in datagrams]


@pytest.mark.parametrize("refusal", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT])
def test_a_gso_refusal_resends_the_batch_and_turns_gso_off(sockets, caplog, refusal) -> None:
    tx, rx = sockets(socket.AF_INET, "127.0.0.1", spy=True), sockets(socket.AF_INET, "127.0.0.1")
    sender = UdpBatch(tx)
    if not sender.gso:
        pytest.skip("no UDP GSO on this kernel")
    tx.refuse = refusal
    first, second = train(rx.getsockname(), count=5), train(rx.getsockname(), count=7)
    with caplog.at_level(logging.WARNING, logger="gtun.io.udp"):
        assert sender.send(first) == 0
        assert not sender.gso
        assert sender.send(second) == 0
    assert len([r for r in caplog.records if "GSO" in r.getMessage()]) == 1
    got = collect(plain_reader(rx), rx, len(first) + len(second))
    assert [d for d, _ in got] == [d for d, _ in first + second]
    assert sender.stats["gso_sends"] == 0
    assert sender.stats["datagrams_sent"] == len(first) + len(second)


def test_the_kernel_refusing_gso_for_real_is_survived(sockets) -> None:
    # A socket that sends without UDP checksums cannot use GSO: the kernel says EINVAL.
    tx, rx = sockets(socket.AF_INET, "127.0.0.1"), sockets(socket.AF_INET, "127.0.0.1")
    tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    sender = UdpBatch(tx)
    if not sender.gso:
        pytest.skip("no UDP GSO on this kernel")
    datagrams = train(rx.getsockname(), count=8)
    assert sender.send(datagrams) == 0
    assert not sender.gso
    got = collect(plain_reader(rx), rx, len(datagrams))
    assert [d for d, _ in got] == [d for d, _ in datagrams]


def test_a_bad_address_is_not_blamed_on_gso(sockets) -> None:
    # Port 0 gets EINVAL from the kernel with or without GSO: the group is dropped and
    # reported, GSO stays on, and the rest of the batch still goes as a train.
    tx, rx = sockets(socket.AF_INET, "127.0.0.1", spy=True), sockets(socket.AF_INET, "127.0.0.1")
    sender = UdpBatch(tx)
    if not sender.gso:
        pytest.skip("no UDP GSO on this kernel")
    errors: list[OSError] = []
    sender.on_error = errors.append
    good = train(rx.getsockname(), count=6)
    assert sender.send(train(("127.0.0.1", 0), count=4) + good) == 5
    assert sender.gso
    assert [e.errno for e in errors] == [errno.EINVAL] * 5
    assert sender.stats["send_errors"] == 5 and sender.stats["gso_sends"] == 1
    got = collect(plain_reader(rx), rx, len(good))
    assert [d for d, _ in got] == [d for d, _ in good]


def test_a_full_send_buffer_drops_whole_groups_and_counts_them(sockets) -> None:
    tx, rx = sockets(socket.AF_INET, "127.0.0.1", spy=True), sockets(socket.AF_INET, "127.0.0.1")
    sender = UdpBatch(tx)
    tx.refuse = errno.EAGAIN  # what a full socket buffer says
    datagrams = train(rx.getsockname(), count=10) + [(b"x" * 50, rx.getsockname())] * 3
    dropped = sender.send(datagrams)
    if sender.gso:
        assert dropped == 11 + 3  # two groups, both refused; GSO stays on
        assert sender.stats["send_dropped"] == 14
        assert sender.stats["datagrams_sent"] == 0
    tx.refuse = errno.ENOBUFS
    assert sender.send(datagrams) == (14 if sender.gso else 0)
    assert sender.gso == LINUX


@pytest.mark.parametrize("gro", [True, False])
def test_recv_respects_its_limit(sockets, gro) -> None:
    tx, rx = sockets(socket.AF_INET, "127.0.0.1"), sockets(socket.AF_INET, "127.0.0.1")
    sender, receiver = UdpBatch(tx), UdpBatch(rx, gro=gro)
    datagrams = train(rx.getsockname(), count=9)  # one train of 10 with GSO
    assert sender.send(datagrams) == 0
    select.select([rx], [], [], 2)
    got: list[tuple[bytes, Any]] = []
    sizes = []
    for _ in range(6):
        batch = receiver.recv(3)
        sizes.append(len(batch))
        got += batch
        if len(batch) < 3:
            assert receiver.pending == 0
    assert sizes == [3, 3, 3, 1, 0, 0]
    assert [d for d, _ in got] == [d for d, _ in datagrams]
    assert receiver.recv(0) == []


@pytest.mark.parametrize(("family", "host"), FAMILIES)
@pytest.mark.parametrize("gro", [True, False])
def test_recv_on_an_empty_socket_returns_nothing(sockets, family, host, gro) -> None:
    receiver = UdpBatch(sockets(family, host), gro=gro)
    assert receiver.recv(64) == []
    assert receiver.stats["datagrams_received"] == 0


@pytest.mark.parametrize("gro", [True, False])
@pytest.mark.parametrize("callback", [True, False])
def test_icmp_port_unreachable_reaches_on_error_and_recv_goes_on(sockets, gro, callback) -> None:
    # A client socket connected to a port nobody holds: its datagram comes back as ICMP
    # port unreachable, which Linux reports on the next call on the socket.
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    port = gone.getsockname()[1]
    gone.close()
    client = sockets(socket.AF_INET, "127.0.0.1")
    client.connect(("127.0.0.1", port))
    batch = UdpBatch(client, gro=gro)
    errors: list[OSError] = []
    if callback:
        batch.on_error = errors.append
    assert batch.send([(b"anyone there?", ("127.0.0.1", port))]) == 0
    time.sleep(0.05)  # the ICMP error comes back through the loopback softirq
    # Then the port comes back to life and answers.
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.bind(("127.0.0.1", port))
        server.sendto(b"hello", client.getsockname())
        server.sendto(b"again", client.getsockname())
        got = collect(lambda: batch.recv(8), client, 2)
    finally:
        server.close()
    assert [d for d, _ in got] == [b"hello", b"again"]
    assert [type(e) for e in errors] == ([ConnectionRefusedError] if callback else [])
    assert batch.stats["recv_errors"] == 1


# -- the transport -----------------------------------------------------------------------


@pytest.mark.parametrize("batching", [True, False])
def test_the_transport_delivers_bounded_batches_in_order_and_closes(sockets, batching) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rx = sockets(socket.AF_INET, "127.0.0.1")  # the transport owns it from here
        transport = UdpTransport(rx, loop, batching=batching)
        assert transport.addressed and transport.gro == (batching and LINUX)
        batches: list[list[tuple[bytes, Any]]] = []
        transport.open(lambda batch, now: batches.append(batch))
        tx = sockets(socket.AF_INET, "127.0.0.1")
        datagrams = [(i.to_bytes(2, "big") * 700, rx.getsockname()) for i in range(3 * UDP_BATCH)]
        sender = UdpBatch(tx)
        for start in range(0, len(datagrams), 40):  # GSO trains: GRO reads take them whole
            assert sender.send(datagrams[start : start + 40]) == 0
        deadline = loop.time() + 3
        while sum(map(len, batches)) < len(datagrams) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        got = [item for batch in batches for item in batch]
        assert [d for d, _ in got] == [d for d, _ in datagrams]
        assert {a for _, a in got} == {tx.getsockname()}
        assert max(map(len, batches)) <= UDP_BATCH < len(datagrams)
        # Sends go out (through GSO with batching); what the socket refuses is counted.
        back = sockets(socket.AF_INET, "127.0.0.1")
        assert transport.send(train(back.getsockname(), count=5)) == 0
        assert transport.send([(b"to port 0", ("127.0.0.1", 0))]) == 1
        assert len(collect(plain_reader(back), back, 6)) == 6
        transport.close()
        transport.close()  # idempotent
        assert rx.fileno() == -1

    asyncio.run(main())


# -- over a real veth between two namespaces ------------------------------------------

RECEIVER = r"""
import json, select, socket, sys, time
from gtun.io.udp import UdpBatch
count, size = int(sys.argv[1]), int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, 33, 1 << 23)  # SO_RCVBUFFORCE: no drops to a full queue
sock.bind(("10.241.1.2", 5000))
sock.setblocking(False)
batch = UdpBatch(sock)
print("ready", flush=True)
got = []
deadline = time.monotonic() + 10
while len(got) < count and time.monotonic() < deadline:
    select.select([sock], [], [], 0.2)
    got += batch.recv(256)
bad = [
    i for i, (data, _) in enumerate(got)
    if len(data) != size or data != i.to_bytes(4, "big") + bytes([i % 251]) * (size - 4)
]
print(json.dumps({"received": len(got), "bad": bad[:5], "gro": batch.gro,
                  "stats": batch.stats}), flush=True)
"""

SENDER = r"""
import json, sys, time
import socket
from gtun.io.udp import UdpBatch
count, size = int(sys.argv[1]), int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setblocking(False)
batch = UdpBatch(sock)
addr = ("10.241.1.2", 5000)
datagrams = [(i.to_bytes(4, "big") + bytes([i % 251]) * (size - 4), addr) for i in range(count)]
dropped = 0
for start in range(0, count, 44):
    dropped += batch.send(datagrams[start : start + 44])
    time.sleep(0.001)  # the receiver is a Python process too
print(json.dumps({"dropped": dropped, "gso": batch.gso, "stats": batch.stats}))
"""


def transfer(lab: Lab, sender_ns, receiver_ns, count: int, size: int, log: Path) -> tuple:
    log.write_text("")
    proc = receiver_ns.spawn([sys.executable, "-c", RECEIVER, str(count), str(size)],
                             log_path=log)  # fmt: skip
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    sent = json.loads(run_python(sender_ns, SENDER, str(count), str(size)).stdout)
    proc.wait(timeout=15)
    received = json.loads(log.read_text().splitlines()[-1])
    return sent, received


def test_gso_trains_cross_a_veth_and_arrive_coalesced(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.add_ns("a"), lab.add_ns("b")
    lab.veth(a, "gtua", "10.241.1.1/24", b, "gtub", "10.241.1.2/24")
    # No ethtool needed: veth passes a GSO packet to its peer unsplit, and a socket with
    # UDP_GRO takes it whole.
    sent, received = transfer(lab, a, b, 2000, 1456, tmp_path / "rx1.log")
    assert sent["dropped"] == 0 and sent["gso"]
    assert sent["stats"]["gso_sends"] >= 1
    assert received["gro"]
    assert received["received"] == 2000 and received["bad"] == []
    assert received["stats"]["gro_reads"] >= 1
    # Datagrams bigger than the veth MTU cannot go as a GSO train (EMSGSIZE): they go one
    # by one and the kernel fragments them, as a plain sendto would; GSO stays on.
    sent, received = transfer(lab, a, b, 60, 2000, tmp_path / "rx2.log")
    assert sent["dropped"] == 0 and sent["gso"]
    assert sent["stats"]["gso_sends"] == 0
    assert received["received"] == 60 and received["bad"] == []


@pytest.mark.parametrize("gro", [True, False])
def test_admit_refuses_a_train_whole_before_it_is_cut_apart(sockets, gro) -> None:
    # The Driver's early drop (driver.py, Fairness): a train whose source may not queue
    # more is skipped in one piece; another source's datagram still comes through.
    tx, other, rx = (sockets(socket.AF_INET, "127.0.0.1") for _ in range(3))
    sender, receiver = UdpBatch(tx), UdpBatch(rx, gro=gro)
    asked: list[tuple[Any, int]] = []

    def admit(addr: Any, count: int) -> bool:
        asked.append((addr, count))
        return addr != tx.getsockname()

    receiver.admit = admit
    assert sender.send(train(rx.getsockname(), count=9)) == 0  # 10 datagrams
    other.sendto(b"ping", rx.getsockname())
    got = collect(lambda: receiver.recv(64), rx, 1)
    time.sleep(0.05)
    got += receiver.recv(64)
    assert got == [(b"ping", other.getsockname())]
    refused = [n for addr, n in asked if addr == tx.getsockname()]
    if gro and sender.gso:
        assert refused == [10]  # asked once, for the whole train
    else:
        assert sum(refused) == 10 and set(refused) == {1}
    assert receiver.pending == 0
    receiver.admit = None  # taking all again
    assert sender.send(train(rx.getsockname(), count=2)) == 0
    assert len(collect(lambda: receiver.recv(64), rx, 3)) == 3
