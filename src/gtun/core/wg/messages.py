"""Codecs of the four WireGuard messages (paper section 5.4.2 - 5.4.6).

Each message has a pull_* (bytes -> dataclass) and push_* (dataclass -> bytes) pair.
pull_* checks the size first and raises MessageError for anything malformed, so a
datagram from the network can never raise anything else out of parsing.

    initiation:   type(1) reserved(3) sender(4) ephemeral(32) static(32+16)
                  timestamp(12+16) mac1(16) mac2(16)                      = 148 bytes
    response:     type(1) reserved(3) sender(4) receiver(4) ephemeral(32)
                  empty(0+16) mac1(16) mac2(16)                            = 92 bytes
    cookie reply: type(1) reserved(3) receiver(4) nonce(24) cookie(16+16)  = 64 bytes
    transport:    type(1) reserved(3) receiver(4) counter(8) packet(n+16)  >= 32 bytes

Integers are little-endian.  The reserved bytes must be zero.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gtun.core.wg.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
)


class MessageError(ValueError):
    """A remote peer sent a malformed message."""


_INITIATION = struct.Struct("<I I 32s 48s 28s 16s 16s")
_RESPONSE = struct.Struct("<I I I 32s 16s 16s 16s")
_COOKIE_REPLY = struct.Struct("<I I 24s 32s")
_TRANSPORT_HEADER = struct.Struct("<I I Q")

# Offsets where mac1 and mac2 start: mac1 covers everything before it, mac2 likewise.
INITIATION_MAC1_OFFSET = INITIATION_SIZE - 32
RESPONSE_MAC1_OFFSET = RESPONSE_SIZE - 32


@dataclass(frozen=True, slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)


@dataclass(frozen=True, slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes


@dataclass(frozen=True, slots=True)
class TransportHeader:
    receiver: int
    counter: int


def message_type(data: bytes) -> int:
    """The type of a datagram, 0 when it cannot be a WireGuard message at all."""
    if len(data) < 4:
        return 0
    first = data[0]
    if data[1] or data[2] or data[3]:
        return 0
    return first if MESSAGE_INITIATION <= first <= MESSAGE_TRANSPORT else 0


_HANDSHAKE_SIZES = {
    MESSAGE_INITIATION: INITIATION_SIZE,
    MESSAGE_RESPONSE: RESPONSE_SIZE,
    MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}


def is_wireguard_message(data: bytes) -> bool:
    """Whether `data` has a WireGuard type and a size that type can have (whitepaper
    5.4), without looking further: what a stream transport must carry."""
    kind = message_type(data)
    if kind == MESSAGE_TRANSPORT:
        return len(data) >= TRANSPORT_MIN_SIZE
    return kind != 0 and len(data) == _HANDSHAKE_SIZES[kind]


def _check(data: bytes, kind: int, size: int, name: str) -> None:
    if len(data) != size:
        raise MessageError(f"{name}: {len(data)} bytes, expected {size}")
    if message_type(data) != kind:
        raise MessageError(f"{name}: bad type or reserved bytes")


def pull_initiation(data: bytes) -> Initiation:
    _check(data, MESSAGE_INITIATION, INITIATION_SIZE, "initiation")
    _, sender, eph, static, ts, mac1, mac2 = _INITIATION.unpack(data)
    return Initiation(sender, eph, static, ts, mac1, mac2)


def push_initiation(msg: Initiation) -> bytes:
    return _INITIATION.pack(
        MESSAGE_INITIATION,
        msg.sender,
        msg.ephemeral,
        msg.encrypted_static,
        msg.encrypted_timestamp,
        msg.mac1,
        msg.mac2,
    )


def pull_response(data: bytes) -> Response:
    _check(data, MESSAGE_RESPONSE, RESPONSE_SIZE, "response")
    _, sender, receiver, eph, empty, mac1, mac2 = _RESPONSE.unpack(data)
    return Response(sender, receiver, eph, empty, mac1, mac2)


def push_response(msg: Response) -> bytes:
    return _RESPONSE.pack(
        MESSAGE_RESPONSE,
        msg.sender,
        msg.receiver,
        msg.ephemeral,
        msg.encrypted_nothing,
        msg.mac1,
        msg.mac2,
    )


def pull_cookie_reply(data: bytes) -> CookieReply:
    _check(data, MESSAGE_COOKIE_REPLY, COOKIE_REPLY_SIZE, "cookie reply")
    _, receiver, nonce, cookie = _COOKIE_REPLY.unpack(data)
    return CookieReply(receiver, nonce, cookie)


def push_cookie_reply(msg: CookieReply) -> bytes:
    return _COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, msg.receiver, msg.nonce, msg.encrypted_cookie)


def pull_transport_header(data: bytes) -> TransportHeader:
    if len(data) < TRANSPORT_MIN_SIZE:
        raise MessageError(f"transport: {len(data)} bytes, at least {TRANSPORT_MIN_SIZE}")
    if message_type(data) != MESSAGE_TRANSPORT:
        raise MessageError("transport: bad type or reserved bytes")
    _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    return TransportHeader(receiver, counter)


def push_transport_header(receiver: int, counter: int) -> bytes:
    return _TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver, counter)


TRANSPORT_HEADER = _TRANSPORT_HEADER
assert TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE
