#!/usr/bin/env python3
"""Fuzz the configuration files (gtun.app.config.load_server_config and
load_client_config) with fuzzed TOML text written to a temporary file.

The key files the configurations may name exist (mode 0600), so the fuzzer gets past
them to the checks of every other key.

Oracle: only ConfigError escapes, and it names the file; a file that loads is loaded
the same way twice (no state kept between loads)."""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import tempfile
from pathlib import Path

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.app.config import load_client_config, load_server_config
    from gtun.errors import ConfigError

import oracles
from common import main

DIR = Path(tempfile.mkdtemp(prefix="gtun-fuzz-config-"))
atexit.register(shutil.rmtree, DIR, True)
for name in ("server.key", "client.key"):
    key = DIR / name
    key.write_text(base64.b64encode(bytes(range(32))).decode() + "\n")
    os.chmod(key, 0o600)
SERVER = DIR / "server.toml"
CLIENT = DIR / "client.toml"


def test_one(data: bytes) -> None:
    server = not data or data[0] & 1 == 0
    path = SERVER if server else CLIENT
    path.write_bytes(data[1:])
    load = load_server_config if server else load_client_config
    first = None
    try:
        first = load(path)
    except ConfigError as exc:
        oracles.check(str(path) in str(exc), f"ConfigError without the file: {exc}")
    if first is not None:
        oracles.check(load(path) == first, "two loads of one file differ")


if __name__ == "__main__":
    main(test_one)
