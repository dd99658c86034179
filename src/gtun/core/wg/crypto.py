"""The cryptographic functions of the WireGuard paper, section 5.4, over library
primitives: X25519 and ChaCha20-Poly1305 from pyca `cryptography`, BLAKE2s from
hashlib, XChaCha20-Poly1305 from PyNaCl.  Nothing below these is implemented here.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gtun.core.wg.constants import CONSTRUCTION, IDENTIFIER, TAI64N_WHITENING_NS

__all__ = [
    "InvalidTag",
    "CryptoError",
    "dh",
    "dh_generate",
    "dh_public",
    "is_degenerate_key",
    "hash_",
    "mac",
    "hmac_",
    "kdf1",
    "kdf2",
    "kdf3",
    "aead_encrypt",
    "aead_decrypt",
    "xaead_encrypt",
    "xaead_decrypt",
    "tai64n",
    "INITIAL_CHAIN_KEY",
    "INITIAL_HASH",
]


class CryptoError(Exception):
    """A remote peer sent something that does not authenticate or is degenerate."""


_ZERO32 = bytes(32)
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_pack_counter = struct.Struct("<Q").pack


def hash_(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte output (MAC in the paper)."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    t3 = hmac_(t0, t2 + b"\x03")
    return t1, t2, t3


def dh_generate() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def dh_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519; raises CryptoError for a low-order public key (all-zero secret)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # cryptography refuses an all-zero result
        raise CryptoError("degenerate public key") from exc
    if shared == _ZERO32:
        raise CryptoError("degenerate public key")
    return shared


# Any clamped scalar is a multiple of the cofactor 8, so X25519 with it gives all zeros
# exactly for the points of small order (on the curve or its twist): one fixed scalar
# tells them all.
_PROBE = X25519PrivateKey.from_private_bytes(bytes([8] + [0] * 30 + [64]))


def is_degenerate_key(public: bytes) -> bool:
    """True when `public` (32 bytes) is a low-order point: every DH with it is all
    zeros, so it can be no one's key (WireGuard refuses it)."""
    try:
        dh(_PROBE, public)
    except (CryptoError, ValueError):
        return True
    return False


def nonce(counter: int) -> bytes:
    return _NONCE_PREFIX + _pack_counter(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(nonce(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    """Raises CryptoError when the tag does not verify."""
    try:
        return ChaCha20Poly1305(key).decrypt(nonce(counter), ciphertext, aad)
    except InvalidTag as exc:
        raise CryptoError("authentication failed") from exc


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return bytes(
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce24, key)
    )


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Raises CryptoError when the tag does not verify."""
    try:
        return bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce24, key)
        )
    except nacl.exceptions.CryptoError as exc:
        raise CryptoError("authentication failed") from exc


def tai64n(unix_time: float) -> bytes:
    """TAI64N label of a Unix time, whitened to TAI64N_WHITENING_NS (as wireguard-go)."""
    seconds = int(unix_time)
    nanos = int((unix_time - seconds) * 1e9)
    nanos -= nanos % TAI64N_WHITENING_NS
    return struct.pack(">QI", 0x400000000000000A + seconds, nanos)


INITIAL_CHAIN_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN_KEY, IDENTIFIER)
