"""What an endpoint is to the WireGuard core, and the bytes its cookie is bound to.

The core treats an endpoint as an opaque hashable value handed in with each datagram
and handed back with each datagram to send; the edge's transports give them meaning
(gtun.io.transport).  Only the cookie mechanism (paper 5.4.7) looks inside: under load a
responder's cookie is a MAC over the sender's address, so that a mac2 earned at one
address is worthless at another.  `cookie_source()` gives those bytes, as wireguard-go's
Endpoint.DstToBytes() does: the packed IP address and the 2-byte port.  Per-source
limits (ratelimiter.py, the TCP listener) key on `source_key()`: the address alone.

One thing flows the other way: when a datagram from an endpoint authenticates (a
handshake completes through it, or a transport message from it decrypts and it becomes
the peer's endpoint), the core calls `mark_authentic()`, which calls the endpoint's
`authenticated()` method if it has one.  A TCP connection uses it to tell a peer's
connection from one that only sends WireGuard-shaped bytes; UDP addresses (tuples) have
none.  It runs only when a peer's endpoint is set, never per datagram.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable
from ipaddress import IPv6Address, ip_address
from typing import Any

_PORT = struct.Struct(">H")


def address_bytes(host: object, port: object) -> bytes:
    """The packed IP address of `host` then `port` in 2 bytes (big-endian).

    Raises ValueError when `host` is not an IP address or `port` not a port number."""
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"not a port number: {port!r}")
    return ip_address(host).packed + _PORT.pack(port)  # type: ignore[arg-type]


def cookie_source(endpoint: Hashable) -> bytes:
    """The bytes the cookie of `endpoint` is computed over.

    - a (host, port[, flowinfo, scope_id]) tuple, a UDP address: its address_bytes();
    - an object with a `cookie_source` bytes attribute (a TCP connection): that;
    - anything else (names in tests): its repr, stable for equal values.
    Never raises."""
    return _endpoint_bytes(endpoint, lambda t: address_bytes(t[0], t[1]), "cookie_source")


def _endpoint_bytes(
    endpoint: Hashable, of_address: Callable[[tuple[Any, ...]], bytes], attribute: str
) -> bytes:
    """`of_address(endpoint)` for an address tuple, else the endpoint's `attribute`
    (bytes), else its repr."""
    if endpoint.__class__ is tuple and len(endpoint) >= 2:
        try:
            return of_address(endpoint)
        except ValueError:
            pass
    value = getattr(endpoint, attribute, None)
    if isinstance(value, bytes):
        return value
    return repr(endpoint).encode()


def address_key(host: object) -> bytes:
    """The bytes a per-source limit keys on for the IP address `host`: an IPv4 address
    (also one mapped into IPv6) whole, an IPv6 address's /64.  Raises ValueError."""
    ip = ip_address(host)  # type: ignore[arg-type]
    if isinstance(ip, IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is None:
            return ip.packed[:8]
        ip = mapped
    return ip.packed


def source_key(endpoint: Hashable) -> bytes:
    """The source a per-source limit charges for `endpoint`: a (host, port, ...) tuple's
    address_key(); an object's `source_key` bytes attribute (a TCP connection); anything
    else its repr.  Never raises."""
    return _endpoint_bytes(endpoint, lambda t: address_key(t[0]), "source_key")


def mark_authentic(endpoint: Hashable) -> None:
    """Tell `endpoint` that an authentic message came through it (see above)."""
    authenticated = getattr(endpoint, "authenticated", None)
    if authenticated is not None:
        authenticated()
