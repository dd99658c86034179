"""The relays a client learnt, kept in its state directory (app/relays.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from gtun.app.relays import load_relays, relays_file, save_relays, udp_endpoint
from gtun.core.client import KnownRelay


def test_relays_survive_a_restart(tmp_path: Path) -> None:
    path = relays_file(tmp_path / "state", Path("/etc/gtun/alice.toml"))
    assert load_relays(path) == []  # no file yet
    relays = (
        KnownRelay("b", b"\x11" * 32, "192.0.2.2:9621"),
        KnownRelay("c", b"\x22" * 32, "[2001:db8::3]:9621"),
    )
    save_relays(path, relays)
    assert path.name == "relays-alice.json" and path.stat().st_mode & 0o777 == 0o600
    assert load_relays(path) == list(relays)
    assert not path.with_name(path.name + ".tmp").exists()


def test_bad_files_and_entries_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "relays.json"
    path.write_text("not json")
    assert load_relays(path) == []
    good = {"name": "b", "key": base64.b64encode(b"\x11" * 32).decode(), "endpoint": "h:1"}
    bad = [
        7,
        {"name": "x", "key": base64.b64encode(bytes(32)).decode(), "endpoint": "h:1"},  # low order
        {"name": "x", "key": "@@", "endpoint": "h:1"},
        {"name": "x", "key": good["key"], "endpoint": ""},
    ]
    path.write_text(json.dumps({"version": 1, "relays": [*bad, good]}))
    assert load_relays(path) == [KnownRelay("b", b"\x11" * 32, "h:1")]


def test_udp_endpoint_takes_literals_of_the_socket_family() -> None:
    assert udp_endpoint("192.0.2.2:9621", False) == ("192.0.2.2", 9621)
    assert udp_endpoint("[2001:db8::3]:9621", True) == ("2001:db8::3", 9621)
    assert udp_endpoint("[2001:db8::3]:9621", False) is None
    assert udp_endpoint("relay.example.com:9621", False) is None
    assert udp_endpoint("192.0.2.2:99999", False) is None
