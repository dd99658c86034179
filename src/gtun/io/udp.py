"""Batched UDP I/O: UDP GSO on send and UDP GRO on receive (Linux), with a plain fallback.

Theory of operation.  With UDP_SEGMENT (GSO, Linux 4.18) one sendmsg carries many
datagrams of one size to one address: the kernel splits the buffer into `segment size`
pieces (the last may be shorter) as late as possible, often in the NIC, so the per-datagram
cost of a send is paid once per group.  With UDP_GRO (Linux 5.0) set on a socket, the kernel
hands that socket whole trains of same-size datagrams from one sender in one read, with a
UDP_GRO control message saying the segment size; we cut them apart again here.  A train
arrives coalesced when the sender used GSO and the packet was never split on the way
(loopback, veth: no ethtool setting needed) or when a receiving NIC's GRO merged a burst.
Plain sends over a veth stay single even with `rx-gro` on: each is polled on its own.

`UdpBatch` wraps a non-blocking socket it does not own; `UdpTransport` owns one and
makes it a transport (transport.py) on the event loop.  `send()` groups consecutive
same-address, same-size datagrams; `recv()` returns datagrams, never coalesced trains.
When the kernel refuses GSO for this socket's route (EIO: an IPsec route, or before
Linux 6.11 an egress device without checksum offload; EINVAL/ENOPROTOOPT/EOPNOTSUPP
otherwise), the group is sent again one
datagram at a time, so nothing is lost to the refusal, and if that works GSO is switched
off for good (if it fails too, the address was at fault, not GSO).  EMSGSIZE (a segment
larger than the path MTU, which GSO cannot fragment) sends that group and later groups of
that size or more one by one, letting the kernel fragment as a plain sendto would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from gtun.io.transport import LONE_GAP, Admit, Receive

log = logging.getLogger(__name__)

# -- constants from <linux/udp.h> (level SOL_UDP); the socket module lacks them ---------
SOL_UDP = 17
UDP_SEGMENT = 103  # send: cmsg or sockopt, a __u16 segment size (udp_cmsg_send)
UDP_GRO = 104  # receive: sockopt int; the cmsg carries an int segment size (udp_cmsg_recv)
# <asm-generic/socket.h> (level SOL_SOCKET): each read carries the kernel's arrival time
# of the datagram, or of the first of a GRO train, as a struct timespec (CLOCK_REALTIME).
SOL_SOCKET = socket.SOL_SOCKET
SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: a native-long timespec; also the cmsg type

# The kernel's UDP_MAX_SEGMENTS was 64 until Linux 6.9 raised it to 128: use the lower.
MAX_GSO_SEGMENTS = 64

# -- tuning knobs -----------------------------------------------------------------------
# Bytes in one GSO send: below the IPv4 limit of 65507 payload bytes with room to spare.
MAX_GSO_BYTES = 65000
# One receive buffer: a GRO train is at most 64 KiB of payload; twice that never truncates.
RECV_BUFFER = 1 << 17
# Without GRO: the largest UDP payload (65527 bytes over IPv6) fits.
PLAIN_RECV = 1 << 16
# Room for the UDP_GRO cmsg and a few others someone may enable on the socket (PKTINFO).
ANCILLARY_BUFFER = 256
# Datagrams one wake-up reads: bounded, so that the UDP socket does not starve the TUN,
# and four times what the Driver hands the core per wake-up (driver.FAIR_BUDGET), so that
# the socket's buffer, one first-in first-out queue for every peer, stays short under a
# flood: what is read waits in the Driver's per-source queues instead.
UDP_BATCH = 256
# Kernel socket buffers, large enough to absorb bursts.
SOCKET_BUFFER = 4 << 20

# Errors that say "this socket cannot use GSO": switch it off and resend plainly.
_GSO_REFUSED = frozenset(
    {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP}
)
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_TIMESPEC = struct.Struct("@ll")


def _probe_gso(sock: socket.socket) -> bool:
    """Whether this kernel knows UDP_SEGMENT for `sock` (reading it changes nothing)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def _enable_timestamps(sock: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def _enable_gro(sock: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class UdpBatch:
    """Batched reads and writes on one non-blocking UDP socket (AF_INET or AF_INET6).

    Owns nothing but the socket reference; probes what the kernel allows at init.
    `gso`/`gro` say whether UDP_SEGMENT sends and UDP_GRO reads are in use; pass
    `gso=False` or `gro=False` to keep them off.  Neither method raises for socket errors:
    they are counted in `stats` and handed to `on_error` if set.

    With `gro` on, every read of the socket must go through `recv()`: a plain recvfrom
    would return a coalesced train as one long datagram.  With `gro` on, reads also
    carry the kernel's arrival time (SO_TIMESTAMPNS, `stamps`): after each recv(),
    `arrived` is the wall-clock time (time.time()) the first datagram it returned reached
    the socket, 0.0 when unknown, so that the time it waited in the kernel's buffer is
    time.time() - arrived.  One control message per read (one per GRO train).
    """

    def __init__(self, sock: socket.socket, *, gso: bool = True, gro: bool = True) -> None:
        self.sock = sock
        self.on_error: Callable[[OSError], None] | None = None
        self.gso = gso and _probe_gso(sock)
        self.gro = gro and _enable_gro(sock)
        self.stamps = self.gro and _enable_timestamps(sock)
        self.arrived = 0.0
        self._pending_arrived = 0.0  # the arrival time of the train _pending came from
        self.reads = 0  # successful reads (datagrams or GRO trains) of the last recv()
        # Asked before a datagram or a GRO train is taken (transport.Admit); None: take
        # all.  The Driver sets it only while datagrams wait in its queues.
        self.admit: Admit | None = None
        self.stats: dict[str, int] = {
            "datagrams_sent": 0,
            "datagrams_received": 0,
            "gso_sends": 0,  # sendmsg calls carrying two or more datagrams
            "gro_reads": 0,  # reads that returned two or more coalesced datagrams
            "send_dropped": 0,  # datagrams not sent: buffer full or an error
            "send_errors": 0,  # OSErrors other than "buffer full" on send
            "recv_errors": 0,  # OSErrors on receive (ICMP errors reported on the socket)
            "truncated": 0,  # GRO reads longer than the buffer (their tail is lost)
        }
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        # Datagrams of a GRO train that did not fit the last recv() limit.
        self._pending: list[tuple[bytes, Any]] = []
        # Segment sizes at or above this failed with EMSGSIZE (larger than the path MTU):
        # those go one by one, which lets the kernel fragment them as sendto would.
        self._gso_size_limit = MAX_GSO_BYTES + 1
        self._cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}

    @property
    def pending(self) -> int:
        """Datagrams already read from the socket and held for the next recv().

        Non-zero only right after a recv() that returned exactly `limit` datagrams: the
        socket may then be empty while this is not, so call recv() again.
        """
        return len(self._pending)

    # -- receive ------------------------------------------------------------------------

    def recv(self, limit: int, once: bool = False) -> list[tuple[bytes, Any]]:
        """Up to `limit` datagrams waiting now, as (data, address); [] when none.
        `once`: from one successful read only (a datagram or a GRO train), without the
        read that would say the socket is empty (transport.LONE_GAP).

        Never blocks or raises for socket errors.  A GRO train larger than what is left
        of `limit` is split and its remainder returned first by the next call.
        """
        if limit <= 0:
            return []
        out: list[tuple[bytes, Any]]
        self.arrived = 0.0
        self.reads = 0
        if self._pending:
            self.arrived = self._pending_arrived
            out = self._pending[:limit]
            del self._pending[:limit]
            if len(out) >= limit:
                self.stats["datagrams_received"] += len(out)
                return out
        else:
            out = []
        if self.gro:
            self.reads = self._recv_gro(out, limit, once)
        else:
            self.reads = self._recv_plain(out, limit, once)
        self.stats["datagrams_received"] += len(out)
        return out

    def _recv_plain(self, out: list[tuple[bytes, Any]], limit: int, once: bool) -> int:
        recv = self.sock.recvfrom
        append = out.append
        admit = self.admit
        reads = 0
        for _ in range(limit - len(out)):
            try:
                item = recv(PLAIN_RECV)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._recv_error(exc)
                continue
            reads += 1
            if admit is None or admit(item[1], 1):
                append(item)
            if once:
                break
        return reads

    def _recv_gro(self, out: list[tuple[bytes, Any]], limit: int, once: bool) -> int:
        recvmsg_into = self.sock.recvmsg_into
        bufs = [self._buf]
        view = self._view
        append = out.append
        admit = self.admit  # set and cleared by the Driver between reads, never during one
        gro_reads = 0
        reads = 0
        for _ in range(limit - len(out)):
            try:
                n, ancdata, flags, addr = recvmsg_into(bufs, ANCILLARY_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._recv_error(exc)
                continue
            reads += 1
            segment = 0
            stamp = 0.0
            for level, kind, data in ancdata:
                if kind == UDP_GRO and level == SOL_UDP and len(data) >= 4:
                    segment = _INT.unpack_from(data)[0]
                elif kind == SO_TIMESTAMPNS and level == SOL_SOCKET and len(data) >= 16:
                    sec, nsec = _TIMESPEC.unpack_from(data)
                    stamp = sec + nsec * 1e-9
            if not out:
                self.arrived = stamp
            if segment <= 0 or n <= segment:
                if admit is None or admit(addr, 1):
                    append((bytes(view[:n]), addr))
            else:
                gro_reads += 1
                if admit is not None and not admit(addr, -(-n // segment)):
                    continue  # its source's queue is full: dropped (and counted) whole
                if flags & socket.MSG_TRUNC:
                    # Keep the whole segments; the cut one and the unread rest are gone.
                    self.stats["truncated"] += 1
                    n -= n % segment
                room = limit - len(out)
                whole = bytes(view[:n])
                pieces = [(whole[i : i + segment], addr) for i in range(0, n, segment)]
                if len(pieces) <= room:
                    out.extend(pieces)
                else:
                    out.extend(pieces[:room])
                    self._pending = pieces[room:]
                    self._pending_arrived = stamp
            if once or len(out) >= limit:
                break
        if gro_reads:
            self.stats["gro_reads"] += gro_reads
        return reads

    def _recv_error(self, exc: OSError) -> None:
        self.stats["recv_errors"] += 1
        if self.on_error is not None:
            self.on_error(exc)

    # -- send ---------------------------------------------------------------------------

    def send(self, datagrams: Sequence[tuple[bytes, Any]]) -> int:
        """Send all `datagrams` (data, address tuple) in order; return how many were dropped.

        Never blocks or raises for socket errors: a full send buffer (EAGAIN, ENOBUFS)
        drops the datagram or GSO group, other errors also go to `on_error`.
        """
        if not self.gso:
            dropped = self._send_plain(datagrams, 0, len(datagrams))
        else:
            dropped = self._send_gso(datagrams)
        stats = self.stats
        stats["datagrams_sent"] += len(datagrams) - dropped
        if dropped:
            stats["send_dropped"] += dropped
        return dropped

    def _send_plain(self, datagrams: Sequence[tuple[bytes, Any]], start: int, end: int) -> int:
        sendto = self.sock.sendto
        dropped = 0
        for i in range(start, end):
            data, addr = datagrams[i]
            try:
                sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                dropped += 1
            except OSError as exc:
                dropped += 1
                if exc.errno != errno.ENOBUFS:
                    self._send_error(exc)
        return dropped

    def _send_gso(self, datagrams: Sequence[tuple[bytes, Any]]) -> int:
        sock = self.sock
        sendmsg = sock.sendmsg
        cmsgs = self._cmsgs
        n = len(datagrams)
        dropped = 0
        gso_sends = 0
        i = 0
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            if 0 < size < self._gso_size_limit:
                # Grow the group: same address, same size; a shorter one ends it.
                total = size
                stop = min(n, i + MAX_GSO_SEGMENTS)
                while j < stop:
                    other, other_addr = datagrams[j]
                    length = len(other)
                    if (
                        length > size
                        or length == 0
                        or total + length > MAX_GSO_BYTES
                        or (other_addr is not addr and other_addr != addr)
                    ):
                        break
                    total += length
                    j += 1
                    if length < size:
                        break
            if j - i == 1:
                dropped += self._send_plain(datagrams, i, j)
                i = j
                continue
            cmsg = cmsgs.get(size)
            if cmsg is None:
                cmsg = cmsgs[size] = [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
            try:
                # One joined buffer: measured a little faster than an iovec per datagram.
                sendmsg([b"".join([d for d, _ in datagrams[i:j]])], cmsg, 0, addr)
                gso_sends += 1
            except (BlockingIOError, InterruptedError):
                dropped += j - i
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    dropped += j - i
                elif exc.errno == errno.EMSGSIZE:
                    # A segment larger than the path MTU: GSO cannot fragment, sendto can.
                    self._gso_size_limit = min(self._gso_size_limit, size)
                    dropped += self._send_plain(datagrams, i, j)
                elif exc.errno in _GSO_REFUSED:
                    # EINVAL also means a bad address (port 0): blame GSO only when the
                    # same datagrams then go through one by one.
                    lost = self._send_plain(datagrams, i, j)
                    dropped += lost
                    if lost < j - i:
                        self._gso_refused(exc)
                        dropped += self._send_plain(datagrams, j, n)
                        break
                else:
                    dropped += j - i
                    self._send_error(exc)
            i = j
        if gso_sends:
            self.stats["gso_sends"] += gso_sends
        return dropped

    def _gso_refused(self, exc: OSError) -> None:
        self.gso = False
        log.warning(
            "UDP GSO refused by the kernel for this socket (%s); sending one datagram "
            "per call from now on",
            exc.strerror or exc,
        )

    def _send_error(self, exc: OSError) -> None:
        self.stats["send_errors"] += 1
        if self.on_error is not None:
            self.on_error(exc)


def set_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> None:
    """Receive and send buffers of `size` bytes each (large ones absorb bursts).  The
    *FORCE options (root) go past the namespace's rmem_max/wmem_max without changing
    those sysctls; without root the kernel caps them there."""
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        for opt in (force, plain):
            if opt is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
                break
            except OSError:
                continue


class UdpTransport:
    """A UDP socket as a transport (transport.py): endpoints are (host, port) tuples.

    Owns `sock` (closed by close()).  The socket is read directly, up to UDP_BATCH
    datagrams per wake-up (one read after a quiet spell: transport.LONE_GAP), rather
    than through an asyncio DatagramTransport, which would cost a loop iteration and a
    callback per datagram; sends go straight to the socket, whose kernel buffer is the
    bound: when it is full the datagram is dropped.  With
    `batching`, sends use UDP GSO and reads UDP GRO (UdpBatch).  Socket errors (an ICMP
    port unreachable, say) are counted in `stats` and handed to `on_error`."""

    addressed = True

    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        *,
        batching: bool = True,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        set_buffers(sock)
        self.sock = sock
        self.loop = loop
        self.batch = UdpBatch(sock, gso=batching, gro=batching)
        self.batch.on_error = on_error
        self._receive: Receive | None = None
        # Seconds the first datagram of the last delivery waited in the kernel's socket
        # buffer (0.0 when unknown): read by the Driver (driver.py, Delay) in receive().
        self.waited = 0.0
        self._last = 0.0  # the loop's time at the last wake-up (transport.LONE_GAP)
        self._busy = False  # whether it read more than one datagram or GRO train

    @property
    def gso(self) -> bool:
        return self.batch.gso

    @property
    def gro(self) -> bool:
        return self.batch.gro

    @property
    def stats(self) -> dict[str, int]:
        return self.batch.stats

    @property
    def admit(self) -> Admit | None:
        return self.batch.admit

    @admit.setter
    def admit(self, admit: Admit | None) -> None:
        self.batch.admit = admit

    def open(self, receive: Receive) -> None:
        self._receive = receive
        self.loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        receive = self._receive
        if receive is None:  # closed since this call was scheduled
            return
        batch = self.batch
        now = self.loop.time()
        # Idle: one read (transport.LONE_GAP); busy (the last wake-up found more than
        # one datagram, however long ago it began), batches.
        lone = now - self._last >= LONE_GAP and not self._busy
        self._last = now
        datagrams = batch.recv(UDP_BATCH, lone)
        self._busy = batch.reads > 1 or len(datagrams) > 1
        if datagrams:
            arrived = batch.arrived
            self.waited = max(0.0, time.time() - arrived) if arrived else 0.0
            receive(datagrams, now)
        if batch.pending:  # a GRO train left datagrams over: the socket will not say so
            self.loop.call_soon(self._readable)

    def send(self, datagrams: Sequence[tuple[bytes, Any]]) -> int:
        return self.batch.send(datagrams)

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self._receive is not None:
            self.loop.remove_reader(self.sock.fileno())
            self._receive = None
        self.sock.close()
