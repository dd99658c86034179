"""Transports: what carries the core's datagrams to the network and back.

The interface is wireguard-go's conn.Bind made asyncio-shaped.  A transport is opened
with ONE receive callback and from then on delivers what arrives in batches,
`receive([(datagram, endpoint), ...], now)`, each batch being whatever one wake-up read
(a UDP read of up to UDP_BATCH datagrams, the frames of one TCP read); the Driver feeds
it to the core and runs its after() once, or, when other sources' datagrams wait or the
batch is over one wake-up's budget, queues it per source and serves the queues fairly
(driver.py).  `send()` takes a batch of
(datagram, endpoint) pairs and returns how many it dropped; it never blocks or raises
for the network's sake (a full buffer, a closed connection: dropped).

Endpoints are what the WireGuard core stores as a peer's endpoint: hashable values, of
two kinds.
- Addresses: (host, port) tuples, as a UDP socket gives them.  They stay plain tuples
  because the relay handles each of hundreds of thousands of datagrams a second: no
  wrapper object per datagram.  A transport whose endpoints are addresses says so
  (`addressed`); a Driver has at most one, and sends every tuple-addressed datagram
  through it.
- Connections: an object per connection (gtun.io.tcp.TcpEndpoint), hashable by
  identity, whose `owner` is the transport that sends to it, and whose `cookie_source`
  gives the bytes the WireGuard cookie binds to (gtun.core.wg.endpoint; for an address
  the core packs the tuple itself).

Fakes for tests: gtun.testing.transport (as wireguard-go's conn/bindtest).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

Endpoint = Hashable
# receive(batch, now): the datagrams one wake-up brought, and the loop's time.
Receive = Callable[[list[tuple[bytes, Any]], float], None]
# admit(endpoint, n): whether `n` datagrams from `endpoint`, read but not yet cut apart,
# are wanted; False: the caller of admit has counted them as dropped, skip them.  A
# transport that reads many datagrams from one sender at once (UDP GRO trains) may have
# an `admit` attribute; the Driver sets it, so a flood over its source's bound is
# dropped before it costs an object per datagram (driver.py, Fairness).
Admit = Callable[[Any, int], bool]

# Tuning knob: a wake-up of an input (a UDP socket, the TUN) this long after its previous
# one is an idle one, which finds one packet waiting: it reads once, and does not read
# again only to hear EAGAIN (a failed system call and an exception, which cost 15 to 30
# microseconds in a process that has been asleep: measured, bench.py's idle RTT).  If
# more was waiting, the loop's poll, level-triggered, wakes the reader again at once, and
# that wake-up, close behind the first, reads in batches.
LONE_GAP = 0.001


class Transport(Protocol):
    """One way of carrying datagrams (UDP, TCP, an in-memory fake)."""

    # True: the endpoints are (host, port) tuples; False: objects whose `owner` is this.
    addressed: bool

    def open(self, receive: Receive) -> None:
        """Deliver what arrives to `receive` from now on."""

    def send(self, datagrams: Sequence[tuple[bytes, Any]]) -> int:
        """Send (datagram, endpoint) pairs in order; the number dropped.  Never raises
        for a network error or a full buffer."""

    def close(self) -> None:
        """Stop receiving and release the sockets.  Idempotent."""


class ConnectionEndpoint(Protocol):
    """An endpoint that is one connection of a transport (not an address)."""

    @property
    def owner(self) -> Transport: ...

    @property
    def cookie_source(self) -> bytes: ...

    @property
    def address(self) -> str:
        """The other end, as people read it (status, logs)."""
        ...


def endpoint_text(endpoint: Any) -> str | None:
    """An endpoint as people read it: "host:port" ("[host]:port" for IPv6), a connection's
    own `address`, None for none."""
    if endpoint is None:
        return None
    if endpoint.__class__ is tuple:
        host, port = endpoint[0], endpoint[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    address = getattr(endpoint, "address", None)
    return address if isinstance(address, str) else repr(endpoint)
