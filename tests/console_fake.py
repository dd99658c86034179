"""A fake relay for the web console's tests and bench/console.py: the console's host
(cfg, store, status(), reload()) without a device, sockets or a core.

FakeStore is the real SQLite state store (the file app/peers.py's functions open), with
a shared store's live rows and relay stats set by the test.  FakeHost.status() answers
as Server.status() does, from the config's and the store's peers with their leases, and
counters the test sets.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from gtun.app.config import ServerConfig, load_server_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.peerset import STATE_FILE, read_peers
from gtun.app.pgstore import LiveRow
from gtun.app.store import StateStore
from gtun.lab.net import write_key


class FakeStore(StateStore):
    """The relay's real SQLite state file (app/peers.py's functions open the same file,
    so that a peer the console adds is read back), with what only a shared PostgreSQL
    store has, the other relays' live sessions and stats, set by the test."""

    def __init__(self, cfg: ServerConfig) -> None:
        super().__init__(cfg.state_dir / STATE_FILE)
        self.cfg = cfg
        self.live_rows: dict[str, LiveRow] = {}
        self.stats: list[tuple[str, str, str | None, float | None, dict[str, Any]]] = []

    def live(self) -> dict[str, LiveRow]:
        return dict(self.live_rows)

    def relay_stats(self) -> list[tuple[str, str, str | None, float | None, dict[str, Any]]]:
        return list(self.stats)


class FakeHost:
    """What the console needs of the relay: cfg, store, status(), reload()."""

    def __init__(self, cfg: ServerConfig, store: FakeStore, relay_name: str | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.relay_name = relay_name
        self.reloads = 0
        # name -> counters and session facts as the relay core would have them
        self.traffic: dict[str, dict[str, Any]] = {}
        self.status_calls = 0

    async def reload(self) -> dict[str, Any]:
        self.reloads += 1
        return {"ok": True, "added": [], "removed": []}

    async def status(self) -> dict[str, Any]:
        self.status_calls += 1
        specs = read_peers(self.cfg, self.store).specs
        peers = []
        for spec in sorted(specs, key=lambda s: s.name):
            t = self.traffic.get(spec.name, {})
            peers.append(
                {
                    "name": spec.name,
                    "public_key": encode_key(spec.public_key),
                    "address": str(spec.address),
                    "address6": None,
                    "subnets": [],
                    "endpoint": t.get("endpoint"),
                    "transport": t.get("transport"),
                    "kind": t.get("kind", "wireguard"),
                    "path_mtu": None,
                    "relay": t.get("relay"),
                    "rx_bytes": t.get("rx_bytes", 0),
                    "tx_bytes": t.get("tx_bytes", 0),
                    "rx_packets": 0,
                    "tx_packets": 0,
                    "last_handshake": t.get("last_handshake"),
                    "drops": dict(t.get("drops", {})),
                }
            )
        cfg = self.cfg
        return {
            "role": "relay",
            "device": cfg.device,
            "mode": cfg.mode,
            "address": f"{cfg.relay_address}/{cfg.network.prefixlen}",
            "address6": None,
            "listen": f"{cfg.listen[0]}:{cfg.listen[1]}",
            "public_key": encode_key(cfg.public_key),
            "uptime": 12.0,
            "peers": peers,
            "workers": [{"worker": 0, "pid": 1, "alive": True}],
            "tcp_connections": 0,
            "refused_peers": [],
            "relay_name": self.relay_name,
            "mesh": [],
            "drops": {"unknown_key": 3},
            "datapath": None,
        }


def write_config(tmp: Path, *, config_peers: int = 1, extra: str = "") -> Path:
    """A relay's server.toml under `tmp` with `config_peers` [[peers]]."""
    write_key(tmp / "server.key", generate_private_key())
    lines = [
        "[server]",
        'listen = "127.0.0.1:9621"',
        'private_key_file = "server.key"',
        'network = "10.66.0.0/16"',
        'endpoint = "203.0.113.5:9621"',
        f'state_dir = "{tmp / "state"}"',
        f'control_socket = "{tmp / "server.sock"}"',
        extra,
    ]
    for i in range(config_peers):
        key = encode_key(public_key(generate_private_key()))
        lines += ["[[peers]]", f'name = "cfg{i}"', f'public_key = "{key}"']
    path = tmp / "server.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fake_relay(tmp: Path, **kwargs: Any) -> FakeHost:
    cfg = load_server_config(write_config(tmp, **kwargs))
    cfg = dataclasses.replace(cfg, console_listen=("127.0.0.1", 0))
    return FakeHost(cfg, FakeStore(cfg))


def now() -> float:
    return time.time()
