"""Codecs of the four WireGuard messages (paper 5.4.2 - 5.4.6): round trips, and
MessageError (never anything else) for malformed input."""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# On a failing example hypothesis imports its patch writer, which drags in a deprecated
# mypy_extensions.TypedDict; with warnings as errors that hides the real failure behind
# an INTERNALERROR.  Import it here once, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

from gtun.core.wg import messages as m
from gtun.core.wg.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from gtun.core.wg.messages import MessageError


def _initiation() -> m.Initiation:
    return m.Initiation(
        sender=0xDEADBEEF,
        ephemeral=os.urandom(32),
        encrypted_static=os.urandom(48),
        encrypted_timestamp=os.urandom(28),
        mac1=os.urandom(16),
        mac2=os.urandom(16),
    )


def _response() -> m.Response:
    return m.Response(
        sender=1,
        receiver=0xFFFFFFFF,
        ephemeral=os.urandom(32),
        encrypted_nothing=os.urandom(16),
        mac1=os.urandom(16),
        mac2=os.urandom(16),
    )


def _cookie_reply() -> m.CookieReply:
    return m.CookieReply(receiver=0x01020304, nonce=os.urandom(24), encrypted_cookie=os.urandom(32))


# (push, pull, sample, exact size, type)
CODECS: list[tuple[Callable[[Any], bytes], Callable[[bytes], Any], Callable[[], Any], int, int]] = [
    (m.push_initiation, m.pull_initiation, _initiation, INITIATION_SIZE, MESSAGE_INITIATION),
    (m.push_response, m.pull_response, _response, RESPONSE_SIZE, MESSAGE_RESPONSE),
    (
        m.push_cookie_reply,
        m.pull_cookie_reply,
        _cookie_reply,
        COOKIE_REPLY_SIZE,
        MESSAGE_COOKIE_REPLY,
    ),
]
CODEC_IDS = ["initiation", "response", "cookie_reply"]


def test_sizes_match_the_paper() -> None:
    assert (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE, TRANSPORT_MIN_SIZE) == (
        148,
        92,
        64,
        32,
    )


@pytest.mark.parametrize(("push", "pull", "sample", "size", "kind"), CODECS, ids=CODEC_IDS)
def test_round_trip(push: Any, pull: Any, sample: Any, size: int, kind: int) -> None:
    msg = sample()
    data = push(msg)
    assert len(data) == size
    assert data[:4] == bytes([kind, 0, 0, 0])
    assert m.message_type(data) == kind
    assert pull(data) == msg
    assert push(pull(data)) == data


def test_initiation_layout() -> None:
    msg = _initiation()
    data = m.push_initiation(msg)
    assert struct.unpack_from("<I", data, 4)[0] == msg.sender
    assert data[8:40] == msg.ephemeral
    assert data[40:88] == msg.encrypted_static
    assert data[88:116] == msg.encrypted_timestamp
    assert data[116:132] == msg.mac1 and m.INITIATION_MAC1_OFFSET == 116
    assert data[132:148] == msg.mac2


def test_response_layout() -> None:
    msg = _response()
    data = m.push_response(msg)
    assert struct.unpack_from("<II", data, 4) == (msg.sender, msg.receiver)
    assert data[12:44] == msg.ephemeral
    assert data[44:60] == msg.encrypted_nothing
    assert data[60:76] == msg.mac1 and m.RESPONSE_MAC1_OFFSET == 60
    assert data[76:92] == msg.mac2


def test_cookie_reply_layout() -> None:
    msg = _cookie_reply()
    data = m.push_cookie_reply(msg)
    assert data[4:8] == b"\x04\x03\x02\x01"
    assert data[8:32] == msg.nonce
    assert data[32:64] == msg.encrypted_cookie


def test_default_macs_are_zero() -> None:
    msg = m.Initiation(1, bytes(32), bytes(48), bytes(28))
    assert m.push_initiation(msg)[-32:] == bytes(32)


@pytest.mark.parametrize("counter", [0, 1, 0x0102030405060708, (1 << 64) - 1])
def test_transport_header_round_trip(counter: int) -> None:
    header = m.push_transport_header(0xCAFEBABE, counter)
    assert len(header) == 16
    assert header[:4] == b"\x04\x00\x00\x00"
    assert header[8:16] == struct.pack("<Q", counter)
    data = header + os.urandom(16)  # the smallest transport message: a keepalive
    assert m.message_type(data) == MESSAGE_TRANSPORT
    assert m.pull_transport_header(data) == m.TransportHeader(0xCAFEBABE, counter)
    assert m.pull_transport_header(data + bytes(1400)).counter == counter


@pytest.mark.parametrize(("push", "pull", "sample", "size", "kind"), CODECS, ids=CODEC_IDS)
def test_every_truncation_rejected(push: Any, pull: Any, sample: Any, size: int, kind: int) -> None:
    data = push(sample())
    for n in range(size):
        with pytest.raises(MessageError):
            pull(data[:n])


def test_transport_truncation_rejected() -> None:
    data = m.push_transport_header(5, 6) + bytes(16)
    for n in range(TRANSPORT_MIN_SIZE):
        with pytest.raises(MessageError):
            m.pull_transport_header(data[:n])


@pytest.mark.parametrize(("push", "pull", "sample", "size", "kind"), CODECS, ids=CODEC_IDS)
def test_oversized_rejected(push: Any, pull: Any, sample: Any, size: int, kind: int) -> None:
    data = push(sample())
    for extra in (1, 15, 16, 1000):
        with pytest.raises(MessageError):
            pull(data + bytes(extra))


@pytest.mark.parametrize(("push", "pull", "sample", "size", "kind"), CODECS, ids=CODEC_IDS)
def test_wrong_type_rejected(push: Any, pull: Any, sample: Any, size: int, kind: int) -> None:
    data = push(sample())
    for wrong in (0, 1, 2, 3, 4, 5, 0x80, 0xFF):
        if wrong == kind:
            continue
        with pytest.raises(MessageError):
            pull(bytes([wrong]) + data[1:])


def test_transport_wrong_type_rejected() -> None:
    data = m.push_transport_header(5, 6) + bytes(16)
    for wrong in (0, 1, 2, 3, 5, 0xFF):
        with pytest.raises(MessageError):
            m.pull_transport_header(bytes([wrong]) + data[1:])


@pytest.mark.parametrize(("push", "pull", "sample", "size", "kind"), CODECS, ids=CODEC_IDS)
def test_nonzero_reserved_rejected(push: Any, pull: Any, sample: Any, size: int, kind: int) -> None:
    data = push(sample())
    for i in (1, 2, 3):
        for value in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] = value
            with pytest.raises(MessageError):
                pull(bytes(bad))
            assert m.message_type(bytes(bad)) == 0


def test_transport_nonzero_reserved_rejected() -> None:
    data = m.push_transport_header(5, 6) + bytes(16)
    for i in (1, 2, 3):
        bad = bytearray(data)
        bad[i] = 1
        with pytest.raises(MessageError):
            m.pull_transport_header(bytes(bad))


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", 0),
        (b"\x01", 0),
        (b"\x01\x00\x00", 0),
        (b"\x01\x00\x00\x00", MESSAGE_INITIATION),
        (b"\x02\x00\x00\x00", MESSAGE_RESPONSE),
        (b"\x03\x00\x00\x00", MESSAGE_COOKIE_REPLY),
        (b"\x04\x00\x00\x00" + bytes(100), MESSAGE_TRANSPORT),
        (b"\x00\x00\x00\x00", 0),
        (b"\x05\x00\x00\x00", 0),
        (b"\xff\x00\x00\x00", 0),
        (b"\x01\x00\x00\x01", 0),
        (b"\x04\x01\x00\x00" + bytes(100), 0),
        (b"GET / HTTP/1.1\r\n", 0),
    ],
)
def test_message_type(data: bytes, kind: int) -> None:
    assert m.message_type(data) == kind


PULLS = [m.pull_initiation, m.pull_response, m.pull_cookie_reply, m.pull_transport_header]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=5))
def test_garbage_only_raises_message_error(data: bytes, first: int) -> None:
    # Bias the first bytes towards valid headers so the size checks are reached too.
    for candidate in (data, bytes([first, 0, 0, 0]) + data):
        kind = m.message_type(candidate)
        assert kind in (0, 1, 2, 3, 4)
        for pull in PULLS:
            try:
                pull(candidate)
            except MessageError:
                pass
