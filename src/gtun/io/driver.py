"""The asyncio edge shared by the relay and the client: transports, TUN device, timer.

After every call into the core the edge does the same three things (as aioquic's
protocol.transmit()): drain events, transmit (datagrams and TUN writes), re-arm the
timer.  Datagrams come from and go to transports (transport.py: UDP in udp.py, TCP in
tcp.py, fakes in gtun.testing): those to an address go to the one addressed transport
(UDP), those to a connection to the transport that owns it.  Sends never block: a
datagram that a transport cannot take now (a full socket buffer, a connection's full
or closed buffer), or a TUN write the kernel refuses, is dropped and counted
("queue_full").

Batches.  Work arrives in batches and leaves in batches, so that the per-call cost of
the kernel is paid per batch rather than per packet:
- the TUN (offloading, tun.py) yields TCP super-packets of up to 64 KB, which the core
  cuts into packets or carries whole (bulk.py);
- the UDP socket (udp.py) sends runs of equal-sized datagrams to one address in one
  call (UDP GSO) and reads many datagrams per call (UDP GRO);
- the packets the core decrypts in one wake-up are coalesced (offload.coalesce) into
  TCP super-packets, one TUN write each.
An idle input's wake-up is the exception: after a quiet spell (transport.LONE_GAP) the
TUN or a UDP socket is read once, for the packet that woke it, and not once more only
to hear EAGAIN, which costs a process that has been asleep more than the packet's own
work; if more was waiting, the loop's next turn reads it, in batches.

Fairness.  One peer's flood must not delay another peer's packets by more than a small
bound, so what the transports deliver is not handled first-in first-out when there is
more of it than one wake-up's work (FAIR_BUDGET datagrams, FAIR_BUDGET_BYTES bytes).
It then waits in one bounded queue per source (a UDP address; a TCP connection), and
the core is fed from them in deficit round robin (DRR, as Linux's fq_codel): a source
whose queue was empty is served first, ahead of the sources already backlogged (a ping
never waits behind a flood), each source gets FAIR_QUANTUM bytes per turn, and the
wake-up ends when its budget is spent, the rest served from the next loop iteration
(call_soon), after the loop has read the sockets and the TUN again.  A transport reads
more per wake-up than the core handles (udp.UDP_BATCH), so the kernel's socket buffer,
one FIFO for every peer, stays short: a flood's excess is dropped from its own queue
(drop-tail per source, "fair_queue_full") instead of queueing in front of everyone.
A UDP read of a GRO train (many datagrams of one sender in one buffer) asks first
whether that sender's queue is full (Driver._admit) and skips the train whole if so:
a flood's excess costs one read per train, not an object per datagram, and the
socket's buffer, where everyone's datagrams wait in one line, is drained at the rate
the flood arrives.
When nothing waits, one wake-up's budget of a delivery goes straight to the core in
arrival order (all of it in the common case, a busy peer or many quiet ones), and only
the rest is queued, its sources behind those that were not served yet.

Delay.  The kernel's socket buffer and the per-source queues together are one queue
in front of the core, large enough to absorb any burst, and so large enough for a
sender that only slows down on loss (TCP cubic) to keep it full: every packet, a ping
or a video call's, would wait tens of milliseconds behind it.  CoDel (core/codel.py)
bounds that, one controller per source (as fq_codel has one per flow: the short
sojourn of another source's acknowledgements must not hide a flood's standing queue).
A source's datagrams are timed from their arrival in the kernel (the UDP socket's
receive timestamps, udp.py; a delivery without them from its read) to the moment the
core takes them, one sojourn per delivery (its first datagram's) and per turn of a
source in the queues (its oldest datagram's), and when a source's sojourn has stood
above CODEL_TARGET for CODEL_INTERVAL one of its large transport datagrams is dropped
("codel") at CoDel's pace: the sender behind the queue slows down and the queue
drains, while bursts, and small datagrams (handshakes, keepalives, pings, TCP
acknowledgements) are never cut.  And while a backlog waits, up to SMALL_FIRST small
datagrams of a delivery skip it (a ping, an acknowledgement or a call's voice need not
wait behind their own source's bulk; the bound keeps a flood of small datagrams inside
the fair queues).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from gtun.core.codel import CoDel
from gtun.core.offload import (
    F_NEEDS_CSUM,
    GSO_NONE,
    Gso,
    OffloadError,
    coalesce,
    finish_tcp_checksum,
    to_partial,
)
from gtun.core.wg.events import Event
from gtun.io.transport import LONE_GAP, Transport
from gtun.io.tun import PacketDevice
from gtun.io.udp import UdpTransport

log = logging.getLogger("gtun")

# Tuning knobs: how much one wake-up reads from the TUN, so neither input starves the
# other (a UDP wake-up reads up to udp.UDP_BATCH datagrams).
TUN_BATCH = 64  # reads from the TUN (packets or super-packets) ...
TUN_BATCH_BYTES = 256 * 1024  # ... up to this many bytes
# Fairness between sources (see above): one wake-up's work for the core ...  Larger
# pays in throughput and costs latency under load (bench.py, 2-core VM, one client to
# relay stream under BBR, one sitting: 64, 128, 256 datagrams gave 1510, 1566, 1760
# Mbit/s and 1.3, 2.1, 6.4 ms of RTT under load).
FAIR_BUDGET = 64  # ... datagrams ...
FAIR_BUDGET_BYTES = 256 * 1024  # ... and bytes (a TCP read of bulk frames fits whole)
FAIR_QUANTUM = 16 * 1024  # bytes a source is served per turn (about 11 full datagrams)
# What may wait: per source, as much as the socket buffer held for everyone before (a
# burst from one busy peer is absorbed as it was), and in all (many sources).
FAIR_QUEUE = 4096  # datagrams per source ...
FAIR_QUEUE_BYTES = 4 << 20  # ... and bytes
FAIR_TOTAL = 16384  # datagrams in all ...
FAIR_TOTAL_BYTES = 32 << 20  # ... and bytes
# Delay (see above): the sojourn that may stand, and for how long, before CoDel drops.
# Lower than the RFC's 5 ms and 100 ms: what waits here is gtun's own queue, which
# drains in well under a millisecond when nothing stands in it, and a tunnel's hop is
# one of many on a path.  Measured (bench.py, iperf3 with cubic, 2-core VM, client to
# client): 2 ms and 100 ms left 12 ms of RTT under load; 0.5 ms and 10 ms brought it
# to 2.7 ms but throughput to 1.13x OpenVPN's; 1 ms and 20 ms, 3.8 ms and 1.43x.
CODEL_TARGET = 0.001
CODEL_INTERVAL = 0.020
# While a backlog waits, this many small datagrams of a delivery skip it (a bound, so
# that a flood of small datagrams cannot skip the fair queues).
SMALL_FIRST = 16
CODEL_SOURCES = 4096  # controllers kept; past it the oldest is forgotten
# Only WireGuard transport messages (type 4) at least this long are CoDel's to drop:
# a full-size packet's carrier, never a keepalive, a ping or a TCP acknowledgement.
CODEL_MIN_BYTES = 256
_TRANSPORT_TYPE = 4


def codel_victim(batch: list[tuple[bytes, Any]], source: Any) -> int:
    """The index of the first datagram from `source` in `batch` that CoDel may drop, or
    -1."""
    for i, item in enumerate(batch):
        data = item[0]
        if len(data) >= CODEL_MIN_BYTES and data[0] == _TRANSPORT_TYPE and item[1] == source:
            return i
    return -1


class Core(Protocol):
    """What the Driver drives (the relay's and the client's cores, test fakes).  A core
    may also offer receive_datagrams(batch, now), receive_datagram() for each of a
    wake-up's datagrams in order: the Driver then makes one call per batch (_deliver)."""

    drops: dict[str, int]

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def tun_packet(self, packet: bytes, now: float) -> None: ...
    def tun_super(self, hdr: Gso, packet: bytes, now: float) -> None: ...
    def handle_timer(self, now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def next_event(self) -> Event | None: ...
    def tun_writes(self) -> list[bytes | tuple[Gso, bytes]]: ...
    def datagrams_to_send(self) -> list[tuple[bytes, Any]]: ...


class _Source:
    """One source's waiting datagrams and its DRR deficit."""

    __slots__ = ("queue", "arrivals", "size", "deficit", "flow")

    def __init__(self, source: Any) -> None:
        self.queue: deque[tuple[bytes, Any]] = deque()
        self.arrivals: deque[float] = deque()  # when each of `queue` arrived (loop time)
        self.size = 0  # bytes waiting
        self.deficit = 0
        # A source that can stop sending (a TCP connection: pause_reading() and
        # resume_reading()), and whether it is stopped: True/False, None if it cannot.
        self.flow: bool | None = (
            False
            if hasattr(source, "pause_reading") and hasattr(source, "resume_reading")
            else None
        )


class FairQueue:
    """Per-source queues served in deficit round robin (the Driver's fairness, above).

    `new` holds sources that had nothing waiting when their datagram came, `old` those
    that are backlogged; both are insertion-ordered dicts whose order is the round.
    Bounds: `per_source` datagrams and `per_source_bytes` bytes for one source,
    `total` and `total_bytes` in all; a datagram past a bound is dropped (tail drop).
    A source that can be told to stop (an endpoint with pause_reading() and
    resume_reading(), as a stream connection may offer) is paused when half its bound
    waits and resumed when an eighth does, so a stream is slowed rather than cut."""

    def __init__(
        self,
        *,
        quantum: int = FAIR_QUANTUM,
        per_source: int = FAIR_QUEUE,
        per_source_bytes: int = FAIR_QUEUE_BYTES,
        total: int = FAIR_TOTAL,
        total_bytes: int = FAIR_TOTAL_BYTES,
    ) -> None:
        self.quantum = quantum
        self.per_source = per_source
        self.per_source_bytes = per_source_bytes
        self.total = total
        self.total_bytes = total_bytes
        self.new: dict[Any, _Source] = {}
        self.old: dict[Any, _Source] = {}
        self.held = 0  # datagrams waiting
        self.held_bytes = 0
        # The sources the last pop() served, each with the arrival of its oldest datagram
        # it took.
        self.heads: list[tuple[Any, float]] = []

    def __len__(self) -> int:
        return self.held

    def push(self, batch: list[tuple[bytes, Any]], arrival: float = 0.0) -> int:
        """Queue `batch`, which arrived at `arrival`, by source; the number dropped (past
        a bound)."""
        new, old = self.new, self.old
        dropped = 0
        for item in batch:
            source = item[1]
            size = len(item[0])
            if self.held >= self.total or self.held_bytes + size > self.total_bytes:
                dropped += 1
                continue
            entry = old.get(source) or new.get(source)
            if entry is None:
                entry = new[source] = _Source(source)
                entry.deficit = self.quantum
            elif len(entry.queue) >= self.per_source or entry.size + size > self.per_source_bytes:
                dropped += 1
                continue
            entry.queue.append(item)
            entry.arrivals.append(arrival)
            entry.size += size
            self.held += 1
            self.held_bytes += size
            if entry.flow is False and (
                entry.size > self.per_source_bytes // 2 or len(entry.queue) > self.per_source // 2
            ):
                entry.flow = True
                source.pause_reading()
        return dropped

    def demote(self, sources: set[Any]) -> None:
        """`sources` have just been served outside the queues (a wake-up's budget went
        straight to the core): what they have waiting goes to the back of the round."""
        new, old = self.new, self.old
        for source in sources:
            entry = new.pop(source, None)
            if entry is not None:
                old[source] = entry

    def full(self, source: Any, count: int) -> bool:
        """Whether `count` more datagrams from `source` would pass a bound now."""
        if self.held + count > self.total or self.held_bytes >= self.total_bytes:
            return True
        entry = self.old.get(source) or self.new.get(source)
        if entry is None:
            return count > self.per_source
        return len(entry.queue) + count > self.per_source or entry.size >= self.per_source_bytes

    def pop(self, count: int, nbytes: int) -> tuple[list[tuple[bytes, Any]], bool]:
        """Up to `count` datagrams and about `nbytes` bytes in DRR order, and whether they
        are those of sources that had been idle (then only those: transmit them at once,
        then call again for the backlogged ones).  `heads` then says whose they are and
        when the first of each arrived."""
        out: list[tuple[bytes, Any]] = []
        new, old = self.new, self.old
        heads: list[tuple[Any, float]] = []
        fresh = bool(new)
        ring = new if fresh else old
        while ring and count > 0 and nbytes > 0:
            source = next(iter(ring))
            entry = ring[source]
            if entry.deficit <= 0:  # its turn is over: refill, to the end of the round
                entry.deficit += self.quantum
                del ring[source]
                old[source] = entry
                continue
            queue = entry.queue
            arrivals = entry.arrivals
            if queue:
                heads.append((source, arrivals[0]))
            taken = 0
            while queue and entry.deficit > 0 and count > 0 and nbytes > 0:
                item = queue.popleft()
                arrivals.popleft()
                size = len(item[0])
                entry.deficit -= size
                taken += size
                nbytes -= size
                count -= 1
                out.append(item)
            entry.size -= taken
            self.held_bytes -= taken
            if entry.flow and (
                entry.size <= self.per_source_bytes // 8 and len(queue) <= self.per_source // 8
            ):
                entry.flow = False
                source.resume_reading()
            if not queue:
                del ring[source]
            elif fresh and entry.deficit <= 0:
                del new[source]  # backlogged now: it waits its turn among the others
                entry.deficit += self.quantum
                old[source] = entry
        self.held -= len(out)
        self.heads = heads
        return out, fresh

    def clear(self) -> None:
        for ring in (self.new, self.old):
            for source, entry in ring.items():
                if entry.flow:
                    source.resume_reading()
        self.new.clear()
        self.old.clear()
        self.held = self.held_bytes = 0


class Driver:
    """Runs a core on the event loop, with the transports attached to it and a TUN."""

    def __init__(
        self,
        core: Core,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[Event], None],
    ) -> None:
        self.core = core
        self.loop = loop
        self.on_event = on_event
        self.transports: list[Transport] = []
        self._addressed: Transport | None = None  # where datagrams to a tuple go
        self.tun: PacketDevice | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # A device without offloads, where peers may leave TCP checksums partial: the
        # edge completes them before writing (tun.py, offload.py).
        self.finish_checksums = False
        self._tun_last = 0.0  # the loop's time at the TUN's last wake-up (LONE_GAP)
        self._tun_busy = False  # whether that wake-up read more than one packet
        # Batching at work (status): super-packets read from and written to the TUN;
        # wake-ups that left datagrams waiting for the next (fairness, above).
        self.counts = {"tun_super_reads": 0, "tun_super_writes": 0, "fair_deferred": 0}
        self.fair = FairQueue()
        self.budget = FAIR_BUDGET
        self.budget_bytes = FAIR_BUDGET_BYTES
        self._serving: asyncio.Handle | None = None
        # Datagrams _admit() let in per source since the last delivery (receive()).
        self._admitted: dict[Any, int] = {}
        self._admitters: list[Any] = []  # transports with an `admit` to set
        self._admit_on = False
        # A relay worker's channels to the other workers (io/handoff.py): what the core
        # hands over (Relay.handoffs()) leaves through them after every call.
        self.handoff: Any = None
        # The delay's bound (see above): a CoDel per source, made when first needed.
        self.codel_target = CODEL_TARGET
        self.codel_interval = CODEL_INTERVAL
        self.codels: dict[Any, CoDel] = {}
        # A core that takes a wake-up's datagrams in one call (the relay's loop over
        # them runs compiled); else one receive_datagram() each.
        self._receive_many: Callable[[list[tuple[bytes, Any]], float], None] | None = getattr(
            core, "receive_datagrams", None
        )

    def _deliver(self, batch: list[tuple[bytes, Any]], now: float) -> None:
        """Hand `batch` to the core, in order."""
        many = self._receive_many
        if many is not None:
            many(batch, now)
            return
        receive = self.core.receive_datagram
        for data, addr in batch:
            receive(data, addr, now)

    # --- transports --------------------------------------------------------------------

    def attach(self, transport: Transport) -> None:
        """Receive from and send through `transport`.  Raises ValueError (local) for a
        second addressed transport: which would a datagram to an address take?"""
        if transport.addressed:
            if self._addressed is not None:
                raise ValueError("a driver has one transport for (host, port) endpoints")
            self._addressed = transport
        self.transports.append(transport)
        if hasattr(transport, "admit"):  # it can ask before it reads (transport.Admit)
            self._admitters.append(transport)
            transport.admit = self._admit if self.fair.held else None
        if hasattr(transport, "waited"):  # it knows how long a delivery waited before
            waited = transport

            def receive(batch: list[tuple[bytes, Any]], now: float) -> None:
                self.receive(batch, now, waited.waited)

            transport.open(receive)
        else:
            transport.open(self.receive)

    def _admitting(self, on: bool) -> None:
        """Have the transports that can ask (transport.Admit) ask _admit() or not: only
        while datagrams wait, so that nothing is asked per datagram when none do."""
        self._admit_on = on
        for transport in self._admitters:
            transport.admit = self._admit if on else None

    def _admit(self, source: Any, count: int) -> bool:
        """transport.Admit: refuse (and count) datagrams whose source's queue is full, so
        that a flood is dropped before it is cut apart into datagrams."""
        fair = self.fair
        if not fair.held:
            return True
        admitted = self._admitted.get(source, 0)  # already let in for the same delivery
        if not fair.full(source, admitted + count):
            self._admitted[source] = admitted + count
            return True
        drops = self.core.drops
        drops["fair_queue_full"] = drops.get("fair_queue_full", 0) + count
        return False

    def detach(self, transport: Transport) -> None:
        """Stop using `transport` and close it (a client back on UDP, done with TCP)."""
        if transport in self._admitters:
            self._admitters.remove(transport)
            transport.admit = None  # type: ignore[attr-defined]
        if transport in self.transports:
            self.transports.remove(transport)
            if transport is self._addressed:
                self._addressed = None
        transport.close()

    @property
    def udp(self) -> UdpTransport | None:
        """The UDP transport, if one is attached."""
        addressed = self._addressed
        return addressed if isinstance(addressed, UdpTransport) else None

    def receive(self, batch: list[tuple[bytes, Any]], now: float, waited: float = 0.0) -> None:
        """What a transport delivers: the datagrams of one wake-up, whose first waited
        `waited` seconds before it was read.  Straight to the core when nothing waits and
        it fits one wake-up's budget; else queued per source and served fairly (see
        above)."""
        if self._admitted:
            self._admitted.clear()
        fair = self.fair
        if not fair.held:
            # Nobody waits: one wake-up's budget goes straight to the core in arrival
            # order, and only the rest is queued, behind sources not yet served.
            budget = self.budget
            whole = len(batch) <= budget
            head = batch if whole else batch[:budget]
            first = head[0][1]
            if self._codel(first).should_drop(waited, now):  # one sojourn per delivery
                head = self._codel_drop(head, first)
            self._deliver(head, now)
            self.after()
            if whole:
                return
            rest = batch[budget:]
            dropped = fair.push(rest, now - waited)
            fair.demote({addr for _, addr in head})
        else:
            batch = self._small_first(batch, now)
            dropped = fair.push(batch, now - waited)
        if dropped:
            drops = self.core.drops
            drops["fair_queue_full"] = drops.get("fair_queue_full", 0) + dropped
        if fair.new:  # sources that were idle: at once, and their answers leave now
            self._serve(fresh_only=True)
        if fair.held:
            if not self._admit_on:
                self._admitting(True)
            if self._serving is None:
                self._later()

    def _small_first(self, batch: list[tuple[bytes, Any]], now: float) -> list[tuple[bytes, Any]]:
        """While a backlog waits: hand the core at once up to SMALL_FIRST small datagrams
        of `batch` (under CODEL_MIN_BYTES: pings, TCP acknowledgements, keepalives, a
        call's voice) rather than queue them behind their source's large ones; the rest."""
        receive = self.core.receive_datagram
        rest: list[tuple[bytes, Any]] = []
        taken = 0
        # By position, not by id(): compiled (mypyc), a tuple read from a list may be a
        # new object each time, and the id of one freed may be another's.
        for data, addr in batch:
            if taken < SMALL_FIRST and len(data) < CODEL_MIN_BYTES:
                receive(data, addr, now)
                taken += 1
            else:
                rest.append((data, addr))
        if not taken:
            return batch
        self.after()
        return rest

    def _later(self) -> None:
        # A timer due now runs after the loop's next poll of the sockets and the TUN, so
        # what arrives meanwhile (a ping, the kernel's answer to one) is not kept
        # waiting behind the backlog (call_soon would run first).
        self.counts["fair_deferred"] += 1
        self._serving = self.loop.call_later(0, self._serve)

    def _serve(self, fresh_only: bool = False) -> None:
        """One wake-up's work from the per-source queues, sources that were idle first;
        the rest on the next wake-up.  `fresh_only`: only those (from receive())."""
        if not fresh_only:
            self._serving = None
        fair = self.fair
        now = self.loop.time()
        count, nbytes = self.budget, self.budget_bytes
        unsent = False  # the core has handled datagrams since the last after()
        while fair.held and count > 0 and nbytes > 0:
            if fresh_only and not fair.new:
                break
            batch, fresh = fair.pop(count, nbytes)
            if not batch:
                break
            for source, arrival in fair.heads:  # one sojourn per source and turn
                if self._codel(source).should_drop(now - arrival, now):
                    batch = self._codel_drop(batch, source)
            self._deliver(batch, now)
            for data, _ in batch:
                nbytes -= len(data)
            count -= len(batch)
            unsent = True
            if fresh:
                self.after()  # their answers leave before the backlog is touched
                unsent = False
                if fresh_only:
                    break
        if unsent:
            self.after()
        if not fair.held:
            if self._admit_on:
                self._admitting(False)
        elif self._serving is None:
            self._later()

    def _codel(self, source: Any) -> CoDel:
        codel = self.codels.get(source)
        if codel is None:
            codels = self.codels
            if len(codels) >= CODEL_SOURCES:
                del codels[next(iter(codels))]
            codel = codels[source] = CoDel(self.codel_target, self.codel_interval)
        return codel

    def _codel_drop(self, batch: list[tuple[bytes, Any]], source: Any) -> list[tuple[bytes, Any]]:
        """`batch` without the datagram of `source` CoDel drops (counted), if it has one
        to drop."""
        i = codel_victim(batch, source)
        if i < 0:
            return batch
        drops = self.core.drops
        drops["codel"] = drops.get("codel", 0) + 1
        return batch[:i] + batch[i + 1 :]

    # --- TUN ---------------------------------------------------------------------------

    def attach_tun(self, tun: PacketDevice, *, finish_checksums: bool = False) -> None:
        """Read and write `tun`.  `finish_checksums`: the device has no offloads but
        peers may leave TCP checksums partial, so they are completed before writing."""
        self.tun = tun
        self.finish_checksums = finish_checksums
        self.loop.add_reader(tun.fileno(), self._tun_readable)

    def detach_tun(self) -> None:
        if self.tun is not None:
            fd = self.tun.fileno()
            if fd >= 0:  # a closed device no longer has a descriptor to watch
                self.loop.remove_reader(fd)
            self.tun = None

    def _tun_readable(self) -> None:
        tun = self.tun
        if tun is None:
            return
        now = self.loop.time()
        # Idle, one packet waits: one read, not a second to hear EAGAIN (LONE_GAP);
        # busy (the last wake-up read more than one, however long ago it began): batches.
        reads = 1 if now - self._tun_last >= LONE_GAP and not self._tun_busy else TUN_BATCH
        self._tun_last = now
        core = self.core
        budget = TUN_BATCH_BYTES
        taken = 0
        for _ in range(reads):
            try:
                got = tun.read_super()
            except OffloadError:  # a header no kernel writes: count, go on
                core.drops["bad_gso"] += 1
                continue
            if got is None:
                break
            hdr, packet = got
            if hdr.gso_type == GSO_NONE:
                if hdr.flags & F_NEEDS_CSUM:
                    core.tun_super(hdr, packet, now)
                else:
                    core.tun_packet(packet, now)
            else:
                self.counts["tun_super_reads"] += 1
                core.tun_super(hdr, packet, now)
            taken += 1
            budget -= len(packet)
            if budget <= 0:
                break
        self._tun_busy = taken > 1
        self.after()

    # --- after every call: events, transmit, timer --------------------------------------

    def after(self) -> None:
        core = self.core
        while (event := core.next_event()) is not None:
            self.on_event(event)
        writes = core.tun_writes()
        if writes:
            tun = self.tun
            if tun is None:
                core.drops["queue_full"] += len(writes)
            else:
                core.drops["queue_full"] += write_tun(
                    tun, writes, self.counts, finish=self.finish_checksums
                )
        datagrams = core.datagrams_to_send()
        if datagrams:
            for item in datagrams:
                if item[1].__class__ is not tuple:
                    core.drops["queue_full"] += self._send_mixed(datagrams)
                    break
            else:  # all to addresses: the relay's and a UDP client's every wake-up
                addressed = self._addressed
                if addressed is None:
                    core.drops["queue_full"] += len(datagrams)
                else:
                    core.drops["queue_full"] += addressed.send(datagrams)
        handoff = self.handoff
        if handoff is not None:
            handoff.drain(core)
        self._rearm()

    def _send_mixed(self, datagrams: list[tuple[bytes, Any]]) -> int:
        """Send datagrams to connections and addresses, grouped per transport (in order
        within each); the number dropped."""
        groups: dict[Any, list[tuple[bytes, Any]]] = {}
        for item in datagrams:
            addr = item[1]
            owner = self._addressed if addr.__class__ is tuple else getattr(addr, "owner", None)
            group = groups.get(owner)
            if group is None:
                groups[owner] = [item]
            else:
                group.append(item)
        dropped = 0
        for owner, group in groups.items():
            dropped += len(group) if owner is None else owner.send(group)
        return dropped

    def datapath(self) -> dict[str, Any]:
        """What the data path batches with (for status): offloads granted, and counts."""
        tun, udp = self.tun, self.udp
        return {
            "tun_offload": bool(getattr(tun, "vnet", False)),
            "tun_offload_error": getattr(tun, "offload_error", "") or None,
            "udp_gso": udp.gso if udp is not None else None,
            "udp_gro": udp.gro if udp is not None else None,
            **self.counts,
            "fair_waiting": self.fair.held,
            **(self.handoff.counts if self.handoff is not None else {}),
            **({f"udp_{k}": v for k, v in udp.stats.items()} if udp is not None else {}),
        }

    def _rearm(self) -> None:
        deadline = self.core.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self.loop.time())
        self.after()

    def poke(self) -> None:
        """Run the core's timers now (after the edge changed something in the core)."""
        self.after()

    def close(self) -> None:
        """Stop the timer, let go of the TUN and close every transport."""
        if self._timer is not None:
            self._timer.cancel()
        if self._serving is not None:
            self._serving.cancel()
            self._serving = None
        self.fair.clear()
        self._admitting(False)
        self.detach_tun()
        for transport in list(self.transports):
            self.detach(transport)


def write_tun(
    tun: PacketDevice,
    writes: list[bytes | tuple[Gso, bytes]],
    counts: dict[str, int],
    *,
    finish: bool = False,
) -> int:
    """Write the core's TUN output in order; the number of packets dropped.

    On an offloading device runs of plain packets are coalesced into super-packets
    first (counted in counts["tun_super_writes"], with the super-packets that came
    whole), and every TCP packet goes as F_NEEDS_CSUM: the kernel completes its
    checksum, which a gtun peer may have left partial.  On a device without offloads
    `finish` completes TCP checksums here instead."""
    dropped = 0
    if not getattr(tun, "vnet", False):
        for item in writes:
            if item.__class__ is tuple:
                dropped += tun.write_super(*item)
            elif not tun.write(finish_tcp_checksum(item) if finish else item):  # type: ignore[arg-type]
                dropped += 1
        return dropped
    run: list[bytes] = []
    for item in writes:
        if item.__class__ is tuple:
            if run:
                dropped += _write_coalesced(tun, run, counts)
                run = []
            counts["tun_super_writes"] += 1
            dropped += tun.write_super(*item)
        else:
            run.append(item)  # type: ignore[arg-type]
    if run:
        dropped += _write_coalesced(tun, run, counts)
    return dropped


def _write_coalesced(tun: PacketDevice, packets: list[bytes], counts: dict[str, int]) -> int:
    if len(packets) == 1:
        return tun.write_super(*to_partial(packets[0]))
    dropped = 0
    for hdr, packet in coalesce(packets):
        if hdr.gso_type != GSO_NONE:
            counts["tun_super_writes"] += 1
        elif not hdr.flags:
            hdr, packet = to_partial(packet)
        dropped += tun.write_super(hdr, packet)
    return dropped
