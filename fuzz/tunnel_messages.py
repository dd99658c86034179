#!/usr/bin/env python3
"""Fuzz gtun's in-tunnel messages (gtun.core.tunnel): pull_message, parse_pushed_config
and parse_config_request.

Input: raw bytes, or a message header around fuzzed JSON text, or a payload built from
fuzzed JSON values under the keys the parsers read.

Oracle: pull_message and parse_pushed_config raise nothing but TunnelMessageError;
parse_config_request never raises; a configuration that parses survives push_config
and parses back to itself."""

from __future__ import annotations

import json
from typing import Any

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.core import tunnel as tm

import oracles
from common import main

KEYS = ["name", "address", "prefix", "network", "gateway", "routes", "mtu", "dns", "mode"]
KEYS += ["bulk", "csum", "address6", "prefix6", "gateway6"]
GOOD = {
    "name": "c1",
    "address": "10.66.0.2",
    "prefix": 24,
    "network": "10.66.0.0/24",
    "gateway": "10.66.0.1",
    "routes": ["192.168.77.0/24"],
    "mtu": 1420,
    "dns": ["10.66.0.1"],
    "mode": "tun",
    "address6": "fd66::2",
    "prefix6": 64,
    "gateway6": "fd66::1",
}


def value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 2 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(4)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 5:
        return fdp.PickValueInList(list(GOOD.values()))
    if kind == 6:
        return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {k: value(fdp, depth + 1) for k in fdp.ConsumeBytes(2).decode("latin-1")}


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 2)
    if kind == 2:
        payload = dict(GOOD)
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            key = fdp.PickValueInList(KEYS)
            if fdp.ConsumeIntInRange(0, 3) == 0:
                payload.pop(key, None)
            else:
                payload[key] = value(fdp)
        msg_type = fdp.PickValueInList(sorted(tm.TYPES))
        body = json.dumps(payload).encode()
        plaintext = tm.HEADER.pack(tm.MAGIC, msg_type, len(body)) + body
    elif kind == 1:
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        plaintext = tm.HEADER.pack(tm.MAGIC, fdp.ConsumeIntInRange(0, 6), len(body)) + body
    else:
        plaintext = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
    plaintext += bytes(fdp.ConsumeIntInRange(0, 15))
    msg = None
    with oracles.only(tm.TunnelMessageError):
        msg = tm.pull_message(plaintext)
    if msg is None:
        return
    with oracles.only():
        tm.parse_config_request(msg.payload)
    config = None
    with oracles.only(tm.TunnelMessageError):
        config = tm.parse_pushed_config(msg.payload)
    if config is None:
        return
    pushed = None
    with oracles.only(tm.LocalProtocolError):  # re-encoded larger (\u escapes): too big
        pushed = tm.push_config(config)
    if pushed is None:
        return
    again = tm.parse_pushed_config(tm.pull_message(pushed).payload)
    oracles.check(again == config, f"{config} does not round-trip")


if __name__ == "__main__":
    main(test_one)
