"""Longest-prefix match from an IP address to a value (a peer), IPv4 and IPv6 apart.

Theory of operation: each family keeps one dict per prefix length present, mapping the
network address (as an int, already masked) to its value.  A lookup masks the address
once per present prefix length, longest first, and stops at the first hit: at most 33
(IPv4) or 129 (IPv6) dict probes, in practice a handful, since a VPN's table holds few
distinct prefix lengths.  That beats a bit-by-bit trie in Python, where every step is
an interpreted operation, while a dict probe is one C call.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Generic, TypeVar, cast

__all__ = ["RouteTable"]

T = TypeVar("T")

_MISSING = object()


class _Family(Generic[T]):
    """The routes of one address family."""

    __slots__ = ("bits", "by_length", "order")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_length: dict[int, dict[int, T]] = {}
        # (mask, routes of that length), longest prefix first: what lookup walks.
        self.order: list[tuple[int, dict[int, T]]] = []

    def mask(self, prefixlen: int) -> int:
        return ((1 << prefixlen) - 1) << (self.bits - prefixlen)

    def reorder(self) -> None:
        self.order = [
            (self.mask(length), self.by_length[length])
            for length in sorted(self.by_length, reverse=True)
        ]

    def insert(self, key: int, prefixlen: int, value: T) -> None:
        table = self.by_length.get(prefixlen)
        if table is None:
            table = self.by_length[prefixlen] = {}
            table[key] = value
            self.reorder()
        else:
            table[key] = value

    def remove(self, key: int, prefixlen: int) -> bool:
        table = self.by_length.get(prefixlen)
        if table is None or key not in table:
            return False
        del table[key]
        if not table:
            del self.by_length[prefixlen]
            self.reorder()
        return True


class RouteTable(Generic[T]):
    """Longest-prefix match over IPv4 and IPv6 networks.  Not thread-safe."""

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def _family(self, network: IPv4Network | IPv6Network) -> _Family[T]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, network: IPv4Network | IPv6Network, value: T) -> None:
        """Route `network` to `value`, replacing any value it had."""
        self._family(network).insert(int(network.network_address), network.prefixlen, value)

    def remove(self, network: IPv4Network | IPv6Network) -> bool:
        """Remove the route of exactly `network`; return whether there was one."""
        return self._family(network).remove(int(network.network_address), network.prefixlen)

    def remove_value(self, value: T) -> int:
        """Remove every route to `value` (compared with ==); return how many."""
        removed = 0
        for family in (self._v4, self._v6):
            for prefixlen, table in list(family.by_length.items()):
                for key in [k for k, v in table.items() if v == value]:
                    family.remove(key, prefixlen)
                    removed += 1
        return removed

    def get(self, network: IPv4Network | IPv6Network) -> T | None:
        """The value routed for exactly `network`, or None."""
        table = self._family(network).by_length.get(network.prefixlen, {})
        return table.get(int(network.network_address))

    def lookup(self, address: bytes) -> T | None:
        """The value of the longest prefix holding the raw 4- or 16-byte `address`.

        Returns None when no route matches or `address` is of another length.
        """
        n = len(address)
        if n == 4:
            family = self._v4
        elif n == 16:
            family = self._v6
        else:
            return None
        # The walk of _Family.lookup, inlined: this runs for every packet.
        key = int.from_bytes(address, "big")
        for mask, table in family.order:
            value = table.get(key & mask, _MISSING)
            if value is not _MISSING:
                return cast(T, value)
        return None

    def lookup_ip(self, address: IPv4Address | IPv6Address) -> T | None:
        """As lookup, for an ipaddress object."""
        return self.lookup(address.packed)

    def routes(self) -> list[tuple[IPv4Network | IPv6Network, T]]:
        """Every route: IPv4 first, then IPv6, each ordered by address then prefix."""
        out: list[tuple[IPv4Network | IPv6Network, T]] = []
        for family, make in ((self._v4, IPv4Network), (self._v6, IPv6Network)):
            found = [
                (key, prefixlen, value)
                for prefixlen, table in family.by_length.items()
                for key, value in table.items()
            ]
            found.sort(key=lambda item: (item[0], item[1]))
            out.extend((make((key, prefixlen)), value) for key, prefixlen, value in found)
        return out

    def clear(self) -> None:
        """Remove every route."""
        self._v4 = _Family(32)
        self._v6 = _Family(128)

    def __len__(self) -> int:
        return sum(len(t) for f in (self._v4, self._v6) for t in f.by_length.values())

    def __bool__(self) -> bool:
        return bool(self._v4.order or self._v6.order)
