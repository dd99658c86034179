"""Handing packets between the worker processes of one relay (app/workers.py).

Theory of operation
-------------------
A relay with several workers is several processes, each with its own WireGuard
sessions.  A packet for a peer whose session another worker holds (routed from a peer
here, or read from this worker's queue of the TUN) is handed to that worker, which
encrypts and sends it; it is never handed on again, so nothing goes round.  A worker
that makes a session tells every other one, which from then on hands that peer's
packets to it.

Every pair of workers shares one Unix datagram socket pair, made by the relay before it
starts them and inherited: no other process can reach it, and the kernel keeps each
message whole and in order.  A message is one of:

    b"O" key(32) since(float64)   the sender made a session with the peer of `key` at
                                  `since` (monotonic seconds, one clock for all)
    b"P" key(32) item*            packets for the peer of `key`
    b"F" item*                    frames for the receiver's switch (TAP mode)
    b"T" key(32) timestamp(12)    the sender accepted an initiation from the peer of
                                  `key` with this TAI64N timestamp (a replay of it is
                                  to be refused by every worker)
    b"C" key(32) caps(1)          the peer of `key` asked the sender for its
                                  configuration and negotiated these capabilities
                                  (tunnel.caps_bits()), which decide how every worker
                                  forwards to it

and an item is kind(1) length(4) data: kind 0 a packet, kind 1 a GSO header (10
bytes) followed by its super-packet.  Packets for one peer leave as one message per
wake-up (up to MESSAGE_BYTES), so handing over costs a system call per batch, not per
packet.

A channel that is full drops packets (counted "handoff_full" by the caller); a session
notice that does not fit waits, in order, until the channel drains: losing one would
leave the other worker sending to a session that is gone.  A malformed message (only a
bug could make one) is dropped and counted in the channel's own `counts`
("handoff_malformed"), beside the messages of packets handed out and in ("handed_out",
"handed_in"); the driver's datapath() adds them to `gtun status`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from gtun.core.offload import GSO_HDR_LEN, Gso, pull_gso, push_gso
from gtun.io.udp import set_buffers

log = logging.getLogger(__name__)

MESSAGE_BYTES = 64 * 1024  # a message gathers items up to this size
# Each direction of each channel: a few milliseconds of traffic, not a standing queue
# (a worker that falls behind has packets dropped, which TCP senders slow down for).
SOCKET_BUFFER = 512 * 1024
READ_BATCH = 64  # messages per wake-up and channel
MAX_PARTS = 512  # buffers a message is gathered from (the kernel takes up to 1024)
RECV_BYTES = 2 * MESSAGE_BYTES  # more than any message (a 64 KB super-packet alone)

KEY_LEN = 32
TIMESTAMP_LEN = 12  # TAI64N
_ITEM = struct.Struct("<BI")
_SINCE = struct.Struct("<d")

# What a core hands over: (worker, peer or None, packet or (header, super-packet)).
Item = bytes | tuple[Gso, bytes]
OnPackets = Callable[[int, bytes | None, list[Item]], None]
# on_notice(worker, kind, key, value): "held" (since), "initiation" (timestamp), "caps".
OnNotice = Callable[[int, str, bytes, Any], object]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """The two ends of a channel between two workers (inheritable by neither until
    the relay says so: pass_fds)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (a, b):
        set_buffers(sock, SOCKET_BUFFER)
    return a, b


def encode_parts(head: bytes, items: list[Item]) -> list[list[bytes]]:
    """`head` and the items as the buffers of messages of up to MESSAGE_BYTES and
    MAX_PARTS buffers each (an item bigger than that travels alone), for sendmsg() to
    gather: no item is copied here."""
    out: list[list[bytes]] = []
    parts: list[bytes] = [head]
    size = len(head)
    for item in items:
        if isinstance(item, bytes):
            lead, body, length = _ITEM.pack(0, len(item)), item, len(item)
        else:
            hdr, body = item
            length = GSO_HDR_LEN + len(body)
            lead = _ITEM.pack(1, length) + push_gso(hdr)
        if len(parts) > 1 and (
            size + _ITEM.size + length > MESSAGE_BYTES or len(parts) + 2 > MAX_PARTS
        ):
            out.append(parts)
            parts, size = [head], len(head)
        parts.append(lead)
        parts.append(body)
        size += len(lead) + len(body)
    if len(parts) > 1:
        out.append(parts)
    return out


def encode_items(head: bytes, items: list[Item]) -> list[bytes]:
    """encode_parts(), each message joined."""
    return [b"".join(parts) for parts in encode_parts(head, items)]


def decode(message: bytes) -> tuple[str, bytes | None, Any]:
    """("held", key, since), ("initiation", key, timestamp), ("caps", key, bits),
    ("packets", key, items) or ("frames", None, items).
    Raises ValueError for a malformed message."""
    kind = message[:1]
    if kind == b"O":
        if len(message) != 1 + KEY_LEN + _SINCE.size:
            raise ValueError("session notice of the wrong size")
        return "held", message[1 : 1 + KEY_LEN], _SINCE.unpack_from(message, 1 + KEY_LEN)[0]
    if kind == b"P":
        if len(message) < 1 + KEY_LEN:
            raise ValueError("packets without a key")
        return "packets", message[1 : 1 + KEY_LEN], _items(message, 1 + KEY_LEN)
    if kind == b"F":
        return "frames", None, _items(message, 1)
    if kind == b"T":
        if len(message) != 1 + KEY_LEN + TIMESTAMP_LEN:
            raise ValueError("initiation notice of the wrong size")
        return "initiation", message[1 : 1 + KEY_LEN], message[1 + KEY_LEN :]
    if kind == b"C":
        if len(message) != 1 + KEY_LEN + 1:
            raise ValueError("capabilities notice of the wrong size")
        return "caps", message[1 : 1 + KEY_LEN], message[1 + KEY_LEN]
    raise ValueError(f"unknown message {kind!r}")


def _items(message: bytes, at: int) -> list[Item]:
    items: list[Item] = []
    view = memoryview(message)
    end = len(message)
    while at < end:
        if at + _ITEM.size > end:
            raise ValueError("truncated item header")
        kind, length = _ITEM.unpack_from(message, at)
        at += _ITEM.size
        if at + length > end:
            raise ValueError("truncated item")
        if kind == 0:
            items.append(message[at : at + length])
        elif kind == 1 and length >= GSO_HDR_LEN:
            items.append(
                (pull_gso(view[at : at + GSO_HDR_LEN]), message[at + GSO_HDR_LEN : at + length])
            )
        else:
            raise ValueError(f"unknown item kind {kind}")
        at += length
    return items


class Handoff:
    """This worker's ends of its channels to the others (`socks`: worker -> socket), on
    the event loop.  What arrives goes to `on_packets(worker, key, items)` (key None:
    frames) and the notices to `on_notice(worker, kind, key, value)`; `after()` runs
    once per wake-up that delivered anything (the driver's transmit)."""

    def __init__(
        self,
        worker: int,
        socks: dict[int, socket.socket],
        loop: asyncio.AbstractEventLoop,
        on_packets: OnPackets,
        on_notice: OnNotice,
        after: Callable[[], None],
    ) -> None:
        self.worker = worker
        self.socks = socks
        self.loop = loop
        self.on_packets = on_packets
        self.on_notice = on_notice
        self.after = after
        self.counts = {"handed_out": 0, "handed_in": 0, "handoff_malformed": 0}
        self._notices: dict[int, deque[bytes]] = {w: deque() for w in socks}
        for w, sock in socks.items():
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._readable, w)

    def close(self) -> None:
        for sock in self.socks.values():
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
                self.loop.remove_writer(sock.fileno())
                sock.close()

    # --- out -------------------------------------------------------------------------

    def drain(self, core: Any) -> None:
        """Hand over what `core` (a Relay) gathered for the other workers (the driver
        calls this after every call into the core); what a full channel refuses is
        counted "handoff_full"."""
        items = core.handoffs()
        if items:
            dropped = self.send(items)
            if dropped:
                core.drops["handoff_full"] += dropped

    def send(self, items: list[tuple[int, Any, Item]]) -> int:
        """Hand `items` (worker, peer or None, packet) over, grouped per worker and
        peer in order; the number dropped (a channel full, or no such worker)."""
        groups: dict[tuple[int, bytes | None], list[Item]] = {}
        for worker, peer, item in items:
            key = None if peer is None else peer.public_key
            group = groups.get((worker, key))
            if group is None:
                groups[(worker, key)] = [item]
            else:
                group.append(item)
        dropped = 0
        for (worker, key), group in groups.items():
            sock = self.socks.get(worker)
            if sock is None:
                dropped += len(group)
                continue
            head = b"F" if key is None else b"P" + key
            for parts in encode_parts(head, group):
                try:
                    sock.sendmsg(parts)
                    self.counts["handed_out"] += 1
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED):
                        log.debug("handing over to worker %d: %s", worker, exc)
                    dropped += len(group)
                    break
        return dropped

    def announce(self, key: bytes, since: float) -> None:
        """Tell every other worker that this one made a session with `key` at `since`."""
        self._notice(b"O" + key + _SINCE.pack(since))

    def announce_caps(self, key: bytes, bits: int) -> None:
        """Tell every other worker the capabilities the peer of `key` negotiated here."""
        self._notice(b"C" + key + bytes([bits]))

    def announce_initiation(self, key: bytes, timestamp: bytes) -> None:
        """Tell every other worker the newest initiation timestamp accepted from `key`."""
        self._notice(b"T" + key + timestamp)

    def _notice(self, message: bytes) -> None:
        for worker in self.socks:
            queue = self._notices[worker]
            queue.append(message)
            if len(queue) == 1:
                self._flush_notices(worker)

    def _flush_notices(self, worker: int) -> None:
        sock = self.socks[worker]
        queue = self._notices[worker]
        while queue:
            try:
                sock.send(queue[0])
            except BlockingIOError:
                self.loop.add_writer(sock.fileno(), self._writable, worker)
                return
            except OSError:
                queue.clear()  # the other end is gone: a new worker is told anew
                return
            queue.popleft()

    def _writable(self, worker: int) -> None:
        self.loop.remove_writer(self.socks[worker].fileno())
        self._flush_notices(worker)

    # --- in --------------------------------------------------------------------------

    def _readable(self, worker: int) -> None:
        sock = self.socks[worker]
        got = False
        for _ in range(READ_BATCH):
            try:
                message = sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not message:
                break
            got = True
            try:
                kind, key, value = decode(message)
            except ValueError:
                self.counts["handoff_malformed"] += 1
                continue
            if kind == "packets" or kind == "frames":
                self.counts["handed_in"] += 1
                self.on_packets(worker, key, value)
            else:
                assert key is not None
                self.on_notice(worker, kind, key, value)
        if got:
            self.after()
