"""What an endpoint is to the WireGuard core, and the bytes its cookie is bound to.

The core treats an endpoint as an opaque hashable value handed in with each datagram
and handed back with each datagram to send; the edge's transports give them meaning
(gtun.io.transport).  Only the cookie mechanism (paper 5.4.7) looks inside: under load a
responder's cookie is a MAC over the sender's address, so that a mac2 earned at one
address is worthless at another.  `cookie_source()` gives those bytes, as wireguard-go's
Endpoint.DstToBytes() does: the packed IP address and the 2-byte port.
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from ipaddress import ip_address

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
    if endpoint.__class__ is tuple and len(endpoint) >= 2:
        try:
            return address_bytes(endpoint[0], endpoint[1])
        except ValueError:
            pass
    source = getattr(endpoint, "cookie_source", None)
    if isinstance(source, bytes):
        return source
    return repr(endpoint).encode()
