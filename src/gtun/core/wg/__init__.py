"""The WireGuard protocol as a sans-IO core.

Nothing in this package does I/O: it takes datagrams and the current time, and hands
back datagrams to send, events and the next timer deadline.  A test enforces that it
imports nothing from asyncio, socket, os, fcntl or pyroute2.
"""

from gtun.core.wg.device import Peer, WireGuard
from gtun.core.wg.events import (
    Event,
    HandshakeCompleted,
    HandshakeTimedOut,
    PacketReceived,
    PeerUnknown,
    SessionConfirmed,
    SessionUnconfirmed,
)

__all__ = [
    "Event",
    "HandshakeCompleted",
    "HandshakeTimedOut",
    "PacketReceived",
    "Peer",
    "PeerUnknown",
    "SessionConfirmed",
    "SessionUnconfirmed",
    "WireGuard",
]
