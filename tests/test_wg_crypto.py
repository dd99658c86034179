"""The cryptographic functions of gtun.core.wg.crypto against published vectors and
independent constructions (WireGuard paper 5.4, RFC 2104, RFC 8439,
draft-irtf-cfrg-xchacha-03)."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gtun.core.wg import crypto
from gtun.core.wg.constants import CONSTRUCTION, IDENTIFIER, TAI64N_WHITENING_NS
from gtun.core.wg.crypto import CryptoError

# --- the initial chaining key and hash (paper 5.4.2) ---------------------------------

# Ci = HASH(CONSTRUCTION), Hi = HASH(Ci || IDENTIFIER), as computed by wireguard-go's
# device/noise-protocol.go init() (InitialChainKey, InitialHash).
INITIAL_CHAIN_KEY_HEX = "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36"
INITIAL_HASH_HEX = "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3"


def test_construction_and_identifier_strings() -> None:
    assert CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"


def test_initial_chain_key_and_hash() -> None:
    assert crypto.INITIAL_CHAIN_KEY.hex() == INITIAL_CHAIN_KEY_HEX
    assert crypto.INITIAL_HASH.hex() == INITIAL_HASH_HEX
    # And the constants are the BLAKE2s of the construction, computed here directly.
    assert hashlib.blake2s(CONSTRUCTION).hexdigest() == INITIAL_CHAIN_KEY_HEX
    assert hashlib.blake2s(bytes.fromhex(INITIAL_CHAIN_KEY_HEX) + IDENTIFIER).hexdigest() == (
        INITIAL_HASH_HEX
    )


def test_hash_concatenates_its_parts() -> None:
    assert crypto.hash_(b"ab", b"", b"cd") == hashlib.blake2s(b"abcd").digest()
    assert len(crypto.hash_(b"")) == 32


def test_mac_is_keyed_blake2s_16() -> None:
    key = bytes(range(32))
    assert crypto.mac(key, b"data") == hashlib.blake2s(b"data", key=key, digest_size=16).digest()
    assert len(crypto.mac(key, b"")) == 16


# --- HMAC-BLAKE2s (RFC 2104) ----------------------------------------------------------


def _rfc2104_hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC written out from RFC 2104 section 2, with BLAKE2s (block size 64 bytes)."""
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\x00")
    ipad = bytes(b ^ 0x36 for b in key)
    opad = bytes(b ^ 0x5C for b in key)
    inner = hashlib.blake2s(ipad + data).digest()
    return hashlib.blake2s(opad + inner).digest()


@pytest.mark.parametrize(
    ("key", "data"),
    [
        (b"", b""),
        (bytes(32), b"\x01"),
        (bytes(range(32)), b"The quick brown fox jumps over the lazy dog"),
        (bytes(range(64)), bytes(200)),  # key exactly one block
        (bytes(range(100)), b"long key is hashed first"),  # key longer than a block
    ],
)
def test_hmac_blake2s_matches_rfc2104_construction(key: bytes, data: bytes) -> None:
    assert crypto.hmac_(key, data) == _rfc2104_hmac_blake2s(key, data)


# --- KDF (paper 5.4, HKDF over HMAC-BLAKE2s) ----------------------------------------


def _kdf(n: int, key: bytes, data: bytes) -> list[bytes]:
    t0 = _rfc2104_hmac_blake2s(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = _rfc2104_hmac_blake2s(t0, prev + bytes([i]))
        out.append(prev)
    return out


@pytest.mark.parametrize("data", [b"", b"x", bytes(32), bytes(range(255))])
def test_kdf_matches_independent_hkdf(data: bytes) -> None:
    key = hashlib.blake2s(b"chain").digest()
    t1, t2, t3 = _kdf(3, key, data)
    assert crypto.kdf1(key, data) == t1
    assert crypto.kdf2(key, data) == (t1, t2)
    assert crypto.kdf3(key, data) == (t1, t2, t3)


def test_kdf_outputs_are_prefix_consistent_and_distinct() -> None:
    key, data = bytes(range(32)), b"input"
    k1 = crypto.kdf1(key, data)
    k2 = crypto.kdf2(key, data)
    k3 = crypto.kdf3(key, data)
    assert k2[0] == k1
    assert k3[:2] == k2
    assert len(set(k3)) == 3
    assert all(len(k) == 32 for k in k3)
    assert crypto.kdf1(key, b"other") != k1


# --- ChaCha20-Poly1305 (RFC 8439) ---------------------------------------------------

# RFC 8439 section 2.8.2.
RFC8439_282_KEY = bytes(range(0x80, 0xA0))
RFC8439_282_NONCE = bytes.fromhex("070000004041424344454647")
RFC8439_282_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC8439_282_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)
RFC8439_282_CIPHERTEXT = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2"
    "a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b"
    "1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58"
    "fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b"
    "6116"
)
RFC8439_282_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")

# RFC 8439 appendix A.5: its nonce starts with four zero bytes, exactly WireGuard's
# nonce shape, so it goes through aead_decrypt unchanged (counter = LE 0102..08).
RFC8439_A5_KEY = bytes.fromhex("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
RFC8439_A5_NONCE = bytes.fromhex("000000000102030405060708")
RFC8439_A5_COUNTER = 0x0807060504030201
RFC8439_A5_AAD = bytes.fromhex("f33388860000000000004e91")
RFC8439_A5_CIPHERTEXT = bytes.fromhex(
    "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
    "4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
    "332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
    "9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
    "b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
    "af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
    "0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
    "49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
    "a6ad5cb4022b02709b"
)
RFC8439_A5_TAG = bytes.fromhex("eead9d67890cbb22392336fea1851f38")
RFC8439_A5_PLAINTEXT = (
    "Internet-Drafts are draft documents valid for a maximum of six months and may be "
    "updated, replaced, or obsoleted by other documents at any time. It is inappropriate "
    "to use Internet-Drafts as reference material or to cite them other than as "
    "/\u201cwork in progress./\u201d"
).encode()


def test_chacha20poly1305_primitive_rfc8439_2_8_2() -> None:
    # The RFC nonce (07000000 || iv) has no WireGuard counter form, so the primitive
    # aead_encrypt wraps is checked with it directly...
    sealed = ChaCha20Poly1305(RFC8439_282_KEY).encrypt(
        RFC8439_282_NONCE, RFC8439_282_PLAINTEXT, RFC8439_282_AAD
    )
    assert sealed == RFC8439_282_CIPHERTEXT + RFC8439_282_TAG


def test_aead_nonce_is_zero_prefix_and_little_endian_counter() -> None:
    # ...and aead_encrypt is checked to be that primitive under WireGuard's nonce.
    counter = 0x4746454443424140  # little-endian bytes 40 41 .. 47, as in the RFC iv
    assert crypto.nonce(counter) == bytes.fromhex("000000004041424344454647")
    assert crypto.nonce(1) == b"\x00" * 4 + b"\x01" + b"\x00" * 7
    sealed = crypto.aead_encrypt(RFC8439_282_KEY, counter, RFC8439_282_PLAINTEXT, RFC8439_282_AAD)
    expected = ChaCha20Poly1305(RFC8439_282_KEY).encrypt(
        b"\x00" * 4 + struct.pack("<Q", counter), RFC8439_282_PLAINTEXT, RFC8439_282_AAD
    )
    assert sealed == expected
    assert len(sealed) == len(RFC8439_282_PLAINTEXT) + 16


def test_aead_rfc8439_appendix_a5_through_our_functions() -> None:
    assert crypto.nonce(RFC8439_A5_COUNTER) == RFC8439_A5_NONCE
    sealed = RFC8439_A5_CIPHERTEXT + RFC8439_A5_TAG
    plaintext = crypto.aead_decrypt(RFC8439_A5_KEY, RFC8439_A5_COUNTER, sealed, RFC8439_A5_AAD)
    assert plaintext == RFC8439_A5_PLAINTEXT
    assert crypto.aead_encrypt(RFC8439_A5_KEY, RFC8439_A5_COUNTER, plaintext, RFC8439_A5_AAD) == (
        sealed
    )


def test_aead_decrypt_rejects_tampering() -> None:
    key = bytes(range(32))
    sealed = crypto.aead_encrypt(key, 7, b"payload", b"aad")
    assert crypto.aead_decrypt(key, 7, sealed, b"aad") == b"payload"
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(CryptoError):
            crypto.aead_decrypt(key, 7, bytes(bad), b"aad")
    with pytest.raises(CryptoError):
        crypto.aead_decrypt(key, 8, sealed, b"aad")  # wrong counter
    with pytest.raises(CryptoError):
        crypto.aead_decrypt(key, 7, sealed, b"aaD")  # wrong associated data
    with pytest.raises(CryptoError):
        crypto.aead_decrypt(bytes(32), 7, sealed, b"aad")  # wrong key
    with pytest.raises(CryptoError):
        crypto.aead_decrypt(key, 7, sealed[:-1], b"aad")  # truncated tag


def test_aead_empty_plaintext_is_just_a_tag() -> None:
    key = bytes(range(32))
    sealed = crypto.aead_encrypt(key, 0, b"", b"h")
    assert len(sealed) == 16
    assert crypto.aead_decrypt(key, 0, sealed, b"h") == b""


# --- XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03 A.3.1) -------------------------

XCHACHA_NONCE = bytes(range(0x40, 0x58))
XCHACHA_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49"
)


def test_xaead_draft_vector() -> None:
    sealed = crypto.xaead_encrypt(
        RFC8439_282_KEY, XCHACHA_NONCE, RFC8439_282_PLAINTEXT, RFC8439_282_AAD
    )
    assert sealed == XCHACHA_SEALED
    assert crypto.xaead_decrypt(RFC8439_282_KEY, XCHACHA_NONCE, sealed, RFC8439_282_AAD) == (
        RFC8439_282_PLAINTEXT
    )


def test_xaead_round_trip_and_tamper() -> None:
    key = hashlib.blake2s(b"cookie key").digest()
    nonce24 = bytes(range(24))
    cookie = bytes(range(16))
    sealed = crypto.xaead_encrypt(key, nonce24, cookie, b"mac1")
    assert len(sealed) == 32  # the cookie reply's encrypted_cookie field
    assert crypto.xaead_decrypt(key, nonce24, sealed, b"mac1") == cookie
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 0x80
        with pytest.raises(CryptoError):
            crypto.xaead_decrypt(key, nonce24, bytes(bad), b"mac1")
    other_nonce = bytes(23) + b"\x01"
    with pytest.raises(CryptoError):
        crypto.xaead_decrypt(key, other_nonce, sealed, b"mac1")
    with pytest.raises(CryptoError):
        crypto.xaead_decrypt(key, nonce24, sealed, b"mac2")
    with pytest.raises(CryptoError):
        crypto.xaead_decrypt(bytes(32), nonce24, sealed, b"mac1")


# --- TAI64N -------------------------------------------------------------------------


def _tai64n_parts(label: bytes) -> tuple[int, int]:
    assert len(label) == 12
    seconds, nanos = struct.unpack(">QI", label)
    return seconds, nanos


def test_tai64n_layout() -> None:
    seconds, nanos = _tai64n_parts(crypto.tai64n(1_700_000_000.0))
    assert seconds == 0x400000000000000A + 1_700_000_000  # 2^62 + 10 leap seconds
    assert nanos == 0
    seconds, nanos = _tai64n_parts(crypto.tai64n(0.0))
    assert seconds == 0x400000000000000A


def test_tai64n_whitened() -> None:
    base = 1_700_000_000
    for frac in (0.0, 0.001, 0.016, 0.017, 0.25, 0.5, 0.999999):
        _, nanos = _tai64n_parts(crypto.tai64n(base + frac))
        assert nanos % TAI64N_WHITENING_NS == 0
        assert nanos <= frac * 1e9 + 1000  # rounded down, never up
        assert frac * 1e9 - nanos < TAI64N_WHITENING_NS + 1000
    # Two instants closer than the whitening step cannot be told apart.
    assert crypto.tai64n(base + 0.001) == crypto.tai64n(base + 0.002)


def test_tai64n_monotonic() -> None:
    times = [1_600_000_000 + i * 0.0037 for i in range(2000)] + [1_600_000_100.0, 2.0e9]
    labels = [crypto.tai64n(t) for t in times]
    assert labels == sorted(labels)  # bytes compare as the timestamps do
    # And it does move forward at the whitening resolution.
    assert crypto.tai64n(1_600_000_000.0) < crypto.tai64n(1_600_000_000.02)
    assert crypto.tai64n(1_600_000_000.99) < crypto.tai64n(1_600_000_001.0)


# --- X25519 -------------------------------------------------------------------------


def test_dh_agrees_both_ways() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    shared = crypto.dh(a, crypto.dh_public(b))
    assert shared == crypto.dh(b, crypto.dh_public(a))
    assert len(shared) == 32


def test_dh_rfc7748_vector() -> None:
    # RFC 7748 section 6.1.
    alice = X25519PrivateKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert crypto.dh_public(alice).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert crypto.dh(alice, bob_public).hex() == (
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


@pytest.mark.parametrize(
    "low_order",
    [
        bytes(32),  # zero
        b"\x01" + bytes(31),  # one
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ],
)
def test_dh_refuses_low_order_points(low_order: bytes) -> None:
    with pytest.raises(CryptoError):
        crypto.dh(X25519PrivateKey.generate(), low_order)
