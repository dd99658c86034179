"""mac1, mac2 and the cookie reply (paper 5.4.4 and 5.4.7).

mac1 (keyed by the receiver's public key) lets a responder discard garbage before any
Curve25519 work.  Under load, a responder also demands mac2, keyed by a cookie that is a
MAC of the sender's address under a secret rotated every two minutes; a sender without
one is sent the cookie encrypted (XChaCha20-Poly1305) under a key derived from the
responder's public key, with the message's mac1 as associated data, so only the holder
of the original message can use it.
"""

from __future__ import annotations

import hmac
import secrets

from gtun.core.wg.constants import COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1, MAC_SIZE
from gtun.core.wg.crypto import CryptoError, hash_, mac, xaead_decrypt, xaead_encrypt
from gtun.core.wg.messages import CookieReply

_ZERO_MAC = bytes(MAC_SIZE)


class CookieChecker:
    """The receiving side, keyed by our own public key."""

    def __init__(self, local_public: bytes) -> None:
        self._mac1_key = hash_(LABEL_MAC1, local_public)
        self._cookie_key = hash_(LABEL_COOKIE, local_public)
        self._secret = secrets.token_bytes(32)
        self._secret_time: float | None = None

    def check_mac1(self, msg: bytes) -> bool:
        """`msg` is a whole initiation or response; mac1 sits 32 bytes from its end."""
        end = len(msg) - 2 * MAC_SIZE
        return hmac.compare_digest(mac(self._mac1_key, msg[:end]), msg[end : end + MAC_SIZE])

    def _cookie(self, source: bytes, now: float) -> bytes:
        if self._secret_time is None or now - self._secret_time > COOKIE_REFRESH_TIME:
            self._secret = secrets.token_bytes(32)
            self._secret_time = now
        return mac(self._secret, source)

    def check_mac2(self, msg: bytes, source: bytes, now: float) -> bool:
        end = len(msg) - MAC_SIZE
        mac2 = msg[end:]
        if mac2 == _ZERO_MAC:
            return False
        return hmac.compare_digest(mac(self._cookie(source, now), msg[:end]), mac2)

    def create_reply(self, msg: bytes, receiver: int, source: bytes, now: float) -> CookieReply:
        end = len(msg) - 2 * MAC_SIZE
        mac1 = msg[end : end + MAC_SIZE]
        nonce = secrets.token_bytes(24)
        encrypted = xaead_encrypt(self._cookie_key, nonce, self._cookie(source, now), mac1)
        return CookieReply(receiver, nonce, encrypted)


class CookieGenerator:
    """The sending side, keyed by the remote peer's public key."""

    def __init__(self, remote_public: bytes) -> None:
        self._mac1_key = hash_(LABEL_MAC1, remote_public)
        self._cookie_key = hash_(LABEL_COOKIE, remote_public)
        self._cookie: bytes | None = None
        self._cookie_time = 0.0
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """`msg` is a whole message whose last 32 bytes (mac1, mac2) are to be filled."""
        end = len(msg) - 2 * MAC_SIZE
        body = msg[:end]
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_time < COOKIE_REFRESH_TIME:
            mac2 = mac(self._cookie, body + mac1)
        else:
            mac2 = _ZERO_MAC
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Store the cookie if the reply answers our last message; False otherwise."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = xaead_decrypt(
                self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1
            )
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_time = now
        return True
