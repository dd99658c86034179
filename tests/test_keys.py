from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gtun.app import keys
from gtun.errors import ConfigError

# RFC 7748 section 6.1: Alice's X25519 key pair.
RFC_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")

WG = shutil.which("wg")
needs_wg = pytest.mark.skipif(WG is None, reason="wireguard-tools (wg) not installed")


def _wg(*args: str, stdin: str) -> str:
    assert WG is not None
    done = subprocess.run(
        [WG, *args], input=stdin, capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout.strip()


def test_generated_key_is_clamped_and_random() -> None:
    seen = set()
    for _ in range(64):
        k = keys.generate_private_key()
        assert len(k) == 32
        assert k[0] & 7 == 0
        assert k[31] & 0x80 == 0
        assert k[31] & 0x40 == 0x40
        seen.add(k)
    assert len(seen) == 64


def test_public_key_matches_rfc7748_vector() -> None:
    assert keys.public_key(RFC_PRIVATE) == RFC_PUBLIC


def test_public_key_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        keys.public_key(b"\x01" * 31)


def test_encode_decode_round_trip() -> None:
    k = keys.generate_private_key()
    text = keys.encode_key(k)
    assert len(text) == 44
    assert text == base64.b64encode(k).decode()
    assert keys.decode_key(text) == k
    assert keys.decode_key(f"  {text}\n") == k


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "not base64 at all!",
        base64.b64encode(b"\x00" * 31).decode(),
        base64.b64encode(b"\x00" * 33).decode(),
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),
        "é" * 44,
    ],
)
def test_decode_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        keys.decode_key(text, file="c.toml", key="client.server_public_key")
    message = str(info.value)
    assert "malformed key" in message
    assert message.startswith("c.toml: client.server_public_key: ")


def _write_key(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_read_private_key_file(tmp_path: Path) -> None:
    k = keys.generate_private_key()
    path = _write_key(tmp_path / "a.key", keys.encode_key(k) + "\n")
    assert keys.read_private_key_file(path) == k
    os.chmod(path, 0o400)
    assert keys.read_private_key_file(path) == k


def test_key_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(ConfigError) as info:
        keys.read_private_key_file(path, config_file="s.toml", key="server.private_key_file")
    message = str(info.value)
    assert str(path) in message
    assert "does not exist" in message
    assert message.startswith("s.toml: server.private_key_file: ")


@pytest.mark.parametrize(
    ("mode", "word"), [(0o644, "readable"), (0o640, "readable"), (0o620, "writable")]
)
def test_key_file_too_open(tmp_path: Path, mode: int, word: str) -> None:
    path = _write_key(tmp_path / "a.key", keys.encode_key(keys.generate_private_key()), mode)
    with pytest.raises(ConfigError) as info:
        keys.read_private_key_file(path)
    message = str(info.value)
    assert f"key file {path} is {word} by others (mode 0{mode:o}); run: chmod 600 {path}" in message


def test_key_file_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any file, so the permission error is injected rather than made by chmod.
    path = _write_key(tmp_path / "a.key", keys.encode_key(keys.generate_private_key()))

    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(keys.os, "open", deny)
    with pytest.raises(ConfigError) as info:
        keys.read_private_key_file(path)
    assert f"key file {path} is not readable" in str(info.value)


def test_key_file_is_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        keys.read_private_key_file(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", [b"garbage\n", b"", b"\xff\xfe\x00", b"A" * 10000])
def test_key_file_malformed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "a.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        keys.read_private_key_file(path, config_file="s.toml", key="server.private_key_file")
    message = str(info.value)
    assert str(path) in message
    assert message.startswith("s.toml: server.private_key_file: ")


@needs_wg
def test_wg_keys_work_here() -> None:
    private_text = _wg("genkey", stdin="")
    public_text = _wg("pubkey", stdin=private_text + "\n")
    private = keys.decode_key(private_text)
    assert keys.encode_key(keys.public_key(private)) == public_text


@needs_wg
def test_our_keys_work_in_wg() -> None:
    private = keys.generate_private_key()
    public_text = _wg("pubkey", stdin=keys.encode_key(private) + "\n")
    assert public_text == keys.encode_key(keys.public_key(private))


@needs_wg
def test_wg_pubkey_of_rfc_vector() -> None:
    # wg clamps the scalar before use; the RFC vector is already a valid scalar once clamped.
    assert _wg("pubkey", stdin=keys.encode_key(RFC_PRIVATE)) == keys.encode_key(RFC_PUBLIC)
