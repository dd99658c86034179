"""Curve25519 keys in the text form WireGuard uses (standard base64 of 32 bytes).

Keys made here work with `wg genkey` / `wg pubkey` and the other way round.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gtun.errors import ConfigError

KEY_LEN = 32  # Curve25519 scalars and points (RFC 7748)
ENCODED_KEY_LEN = 44  # base64 of 32 bytes, one '=' of padding

# A private key file larger than this is certainly not a key; refuse before reading it whole.
_MAX_KEY_FILE_SIZE = 4096


def _clamp(raw: bytes) -> bytes:
    """Clamp a scalar the way RFC 7748 section 5 and `wg genkey` do."""
    k = bytearray(raw)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return bytes(k)


def generate_private_key() -> bytes:
    """Return a new private key: 32 random bytes, clamped exactly as `wg genkey` clamps."""
    return _clamp(secrets.token_bytes(KEY_LEN))


def public_key(private: bytes) -> bytes:
    """Return the X25519 public key of `private` (32 bytes).

    Raises ValueError if `private` is not 32 bytes long.
    """
    if len(private) != KEY_LEN:
        raise ValueError(f"a private key is {KEY_LEN} bytes, not {len(private)}")
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def encode_key(key: bytes) -> str:
    """Return the 44-character standard base64 text of a 32-byte key.

    Raises ValueError if `key` is not 32 bytes long.
    """
    if len(key) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, not {len(key)}")
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str, *, file: str | Path | None = None, key: str | None = None) -> bytes:
    """Decode the base64 text of a key (surrounding whitespace ignored) into 32 bytes.

    Raises ConfigError("malformed key: ...") naming `file` and `key` when the text is
    not base64 or does not decode to exactly 32 bytes.  The text itself is never echoed
    because it may be a private key.
    """
    stripped = text.strip()
    if not stripped:
        raise ConfigError("malformed key: it is empty", file=file, key=key)
    try:
        raw = base64.b64decode(stripped.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ConfigError(
            "malformed key: not valid base64 (expected 44 characters as printed by "
            "`gtun genkey` or `wg genkey`)",
            file=file,
            key=key,
        ) from None
    if len(raw) != KEY_LEN:
        raise ConfigError(
            f"malformed key: decodes to {len(raw)} bytes, expected {KEY_LEN}",
            file=file,
            key=key,
        )
    return raw


def generate_preshared_key() -> bytes:
    """Return a new preshared key: 32 random bytes, as `wg genpsk` makes."""
    return secrets.token_bytes(KEY_LEN)


def read_private_key_file(
    path: Path,
    *,
    config_file: str | Path | None = None,
    key: str = "private_key_file",
    make: str = "gtun genkey",
) -> bytes:
    """Read a private key file written by `gtun genkey` or `wg genkey` (or a
    preshared key file, by `gtun genpsk` or `wg genpsk`: `make` is the command the
    message for a missing file suggests).

    Raises ConfigError, naming `config_file`, `key` and the key file's path, when the
    file is missing, not a regular file, unreadable, readable or writable by group or
    others (mode wider than 0600), or does not hold one base64 key.
    """

    def fail(message: str) -> ConfigError:
        return ConfigError(message, file=config_file, key=key)

    try:
        # Opened first and checked through the descriptor so that the file checked is
        # the file read, even if someone swaps it in between.  O_NONBLOCK keeps a FIFO
        # put in place of the key from hanging us; the S_ISREG check then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise fail(f"key file {path} does not exist; create one with: {make}") from None
    except PermissionError:
        raise fail(f"key file {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise fail(f"key file {path} cannot be opened: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            if mode & 0o044:
                what = "readable"
            elif mode & 0o022:
                what = "writable"
            else:
                what = "accessible"
            raise fail(
                f"key file {path} is {what} by others (mode {mode:04o}); run: chmod 600 {path}"
            )
        if st.st_size > _MAX_KEY_FILE_SIZE:
            raise fail(f"key file {path} is too large to be a key ({st.st_size} bytes)")
        try:
            data = os.read(fd, _MAX_KEY_FILE_SIZE + 1)
        except OSError as exc:
            raise fail(f"key file {path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise fail(f"malformed key in key file {path}: not base64 text") from None
    try:
        return decode_key(text)
    except ConfigError as exc:
        raise fail(f"{exc.message} in key file {path}") from None
