"""A learning Ethernet switch, sans-IO: the relay's forwarding logic in TAP mode.

Theory of operation
-------------------
The switch has ports (the relay makes one per gtun peer and one for its own TAP device)
and a MAC table mapping a source address to the port it was last seen on, with the time
it was seen.  For each frame received on port P (IEEE 802.1D section 7.7/7.8, simplified):

- A frame shorter than an Ethernet header ("runt") or longer than `max_frame`
  ("oversized"), or whose source is a group address (multicast or broadcast) or all zero
  ("bad_mac"), is dropped.
- Learning, with no MAC stealing: a source address live in the table on another port is
  not P's to use: the frame is dropped ("mac_stolen").  An entry is live for `aging`
  seconds after the frame that last refreshed it; after that the address may move.  A
  new address is learned on P unless P already owns `max_per_port` addresses or the
  table holds `max_entries` ("mac_limit"): the table is bounded, and one port cannot
  fill it for the others.
- Forwarding: a unicast destination in the table goes to its port only (or is dropped,
  "loop", when that is P itself); broadcast, multicast and unknown unicast are flooded
  to every other port.  That is all ARP and IPv6 neighbour discovery need.

Time is the caller's `now` (monotonic seconds): the switch never reads a clock.  Aged
entries are removed as time passes, oldest first, at the cost of O(1) per frame: the
table is kept in the order entries were last refreshed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from gtun.core.l2frame import ETH_ADDR_LEN, ETH_HEADER_LEN

P = TypeVar("P", bound=Hashable)

# Tuning knobs.
DEFAULT_AGING = 300.0  # IEEE 802.1D's recommended ageing time
DEFAULT_MAX_ENTRIES = 8192
DEFAULT_MAX_PER_PORT = 1024


_ZERO_MAC = bytes(ETH_ADDR_LEN)


def is_group(mac: bytes) -> bool:
    """A multicast or broadcast address: the I/G bit, the first byte's lowest bit."""
    return bool(mac[0] & 1)


@dataclass(frozen=True, slots=True)
class Decision(Generic[P]):
    """Where a frame goes: `ports` (empty when dropped, or nowhere to flood), or the
    reason it was dropped.  `flooded` when it went to every other port."""

    ports: tuple[P, ...] = ()
    drop: str | None = None
    flooded: bool = False


class _Entry(Generic[P]):
    __slots__ = ("port", "seen")

    def __init__(self, port: P, seen: float) -> None:
        self.port = port
        self.seen = seen


class Switch(Generic[P]):
    def __init__(
        self,
        max_frame: int,
        *,
        aging: float = DEFAULT_AGING,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_per_port: int = DEFAULT_MAX_PER_PORT,
    ) -> None:
        self.max_frame = max_frame
        self.aging = aging
        self.max_entries = max_entries
        self.max_per_port = max_per_port
        self._ports: dict[P, int] = {}  # port -> number of addresses it owns
        self._table: OrderedDict[bytes, _Entry[P]] = OrderedDict()

    # --- ports -----------------------------------------------------------------------

    @property
    def ports(self) -> list[P]:
        return list(self._ports)

    def has_port(self, port: P) -> bool:
        return port in self._ports

    def add_port(self, port: P) -> None:
        """Add a port (no effect if it is one already)."""
        self._ports.setdefault(port, 0)

    def remove_port(self, port: P) -> None:
        """Remove a port and forget every address learned on it (no effect if absent)."""
        if self._ports.pop(port, None) is None:
            return
        for mac in [m for m, e in self._table.items() if e.port == port]:
            del self._table[mac]

    # --- the table -------------------------------------------------------------------

    def lookup(self, mac: bytes, now: float) -> P | None:
        """The port that owns `mac`, or None when it is unknown or aged out."""
        self._expire(now)
        entry = self._table.get(mac)
        return entry.port if entry is not None else None

    def entries(self, now: float) -> Iterator[tuple[bytes, P, float]]:
        """(address, port, age in seconds) of the live entries, oldest first."""
        self._expire(now)
        for mac, entry in self._table.items():
            yield mac, entry.port, now - entry.seen

    def __len__(self) -> int:
        return len(self._table)

    def _expire(self, now: float) -> None:
        table = self._table
        limit = now - self.aging
        while table:
            mac, entry = next(iter(table.items()))
            if entry.seen > limit:
                return
            del table[mac]
            self._ports[entry.port] -= 1

    # --- frames ----------------------------------------------------------------------

    def receive(self, port: P, frame: bytes, now: float) -> Decision[P]:
        """Decide where a frame received on `port` goes, learning its source.

        Raises ValueError if `port` is not a port (the caller's misuse)."""
        if port not in self._ports:
            raise ValueError(f"{port!r} is not a port of this switch")
        if len(frame) < ETH_HEADER_LEN:
            return Decision(drop="runt")
        if len(frame) > self.max_frame:
            return Decision(drop="oversized")
        dst = frame[:ETH_ADDR_LEN]
        src = frame[ETH_ADDR_LEN : 2 * ETH_ADDR_LEN]
        if is_group(src) or src == _ZERO_MAC:
            return Decision(drop="bad_mac")
        self._expire(now)
        table = self._table
        entry = table.get(src)
        if entry is not None:
            if entry.port != port:
                return Decision(drop="mac_stolen")
            entry.seen = now
            table.move_to_end(src)
        else:
            if self._ports[port] >= self.max_per_port or len(table) >= self.max_entries:
                return Decision(drop="mac_limit")
            table[src] = _Entry(port, now)
            self._ports[port] += 1
        if not is_group(dst):
            target = table.get(dst)
            if target is not None:
                if target.port == port:
                    return Decision(drop="loop")
                return Decision(ports=(target.port,))
        return Decision(ports=tuple(p for p in self._ports if p != port), flooded=True)
