"""`gtun peer add`: a stock WireGuard peer for a relay, as a wg-quick configuration; and
`gtun peer list|remove|disable|enable|quota`.

Each change is written to the store and then, unless `tell=False`, the running relay is
asked to reload over its control socket (the console, inside the relay, passes
tell=False and reloads it directly).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from gtun.app.config import ServerConfig
from gtun.app.control import query
from gtun.app.keys import encode_key, generate_preshared_key, generate_private_key, public_key
from gtun.app.peerset import collect_peers, open_state
from gtun.app.store import Store, StoredPeer
from gtun.core.relay import PeerSpec
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


@dataclass(frozen=True)
class DialedRelay:
    """The relay a stock peer's [Peer] names: its key, the address it is dialed at, and
    the routes the peer reaches through it."""

    public_key: str
    endpoint: tuple[str, int]
    routes: tuple[str, ...]


def store_relay(
    cfg: ServerConfig, store: Store, name: str, override: tuple[str, int] | None
) -> DialedRelay:
    """Relay `name` of the shared store's relays table (a relay's name is its config
    file's stem), dialed at `override` or at the endpoint it registered.  Every relay of
    the mesh pushes every relay's routes, so the routes are all of them.

    Raises ConfigError: no shared store, no relay of that name (the known ones listed),
    or no usable endpoint for it (pointing at --endpoint)."""
    from gtun.app.pgstore import PgStore

    if not isinstance(store, PgStore):
        raise _no_shared_store(cfg)
    rows = store.relay_rows()
    row = next((r for r in rows if r[1] == name), None)
    if row is None:
        known = ", ".join(r[1] for r in rows) or "none yet (a relay registers when it starts)"
        raise ConfigError(
            f"no relay named {name} in the store {store.path}; its relays: {known}",
            file="--relay",
        )
    key, _, registered, _ = row
    dial = override if override is not None else _store_endpoint(registered)
    if dial is None:
        said = (
            "registered no endpoint in the store (its [server] sets none)"
            if not registered
            else f"registered the endpoint {registered!r}, not host:port"
        )
        raise ConfigError(f"relay {name} {said}: pass --endpoint HOST:PORT", file="--relay")
    routes = [str(r) for r in cfg.routes] + [route for r in rows for route in r[3]]
    return DialedRelay(key, dial, tuple(dict.fromkeys(routes)))


def _no_shared_store(cfg: ServerConfig) -> ConfigError:
    return ConfigError(
        '--relay needs a shared store (store = "postgresql://..." in [server]): '
        "without one this relay is the only one",
        file=cfg.path,
        key="server.store",
    )


def _store_endpoint(text: str | None) -> tuple[str, int] | None:
    """A relay's endpoint as the store keeps it ("host:port", an IPv6 address in
    brackets or not; a host name is kept as it is, wg-quick resolves it)."""
    if not text:
        return None
    host, _, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isascii() or not port_text.isdigit():
        return None
    port = int(port_text)
    return (host, port) if 0 < port < 65536 else None


def add_peer(
    cfg: ServerConfig,
    name: str,
    endpoint: tuple[str, int] | None,
    relay: str | None = None,
    *,
    psk: bool = True,
    dns: bool = True,
    deliver: Callable[[str], None] | None = None,
    tell: bool = True,
) -> tuple[str, str | None]:
    """Store a new peer, lease its address, and return (wg-quick text, reload note).
    The text names the relay of `cfg`, or with `relay` that relay of the shared store
    (store_relay()); `endpoint` overrides the address dialed either way.  With `psk`
    the peer gets a preshared key of its own (stored with it, and in the text); with
    `dns` the text has the relay's `dns` as wg-quick's DNS line.  `deliver`, when
    given, is called with the text once the peer is stored and before the relay is
    told: if it raises (an output file that cannot be written), the peer is removed
    again and the error raised.  With `tell` False the running relay is not asked to
    reload (the note is None then).

    All or nothing: raises ConfigError (bad name, name or key taken, --relay unusable,
    a clash in the peer set: found before anything is stored, or undone) or
    RuntimeFailure (state store), leaving no peer stored."""
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
    if relay is not None and cfg.store is None:
        raise _no_shared_store(cfg)
    own = None  # this config's relay; with --relay, the store is read for the other
    if relay is None:
        routes = tuple(str(r) for r in cfg.routes)
        own = DialedRelay(encode_key(cfg.public_key), guess_endpoint(cfg, endpoint), routes)
    private = generate_private_key()
    pub = encode_key(public_key(private))
    preshared = encode_key(generate_preshared_key()) if psk else None
    store: Store = open_state(cfg)
    try:
        if relay is not None:
            target = store_relay(cfg, store, relay, endpoint)
        else:
            assert own is not None
            target = own
            if cfg.store is not None:  # the mesh carries every relay's routes
                from gtun.app.pgstore import PgStore

                assert isinstance(store, PgStore)
                mesh_routes = [r for row in store.relay_rows() for r in row[3]]
                routes = tuple(dict.fromkeys([*own.routes, *mesh_routes]))
                target = DialedRelay(own.public_key, own.endpoint, routes)
        if any(p.name == name for p in store.peers()):
            raise ConfigError(
                f"a peer named {name} was already added (in {store.path})", file=cfg.path
            )
        store.add_peer(StoredPeer(name=name, public_key=pub, preshared_key=preshared))
        try:
            specs = collect_peers(cfg, store)
            spec = next((s for s in specs if s.name == name), None)
            if spec is None:  # the pool is full: refused, so not kept
                raise RuntimeFailure(
                    f"no free address left in {cfg.network} for peer {name}; it was not added"
                )
            text = _wg_quick(cfg, name, private, preshared, spec, specs, target, dns)
            if deliver is not None:
                deliver(text)
        except BaseException as exc:
            try:
                store.remove_peer(name)
            except GtunError as undo:
                raise RuntimeFailure(
                    f"{exc}; and peer {name} could not be removed again ({undo}): "
                    f"run gtun peer remove {name} -c {cfg.path}"
                ) from None
            raise
    finally:
        store.close()
    return text, _tell_relay(cfg, "the peer") if tell else None


def _wg_quick(
    cfg: ServerConfig,
    name: str,
    private: bytes,
    preshared: str | None,
    spec: PeerSpec,
    specs: list[PeerSpec],
    target: DialedRelay,
    dns: bool,
) -> str:
    """The wg-quick configuration of new peer `name` (`spec`), dialing `target`."""
    allowed = [str(cfg.network)] + ([str(cfg.network6)] if cfg.network6 else [])
    allowed += target.routes
    allowed += [str(n) for s in specs if s.name != name for n in s.subnets]
    host, port = target.endpoint
    host_text = f"[{host}]" if ":" in host else host
    lines = [
        f"# gtun peer {name}, added {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "[Interface]",
        f"PrivateKey = {encode_key(private)}",
        f"Address = {spec.address}/{cfg.network.prefixlen}"
        + (f", {spec.address6}/{cfg.network6.prefixlen}" if cfg.network6 and spec.address6 else ""),
    ]
    if cfg.dns and dns:
        lines.append(f"DNS = {', '.join(str(d) for d in cfg.dns)}")
    lines.append(f"MTU = {cfg.mtu}")
    lines += [
        "",
        "[Peer]",
        f"PublicKey = {target.public_key}",
        *([f"PresharedKey = {preshared}"] if preshared else []),
        f"Endpoint = {host_text}:{port}",
        f"AllowedIPs = {', '.join(dict.fromkeys(allowed))}",
        "PersistentKeepalive = 25",
        "",
    ]
    return "\n".join(lines)


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


def _not_configured_elsewhere(store: Store, name: str) -> None:
    """Shared store: refuse to change a peer that another relay's [[peers]] holds."""
    source = next((p.source for p in store.peers() if p.name == name), None)
    if source is not None:
        raise ConfigError(
            f"peer {name} is in the [[peers]] of relay {source} (its {source}.toml); "
            "change it there"
        )


class NoSuchPeer(ConfigError):
    """No stored peer of that name (the console answers it with 404)."""


def _change_stored(
    cfg: ServerConfig, name: str, change: Callable[[Store], bool], tell: bool
) -> str:
    """Apply `change` to stored peer `name` (False from it: no such peer) and, with
    `tell`, ask the running relay to reload; the note for the user ("" when not `tell`).
    Refuses a [[peers]] entry of this config or of another relay's.  Raises ConfigError
    (NoSuchPeer for an unknown name) or RuntimeFailure (store)."""
    _stored_only(cfg, name)
    store = open_state(cfg)
    try:
        _not_configured_elsewhere(store, name)
        if not change(store):
            raise NoSuchPeer(f"no stored peer named {name}", file=store.path)
    finally:
        store.close()
    return _tell_relay(cfg, "the change") if tell else ""


def remove_peer(cfg: ServerConfig, name: str, *, tell: bool = True) -> str:
    """Forget a peer `gtun peer add` stored, and its lease; the note for the user (""
    when not `tell`: the running relay is not asked to reload).  Raises ConfigError (a
    config peer, or no such peer) or RuntimeFailure (store)."""
    return _change_stored(cfg, name, lambda store: store.remove_peer(name), tell)


def set_peer_enabled(cfg: ServerConfig, name: str, enabled: bool, *, tell: bool = True) -> str:
    """Enable or disable a stored peer (a disabled one keeps its address but is not
    served; a peer disabled for its quota and enabled here may be disabled again at the
    relay's next fold if it is still over it); the note for the user ("" when not
    `tell`).  Raises ConfigError or RuntimeFailure."""
    return _change_stored(cfg, name, lambda store: store.set_enabled(name, enabled), tell)


def set_peer_quota(cfg: ServerConfig, name: str, quota: int | None, *, tell: bool = True) -> str:
    """Set (None: remove) a stored peer's monthly quota in bytes (rx+tx in a calendar
    month, UTC): the relay disables the peer at its next fold once over it, and enables
    it again when under (a new month, a raised quota); the note for the user ("" when
    not `tell`).  Raises ConfigError (a config peer, no such peer, a negative quota) or
    RuntimeFailure (store)."""
    if quota is not None and quota < 0:
        raise ConfigError(f"a quota cannot be negative ({quota})")
    return _change_stored(cfg, name, lambda store: store.set_quota(name, quota), tell)


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """A quota as `gtun peer quota` takes it: bytes, or a number with K, M, G or T
    (powers of 1024: 50G is 50 GiB), or "none" (None).  Raises ConfigError."""
    if text.strip().lower() == "none":
        return None
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(
            f"size {text!r}: give bytes, a number with K, M, G or T (powers of 1024), or none"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(size: int) -> str:
    """A size as parse_size() reads it back: the largest unit that divides it, else
    bytes (50G, 1536M, 1000)."""
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


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
    own = {(p.name, encode_key(p.public_key)) for p in cfg.peers}
    for sp in stored:
        if (sp.name, sp.public_key) in own:
            continue  # this relay's [[peers]], shared through the store: listed above
        address = sp.address or leases.get(sp.public_key, "-")
        kept = "stored" if sp.source is None else f"config of relay {sp.source}"
        if not sp.enabled:
            over = sp.disabled_reason == "quota"
            kept += ", disabled (over its quota)" if over else ", disabled"
        if sp.quota is not None:
            kept += f", quota {format_size(sp.quota)}/month"
        rows.append((sp.name, address, kept, sp.public_key))
    return rows
