"""The bytes a cookie is bound to (gtun.core.wg.endpoint): an endpoint's address, as
wireguard-go's Endpoint.DstToBytes(), so that mac2 earned at one endpoint fails at another."""

from __future__ import annotations

import secrets
from collections.abc import Hashable

import pytest

from gtun.core.wg.cookie import CookieChecker, CookieGenerator
from gtun.core.wg.endpoint import address_bytes, cookie_source


class Connection:
    """An endpoint object, as a TCP connection is (gtun.io.tcp.TcpEndpoint)."""

    def __init__(self, source: bytes) -> None:
        self.cookie_source = source


@pytest.mark.parametrize(
    ("endpoint", "source"),
    [
        (("192.0.2.1", 51820), bytes([192, 0, 2, 1, 0xCA, 0x6C])),
        (("2001:db8::7", 443, 0, 0), bytes.fromhex("20010db8" + "00" * 11 + "07") + b"\x01\xbb"),
        (("fe80::1%eth0", 1, 0, 2), bytes.fromhex("fe80" + "00" * 13 + "01") + b"\x00\x01"),
        (("::ffff:10.0.0.1", 2), bytes(10) + b"\xff\xff\x0a\x00\x00\x01\x00\x02"),
        ("R", b"'R'"),  # the names tier-1 tests use
        (("not an address", 1), b"('not an address', 1)"),
        (("10.0.0.1", 70000), b"('10.0.0.1', 70000)"),
        (Connection(b"conn-7"), b"conn-7"),
    ],
)
def test_cookie_source(endpoint: Hashable, source: bytes) -> None:
    assert cookie_source(endpoint) == source


def test_address_bytes_refuses_what_is_not_an_address() -> None:
    for host, port in (("example.org", 1), ("10.0.0.1", -1), ("10.0.0.1", "80")):
        with pytest.raises(ValueError):
            address_bytes(host, port)


def test_a_cookie_earned_at_one_endpoint_is_refused_at_another() -> None:
    responder_key = secrets.token_bytes(32)
    checker = CookieChecker(responder_key)
    sender = CookieGenerator(responder_key)
    message = b"\x01\x00\x00\x00" + secrets.token_bytes(112) + bytes(32)  # initiation-sized
    here = cookie_source(("192.0.2.1", 51820))
    now = 100.0
    first = sender.add_macs(message, now)
    assert checker.check_mac1(first) and not checker.check_mac2(first, here, now)
    assert sender.consume_reply(checker.create_reply(first, 7, here, now), now)
    second = sender.add_macs(message, now + 1)
    assert checker.check_mac2(second, here, now + 1)
    for elsewhere in (
        ("192.0.2.1", 51821),  # another port
        ("192.0.2.2", 51820),  # another host
        Connection(here + b"!"),
    ):
        assert not checker.check_mac2(second, cookie_source(elsewhere), now + 1), elsewhere
