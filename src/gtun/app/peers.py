"""`gtun peer add`: a stock WireGuard peer for a relay, as a wg-quick configuration."""

from __future__ import annotations

import re
import socket
import time

from gtun.app.config import ServerConfig
from gtun.app.control import query
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.peerset import collect_peers, open_state
from gtun.app.store import Store, StoredPeer
from gtun.errors import ConfigError, GtunError, RuntimeFailure

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def guess_endpoint(cfg: ServerConfig, override: tuple[str, int] | None) -> tuple[str, int]:
    """The address stock peers should dial: --endpoint, the config's `endpoint`, the
    listen address when it is a specific one, else the address of the interface that
    holds this host's default route (asked of the kernel; no packet is sent)."""
    if override is not None:
        return override
    if cfg.endpoint is not None:
        return cfg.endpoint
    host, port = cfg.listen
    if host not in ("0.0.0.0", "::", ""):
        return host, port
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects a route, sends nothing
        guessed = str(s.getsockname()[0])
    except OSError:
        guessed = ""
    finally:
        s.close()
    if not guessed or guessed.startswith("127."):
        raise ConfigError(
            "cannot tell which address peers should dial: pass --endpoint HOST:PORT "
            "or set endpoint in [server]",
            file=cfg.path,
            key="server.endpoint",
        )
    return guessed, port


def add_peer(
    cfg: ServerConfig, name: str, endpoint: tuple[str, int] | None
) -> tuple[str, str | None]:
    """Store a new peer, lease its address, and return (wg-quick text, reload note).

    Raises ConfigError (bad name, name or key taken) or RuntimeFailure (state store)."""
    if cfg.mode == "tap":
        raise ConfigError(
            "this relay runs in tap mode (layer 2): stock WireGuard peers carry only IP "
            "packets and cannot join; connect with a gtun client instead",
            file=cfg.path,
            key="server.mode",
        )
    if not NAME_RE.match(name):
        raise ConfigError(f"peer name {name!r} must match [A-Za-z0-9_.-]{{1,32}}")
    if any(p.name == name for p in cfg.peers):
        raise ConfigError(f"a peer named {name} is already in the config", file=cfg.path)
    dial = guess_endpoint(cfg, endpoint)
    private = generate_private_key()
    pub = encode_key(public_key(private))
    store: Store = open_state(cfg)
    try:
        if any(p.name == name for p in store.peers()):
            raise ConfigError(
                f"a peer named {name} was already added (in {store.path})", file=cfg.path
            )
        store.add_peer(StoredPeer(name=name, public_key=pub))
        specs = collect_peers(cfg, store)
        spec = next((s for s in specs if s.name == name), None)
        if spec is None:  # the pool is full: refused, so not kept
            store.remove_peer(name)
            raise RuntimeFailure(
                f"no free address left in {cfg.network} for peer {name}; it was not added"
            )
    finally:
        store.close()
    allowed = [str(cfg.network)] + ([str(cfg.network6)] if cfg.network6 else [])
    allowed += [str(r) for r in cfg.routes]
    allowed += [str(n) for s in specs if s.name != name for n in s.subnets]
    host, port = dial
    host_text = f"[{host}]" if ":" in host else host
    lines = [
        f"# gtun peer {name}, added {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "[Interface]",
        f"PrivateKey = {encode_key(private)}",
        f"Address = {spec.address}/{cfg.network.prefixlen}"
        + (f", {spec.address6}/{cfg.network6.prefixlen}" if cfg.network6 and spec.address6 else ""),
    ]
    if cfg.dns:
        lines.append(f"DNS = {', '.join(str(d) for d in cfg.dns)}")
    lines.append(f"MTU = {cfg.mtu}")
    lines += [
        "",
        "[Peer]",
        f"PublicKey = {encode_key(cfg.public_key)}",
        f"Endpoint = {host_text}:{port}",
        f"AllowedIPs = {', '.join(dict.fromkeys(allowed))}",
        "PersistentKeepalive = 25",
        "",
    ]
    return "\n".join(lines), _tell_relay(cfg, "the peer")


def _tell_relay(cfg: ServerConfig, what: str) -> str:
    """Ask this config's running relay to reload; what to tell the user.  With a shared
    store every relay heard the change already (NOTIFY); the local reload is harmless."""
    shared = " (and every relay of the store heard of it)" if cfg.store else ""
    try:
        answer = query(cfg.control_socket, {"command": "reload"}, timeout=5.0)
    except GtunError:
        return f"the relay is not running; it will pick {what} up when it starts{shared}"
    if answer.get("ok"):
        return f"the running relay picked {what} up{shared}"
    return f"the running relay could not reload: {answer.get('error')}{shared}"


def _stored_only(cfg: ServerConfig, name: str) -> None:
    if any(p.name == name for p in cfg.peers):
        raise ConfigError(
            f"peer {name} is in the config file's [[peers]]; change it there", file=cfg.path
        )


def remove_peer(cfg: ServerConfig, name: str) -> str:
    """Forget a peer `gtun peer add` stored, and its lease; the note for the user.
    Raises ConfigError (a config peer, or no such peer) or RuntimeFailure (store)."""
    _stored_only(cfg, name)
    store = open_state(cfg)
    try:
        if not store.remove_peer(name):
            raise ConfigError(f"no stored peer named {name}", file=store.path)
    finally:
        store.close()
    return _tell_relay(cfg, "the change")


def set_peer_enabled(cfg: ServerConfig, name: str, enabled: bool) -> str:
    """Enable or disable a stored peer (a disabled one keeps its address but is not
    served); the note for the user.  Raises ConfigError or RuntimeFailure."""
    _stored_only(cfg, name)
    store = open_state(cfg)
    try:
        if not store.set_enabled(name, enabled):
            raise ConfigError(f"no stored peer named {name}", file=store.path)
    finally:
        store.close()
    return _tell_relay(cfg, "the change")


def list_peers(cfg: ServerConfig) -> list[tuple[str, str, str, str]]:
    """Every peer as (name, address, where it is kept and whether it is served,
    public key): the config's, then the stored ones, with their leased addresses."""
    store = open_state(cfg)
    try:
        stored, leases = store.peers(), store.leases()
    finally:
        store.close()
    rows = []
    for p in cfg.peers:
        key = encode_key(p.public_key)
        rows.append((p.name, str(p.address or leases.get(key, "-")), "config", key))
    for sp in stored:
        address = sp.address or leases.get(sp.public_key, "-")
        rows.append(
            (sp.name, address, "stored" if sp.enabled else "stored, disabled", sp.public_key)
        )
    return rows
