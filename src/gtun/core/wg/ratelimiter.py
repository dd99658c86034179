"""A per-source token bucket for handshake messages (as wireguard-go's ratelimiter.go and
the Linux kernel's ratelimiter.c).

Theory of operation
-------------------
Every handshake message that passed mac1 (and mac2 when under load) costs the responder
Diffie-Hellman work.  Each source may spend `rate` of them a second, with a bucket of
`burst` tokens for a short rush; a message that finds the bucket empty is dropped before
any DH.  A source is its IP address without the port (an IPv6 address's /64, as the
kernel does, since a host owns a whole /64), so a sender cannot escape by changing ports.

A bucket idle for burst/rate seconds is full again, the same as no bucket at all, so
collect() forgets it; collection runs from allow() at most once every `gc_interval`
seconds.  The table holds at most `max_entries` sources: when it is full, after a
collection, a new source is refused (as the kernel does) rather than evicting one that
is being limited.  Time comes from the caller (`now`), never from a clock.

The device keeps a second instance for the cookie replies it sends under load (one per
message without mac2, whose source may be forged), keyed the same way.
"""

from __future__ import annotations

from gtun.core.wg.constants import (
    HANDSHAKE_BURST_PER_SOURCE,
    HANDSHAKES_PER_SECOND_PER_SOURCE,
    RATELIMITER_GC_INTERVAL,
    RATELIMITER_MAX_ENTRIES,
)


class RateLimiter:
    """Token buckets keyed by source (bytes from gtun.core.wg.endpoint.source_key)."""

    def __init__(
        self,
        rate: float = HANDSHAKES_PER_SECOND_PER_SOURCE,
        burst: int = HANDSHAKE_BURST_PER_SOURCE,
        *,
        max_entries: int = RATELIMITER_MAX_ENTRIES,
        gc_interval: float = RATELIMITER_GC_INTERVAL,
    ) -> None:
        if rate <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("rate, burst and max_entries must be positive")
        self.rate = rate
        self.burst = float(burst)
        self.max_entries = max_entries
        self.gc_interval = gc_interval
        self.full_after = burst / rate  # an idle bucket is full again after this
        # source -> [tokens, time of the last update]
        self._table: dict[bytes, list[float]] = {}
        self._last_gc: float | None = None

    def __len__(self) -> int:
        return len(self._table)

    def allow(self, source: bytes, now: float) -> bool:
        """Take a token for `source`; False when its bucket is empty (or the table is
        full and `source` is new)."""
        if self._last_gc is None:
            self._last_gc = now
        elif now - self._last_gc >= self.gc_interval:
            self.collect(now)
        entry = self._table.get(source)
        if entry is None:
            if len(self._table) >= self.max_entries:
                self.collect(now)
                if len(self._table) >= self.max_entries:
                    return False
            self._table[source] = [self.burst - 1.0, now]
            return True
        elapsed = now - entry[1]
        if elapsed > 0:
            entry[0] = min(self.burst, entry[0] + elapsed * self.rate)
            entry[1] = now
        if entry[0] >= 1.0:
            entry[0] -= 1.0
            return True
        return False

    def collect(self, now: float) -> None:
        """Forget the buckets that are full again (idle for full_after seconds)."""
        self._last_gc = now
        full_after = self.full_after
        idle = [k for k, (_, last) in self._table.items() if now - last >= full_after]
        for key in idle:
            del self._table[key]
