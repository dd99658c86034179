"""A fake relay for the web console's tests and bench/console.py: the console's host
(cfg, store, status(), reload()) without a device, sockets or a core.

FakeStore keeps the peers and leases in a real SQLite state file (the one app/peers.py's
functions open, so that a peer the console adds is read back), and implements the rest
of the plan's store methods (traffic, totals, sources, quota, settings, live,
relay_stats) in memory.  FakeHost.status() answers as Server.status() does, from the
config's and the store's peers with their leases, and counters the test sets.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtun.app import peers as peers_module
from gtun.app.config import ServerConfig, load_server_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.peerset import STATE_FILE, read_peers
from gtun.app.store import StateStore
from gtun.errors import ConfigError
from gtun.lab.net import write_key


@dataclass(frozen=True)
class FakeSource:
    endpoint: str
    transport: str
    relay: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class FakeLive:
    public_key: str
    relay: str
    endpoint: str | None
    transport: str | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    updated: float


@dataclass(frozen=True)
class FakePeer:
    name: str
    public_key: str
    address: str | None = None
    subnets: tuple[str, ...] = ()
    enabled: bool = True
    source: str | None = None
    preshared_key: str | None = None
    quota: int | None = None
    disabled_reason: str | None = None


class FakeStore:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.real = StateStore(cfg.state_dir / STATE_FILE)
        self.path = self.real.path
        self.settings: dict[str, str] = {}
        self.quotas: dict[str, int | None] = {}
        self.reasons: dict[str, str | None] = {}
        self.history: dict[tuple[str, str], list[tuple[float, int, int]]] = {}
        self.period_totals: dict[str, dict[str, tuple[int, int]]] = {"day": {}, "month": {}}
        self.source_rows: dict[str, list[FakeSource]] = {}
        self.live_rows: dict[str, FakeLive] = {}
        self.stats: list[tuple[str, str, str | None, float | None, dict[str, Any]]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    # the real part (app/peers.py writes the same file)
    def peers(self) -> list[FakePeer]:
        out = []
        for sp in self.real.peers():
            fields = {f.name: getattr(sp, f.name) for f in dataclasses.fields(sp)}
            # What a test set here, over what the state file says (or lacks)
            if fields.get("quota") is None:
                fields["quota"] = self.quotas.get(sp.name)
            if fields.get("disabled_reason") is None:
                fields["disabled_reason"] = self.reasons.get(sp.name)
            out.append(FakePeer(**fields))
        return out

    def leases(self) -> dict[str, str]:
        return self.real.leases()

    def set_enabled(self, name: str, enabled: bool, reason: str | None = None) -> bool:
        self.calls.append(("set_enabled", (name, enabled, reason)))
        self.reasons[name] = None if enabled else reason
        return self.real.set_enabled(name, enabled)

    def set_quota(self, name: str, quota: int | None) -> bool:
        self.calls.append(("set_quota", (name, quota)))
        if not any(p.name == name for p in self.real.peers()):
            return False
        self.quotas[name] = quota
        return True

    # the plan's additions, in memory
    def traffic(self, public_key: str, period: str, since: float) -> list[tuple[float, int, int]]:
        return [b for b in self.history.get((public_key, period), []) if b[0] >= since]

    def totals(self, period: str, start: float) -> dict[str, tuple[int, int]]:
        return dict(self.period_totals.get(period, {}))

    def sources(self, public_key: str) -> list[FakeSource]:
        return sorted(self.source_rows.get(public_key, []), key=lambda s: -s.last_seen)

    def get_setting(self, name: str) -> str | None:
        return self.settings.get(name)

    def set_setting(self, name: str, value: str) -> None:
        self.settings[name] = value

    def live(self) -> dict[str, FakeLive]:
        return dict(self.live_rows)

    def relay_stats(self) -> list[tuple[str, str, str | None, float | None, dict[str, Any]]]:
        return list(self.stats)

    def close(self) -> None:
        self.real.close()


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
        specs = read_peers(self.cfg, self.store.real).specs
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


def bridge_peers_api(monkeypatch: Any, store: FakeStore) -> None:
    """Until app/peers.py's functions take `tell=` and set_peer_quota exists (issue 15's
    other half), stand in for them: the same calls, without telling a relay."""
    if "tell" not in inspect.signature(peers_module.add_peer).parameters:
        for name in ("add_peer", "remove_peer", "set_peer_enabled"):
            original = getattr(peers_module, name)

            def bridged(*args: Any, _f: Any = original, tell: bool = True, **kw: Any) -> Any:
                assert tell is False  # the console reloads the relay itself
                return _f(*args, **kw)

            monkeypatch.setattr(peers_module, name, bridged)
        monkeypatch.setattr(peers_module, "_tell_relay", lambda cfg, what: "")
    if not hasattr(peers_module, "set_peer_quota"):

        def set_peer_quota(
            cfg: ServerConfig, name: str, quota: int | None, *, tell: bool = True
        ) -> str:
            assert tell is False
            if any(p.name == name for p in cfg.peers):
                raise ConfigError(f"peer {name} is in the config file's [[peers]]")
            if not store.set_quota(name, quota):
                raise ConfigError(f"no stored peer named {name}")
            return ""

        monkeypatch.setattr(peers_module, "set_peer_quota", set_peer_quota, raising=False)


def now() -> float:
    return time.time()
