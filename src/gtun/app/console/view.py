"""What the console's JSON API answers, built from what the relay and the store say:
the peers of the whole network as rows (`peer_rows`), their rates now (`Rates`),
and the relays (`relay_rows`).  Pure functions and small bounded state, no I/O: the
console (web.py) reads the relay's status and the store and calls these, off the
event loop where the work is large.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from typing import Any, Protocol

from gtun.core.wg.constants import REJECT_AFTER_TIME

# Online: a handshake younger than REJECT_AFTER_TIME, as `gtun_peer_connected` counts
# (app/metrics.py): past it no session of the peer can carry data.
ONLINE_WITHIN = REJECT_AFTER_TIME
KEEP_SAMPLES = 2  # counter samples per peer kept for its rate


class ConsoleStore(Protocol):
    """What the console reads and writes in the relay's store (app/store.py's Store;
    live() and relay_stats() only when a shared store is configured)."""

    def peers(self) -> list[Any]: ...
    def leases(self) -> dict[str, str]: ...
    def traffic(
        self, public_key: str, period: str, since: float
    ) -> list[tuple[float, int, int]]: ...
    def totals(self, period: str, start: float) -> dict[str, tuple[int, int]]: ...
    def sources(self, public_key: str) -> list[Any]: ...
    def get_setting(self, name: str) -> str | None: ...
    def set_setting(self, name: str, value: str) -> None: ...
    def live(self) -> dict[str, Any]: ...
    def relay_stats(self) -> list[tuple[str, str, str | None, float | None, dict[str, Any]]]: ...


class Rates:
    """Bytes per second of each peer from its last KEEP_SAMPLES counter samples, keyed
    by public key; a peer no longer sampled is forgotten at the next sample."""

    def __init__(self) -> None:
        self._samples: dict[str, list[tuple[float, int, int]]] = {}

    def add(self, t: float, counters: Iterable[tuple[str, int, int]]) -> None:
        seen: dict[str, list[tuple[float, int, int]]] = {}
        for key, rx, tx in counters:
            old = self._samples.get(key, [])
            if old and old[-1][0] == t:
                seen[key] = old
                continue
            seen[key] = [*old[-(KEEP_SAMPLES - 1) :], (t, rx, tx)]
        self._samples = seen

    def rate(self, key: str) -> tuple[float, float]:
        """(in, out) bytes/s; 0 without two samples or after a counter went down."""
        s = self._samples.get(key)
        if not s or len(s) < 2:
            return 0.0, 0.0
        (t0, rx0, tx0), (t1, rx1, tx1) = s[0], s[-1]
        dt = t1 - t0
        if dt <= 0:
            return 0.0, 0.0
        return max(0, rx1 - rx0) / dt, max(0, tx1 - tx0) / dt


def _source(name: str, key: str, config_names: set[str], stored: Any | None) -> str:
    if name in config_names:
        return "config"
    if stored is not None and stored.source is not None:
        return f"config of relay {stored.source}"
    return "stored"


def peer_rows(
    status: dict[str, Any],
    config_names: set[str],
    stored: list[Any],
    leases: dict[str, str],
    live: dict[str, Any],
    today: dict[str, tuple[int, int]],
    month: dict[str, tuple[int, int]],
    rates: Rates,
    live_rates: Rates,
    now: float,
) -> list[dict[str, Any]]:
    """Every peer of the network as a PeerRow (the API's, README), sorted by name:
    those this relay serves (its status), with counters from the relay holding the
    session (`live`, a shared store's rows by key) when another does, and the stored
    peers it does not serve (disabled)."""
    here = status.get("relay_name") or "this relay"
    by_name = {p.name: p for p in stored}
    rows: dict[str, dict[str, Any]] = {}
    for p in status.get("peers", []):
        name, key = p["name"], p["public_key"]
        sp = by_name.get(name)
        holder = p.get("relay")
        row = {
            "name": name,
            "public_key": key,
            "address": p.get("address"),
            "address6": p.get("address6"),
            "kind": p.get("kind"),
            "source": _source(name, key, config_names, sp),
            "enabled": True,
            "disabled_reason": None,
            "relay": here,
            "endpoint": p.get("endpoint"),
            "transport": p.get("transport"),
            "last_handshake": p.get("last_handshake"),
            "rx_bytes": p.get("rx_bytes", 0),
            "tx_bytes": p.get("tx_bytes", 0),
        }
        rate_in, rate_out = rates.rate(key)
        lr = live.get(key) if holder is not None else None
        if holder is not None or p.get("last_handshake") is None:
            row["kind"] = None  # unknown: it never made a session here
        if holder is not None:
            row["relay"] = holder
            row["endpoint"] = row["transport"] = row["last_handshake"] = None
            row["rx_bytes"] = row["tx_bytes"] = 0
            rate_in = rate_out = 0.0
        if lr is not None:
            row["endpoint"], row["transport"] = lr.endpoint, lr.transport
            row["last_handshake"] = lr.last_handshake
            row["rx_bytes"], row["tx_bytes"] = lr.rx_bytes, lr.tx_bytes
            rate_in, rate_out = live_rates.rate(key)
        row["rate_in"], row["rate_out"] = round(rate_in, 1), round(rate_out, 1)
        rows[name] = row
    for sp in stored:
        if sp.name in rows:
            continue
        rows[sp.name] = {
            "name": sp.name,
            "public_key": sp.public_key,
            "address": sp.address or leases.get(sp.public_key),
            "address6": None,
            "kind": None,
            "source": _source(sp.name, sp.public_key, config_names, sp),
            "enabled": bool(sp.enabled),
            "disabled_reason": None if sp.enabled else (sp.disabled_reason or "admin"),
            "relay": None,
            "endpoint": None,
            "transport": None,
            "last_handshake": None,
            "rx_bytes": 0,
            "tx_bytes": 0,
            "rate_in": 0.0,
            "rate_out": 0.0,
        }
    out = []
    for name in sorted(rows):
        row = rows[name]
        key = row["public_key"]
        sp = by_name.get(name)
        hs = row["last_handshake"]
        row["online"] = bool(row["enabled"] and hs is not None and now - hs < ONLINE_WITHIN)
        t_rx, t_tx = today.get(key, (0, 0))
        m_rx, m_tx = month.get(key, (0, 0))
        row["today"] = {"rx": t_rx, "tx": t_tx}
        row["month"] = {"rx": m_rx, "tx": m_tx}
        row["quota"] = sp.quota if sp is not None else None
        out.append(row)
    return out


def as_dict(value: Any) -> dict[str, Any]:
    """A store's dataclass (Source, LiveRow) as a JSON object."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return dict(value)


def relay_rows(
    status: dict[str, Any],
    stats: list[tuple[str, str, str | None, float | None, dict[str, Any]]] | None,
    endpoint: str | None,
    now: float,
    own_name: str = "this relay",
) -> list[dict[str, Any]]:
    """The relays of the network: the store's rows (`stats`, a shared store), or this
    relay alone from its status, named `own_name` (its config file's stem) when it has
    no name in a mesh.  A relay is alive when its heartbeat is under 60 s."""
    here = status.get("relay_name")
    if stats is None:
        peers = status.get("peers", [])
        drops = status.get("drops") or {}
        recent = [
            p
            for p in peers
            if p.get("last_handshake") and now - p["last_handshake"] < ONLINE_WITHIN
        ]
        return [
            {
                "name": here or own_name,
                "public_key": status.get("public_key"),
                "endpoint": endpoint,
                "this": True,
                "alive": True,
                "seen_age": 0.0,
                "peers": len(peers),
                "rx_bytes": sum(p.get("rx_bytes", 0) for p in peers),
                "tx_bytes": sum(p.get("tx_bytes", 0) for p in peers),
                "handshakes": len(recent),
                "drops": sum(drops.values()),
                "store_up": True,
                "mesh": {},
            }
        ]
    rows = []
    for name, key, ep, age, st in stats:
        st = st or {}
        drops = st.get("drops", 0)
        rows.append(
            {
                "name": name,
                "public_key": key,
                "endpoint": ep,
                "this": name == here,
                "alive": age is not None and age < 60.0,
                "seen_age": age,
                "peers": st.get("peers", 0),
                "rx_bytes": st.get("rx_bytes", 0),
                "tx_bytes": st.get("tx_bytes", 0),
                "handshakes": st.get("handshakes", 0),
                "drops": sum(drops.values()) if isinstance(drops, dict) else drops,
                "store_up": st.get("store_up"),
                "mesh": st.get("mesh", {}),
            }
        )
    return sorted(rows, key=lambda r: (not r["this"], r["name"]))
