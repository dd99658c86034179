"""gtun's own messages inside the WireGuard tunnel (configuration push and liveness).

They travel as the plaintext of ordinary transport data messages, so they are encrypted
and authenticated like any packet.  Their first byte is 0x00: an IP packet's first nibble
is its version (4 or 6), so no IP packet can be mistaken for one, and a stock WireGuard
peer, which drops any plaintext that is not IPv4 or IPv6, would ignore one.  The relay
never sends one unprompted: only a peer that asked (a gtun client) gets answers, so stock
peers never see them at all.

    magic(4) = 00 'g' 't' 01   type(1)   length(2, big-endian)   JSON payload(length)

Types: CONFIG_REQUEST (client -> relay), CONFIG (relay -> client), REFUSED (relay ->
client, with a reason), PING (client -> relay) and PONG (relay -> client).

The magic 00 'g' 't' 02 is taken too: Ethernet frames in TAP mode (l2frame.py).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"\x00gt\x01"
HEADER = struct.Struct(">4sBH")
MAX_PAYLOAD = 8000  # bound on a decoded message; a config with many routes fits

CONFIG_REQUEST = 1
CONFIG = 2
REFUSED = 3
PING = 4
PONG = 5
TYPES = {CONFIG_REQUEST, CONFIG, REFUSED, PING, PONG}


class TunnelMessageError(ValueError):
    """A peer sent a malformed gtun message."""


@dataclass(frozen=True, slots=True)
class TunnelMessage:
    type: int
    payload: dict[str, Any]


def is_tunnel_message(plaintext: bytes) -> bool:
    return plaintext[:1] == b"\x00"


def push_message(msg_type: int, payload: dict[str, Any] | None = None) -> bytes:
    """Raises ValueError when the payload is too large (caller's misuse)."""
    body = json.dumps(payload or {}, separators=(",", ":")).encode()
    if len(body) > MAX_PAYLOAD:
        raise ValueError(f"tunnel message payload of {len(body)} bytes is too large")
    return HEADER.pack(MAGIC, msg_type, len(body)) + body


def pull_message(plaintext: bytes) -> TunnelMessage:
    """Parse a message (WireGuard's zero padding after it is ignored).

    Raises TunnelMessageError."""
    if len(plaintext) < HEADER.size:
        raise TunnelMessageError("truncated header")
    magic, msg_type, length = HEADER.unpack_from(plaintext)
    if magic != MAGIC:
        raise TunnelMessageError("bad magic")
    if msg_type not in TYPES:
        raise TunnelMessageError(f"unknown type {msg_type}")
    if length > MAX_PAYLOAD or HEADER.size + length > len(plaintext):
        raise TunnelMessageError("bad length")
    try:
        payload = json.loads(plaintext[HEADER.size : HEADER.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TunnelMessageError("payload is not JSON") from exc
    if not isinstance(payload, dict):
        raise TunnelMessageError("payload is not an object")
    return TunnelMessage(msg_type, payload)
