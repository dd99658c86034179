"""The Noise_IKpsk2 handshake of WireGuard (paper 5.4.2 and 5.4.3), as pure functions.

Theory of operation: the initiator knows the responder's static key in advance (IK).
Its first message carries an ephemeral key, its own static key encrypted under
DH(e_i, S_r), and a TAI64N timestamp encrypted under a key that also mixes DH(S_i, S_r)
(so only a holder of S_i could produce it, and replays are told apart by the
timestamp).  The responder answers with its own ephemeral key and an empty AEAD that
proves it derived the same chain; the pre-shared key is mixed in last (psk2).  Both ends
then split the final chaining key into two transport keys.

The functions here raise CryptoError when a message does not authenticate; they keep no
state themselves: the caller (device.py) owns the handshake records.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gtun.core.wg.crypto import (
    INITIAL_CHAIN_KEY,
    INITIAL_HASH,
    CryptoError,
    aead_decrypt,
    aead_encrypt,
    dh,
    dh_generate,
    dh_public,
    hash_,
    kdf1,
    kdf2,
    kdf3,
)
from gtun.core.wg.messages import Initiation, Response


@dataclass(slots=True)
class InitiatorState:
    """What the initiator keeps between sending an initiation and getting the response."""

    ephemeral: X25519PrivateKey
    chain_key: bytes
    hash: bytes


@dataclass(slots=True)
class ConsumedInitiation:
    """What the responder learnt from a valid initiation."""

    remote_static: bytes
    timestamp: bytes
    remote_ephemeral: bytes
    chain_key: bytes
    hash: bytes


@dataclass(slots=True)
class SessionKeys:
    send: bytes
    receive: bytes


def create_initiation(
    local_public: bytes,
    remote_public: bytes,
    static_static: bytes,
    sender_index: int,
    timestamp: bytes,
) -> tuple[Initiation, InitiatorState]:
    """Build an initiation (without macs).  `static_static` is DH(S_i, S_r), precomputed."""
    h = hash_(INITIAL_HASH, remote_public)
    e = dh_generate()
    e_pub = dh_public(e)
    ck = kdf1(INITIAL_CHAIN_KEY, e_pub)
    h = hash_(h, e_pub)
    ck, k = kdf2(ck, dh(e, remote_public))
    encrypted_static = aead_encrypt(k, 0, local_public, h)
    h = hash_(h, encrypted_static)
    ck, k = kdf2(ck, static_static)
    encrypted_timestamp = aead_encrypt(k, 0, timestamp, h)
    h = hash_(h, encrypted_timestamp)
    msg = Initiation(sender_index, e_pub, encrypted_static, encrypted_timestamp)
    return msg, InitiatorState(e, ck, h)


def consume_initiation_static(
    msg: Initiation, local_private: X25519PrivateKey, local_public: bytes
) -> tuple[bytes, bytes, bytes]:
    """First half of consuming an initiation: reveal the initiator's static key.

    Returns (remote_static, chain_key, hash).  Raises CryptoError.
    """
    h = hash_(INITIAL_HASH, local_public)
    ck = kdf1(INITIAL_CHAIN_KEY, msg.ephemeral)
    h = hash_(h, msg.ephemeral)
    ck, k = kdf2(ck, dh(local_private, msg.ephemeral))
    remote_static = aead_decrypt(k, 0, msg.encrypted_static, h)
    h = hash_(h, msg.encrypted_static)
    return remote_static, ck, h


def consume_initiation_timestamp(
    msg: Initiation, remote_static: bytes, chain_key: bytes, h: bytes, static_static: bytes
) -> ConsumedInitiation:
    """Second half, once the static key is known to belong to a peer.  Raises CryptoError."""
    ck, k = kdf2(chain_key, static_static)
    timestamp = aead_decrypt(k, 0, msg.encrypted_timestamp, h)
    h = hash_(h, msg.encrypted_timestamp)
    return ConsumedInitiation(remote_static, timestamp, msg.ephemeral, ck, h)


def create_response(
    consumed: ConsumedInitiation, psk: bytes, sender_index: int, receiver_index: int
) -> tuple[Response, SessionKeys]:
    """Build the response (without macs) and the responder's transport keys."""
    e = dh_generate()
    e_pub = dh_public(e)
    ck = kdf1(consumed.chain_key, e_pub)
    h = hash_(consumed.hash, e_pub)
    ck = kdf1(ck, dh(e, consumed.remote_ephemeral))
    ck = kdf1(ck, dh(e, consumed.remote_static))
    ck, t, k = kdf3(ck, psk)
    h = hash_(h, t)
    encrypted_nothing = aead_encrypt(k, 0, b"", h)
    receive, send = kdf2(ck, b"")
    msg = Response(sender_index, receiver_index, e_pub, encrypted_nothing)
    return msg, SessionKeys(send=send, receive=receive)


def consume_response(
    msg: Response, state: InitiatorState, local_private: X25519PrivateKey, psk: bytes
) -> SessionKeys:
    """Check the response against our pending state; the initiator's keys.

    Raises CryptoError."""
    ck = kdf1(state.chain_key, msg.ephemeral)
    h = hash_(state.hash, msg.ephemeral)
    ck = kdf1(ck, dh(state.ephemeral, msg.ephemeral))
    ck = kdf1(ck, dh(local_private, msg.ephemeral))
    ck, t, k = kdf3(ck, psk)
    h = hash_(h, t)
    aead_decrypt(k, 0, msg.encrypted_nothing, h)
    send, receive = kdf2(ck, b"")
    return SessionKeys(send=send, receive=receive)


__all__ = [
    "ConsumedInitiation",
    "CryptoError",
    "InitiatorState",
    "SessionKeys",
    "consume_initiation_static",
    "consume_initiation_timestamp",
    "consume_response",
    "create_initiation",
    "create_response",
]
