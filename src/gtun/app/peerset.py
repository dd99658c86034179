"""The relay's peer set: the config's [[peers]] and the peers `gtun peer add` stored, each
with its leased (or fixed) address and its IPv6 twin.  Read at start, at every reload,
and by `gtun peer add` itself."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_network
from typing import Any

from gtun.app.config import ServerConfig
from gtun.app.keys import decode_key, encode_key
from gtun.app.store import AddressPool, LeaseWanted, StateStore, Store, StoredPeer
from gtun.core.relay import PeerSpec
from gtun.core.wg.crypto import is_degenerate_key
from gtun.errors import ConfigError
from gtun.system.ipv6 import address6_for

log = logging.getLogger("gtun")

STATE_FILE = "gtun.sqlite"


def open_state(cfg: ServerConfig) -> Store:
    """The relay's store: PostgreSQL when `store` is set, else SQLite in state_dir.

    Raises ConfigError (a state file it cannot use; a database schema not this gtun's,
    naming the config's `server.store`) or RuntimeFailure (the database unreachable)."""
    if cfg.store is None:
        return StateStore(cfg.state_dir / STATE_FILE)
    from gtun.app.pgstore import PgStore, StoreSchemaError

    try:
        return PgStore(cfg.store, cfg.network)
    except StoreSchemaError as exc:
        raise ConfigError(
            exc.message.replace("CONFIG", str(cfg.path)) + f" ({exc.file})",
            file=cfg.path,
            key="server.store",
        ) from None


@dataclass
class PeerSet:
    """The peers the relay serves, with their addresses, and the names of the peers
    refused because the address pool had no address left for them."""

    specs: list[PeerSpec] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def collect_peers(cfg: ServerConfig, store: Store) -> list[PeerSpec]:
    """The peers read_peers() gives, without those the pool refused."""
    return read_peers(cfg, store).specs


def publish_config_peers(cfg: ServerConfig, store: Store) -> None:
    """Shared store: put this relay's [[peers]] in the store (PgStore.publish_config_
    peers), so that every relay of the network serves them; a clash is logged, and the
    config's peer is still served here.  Nothing to do on SQLite (one relay)."""
    if cfg.store is None:
        return
    from gtun.app.pgstore import PgStore

    assert isinstance(store, PgStore)
    peers = [
        StoredPeer(
            p.name,
            encode_key(p.public_key),
            None if p.address is None else str(p.address),
            tuple(str(n) for n in p.subnets),
        )
        for p in cfg.peers
    ]
    for name in store.publish_config_peers(relay_name(cfg), peers):
        log.warning(
            "peer %s of %s is not shared with the other relays: another peer in %s has "
            "its name or key",
            name,
            cfg.path,
            store.path,
        )


def relay_name(cfg: ServerConfig) -> str:
    """The relay's name in a shared store: its config file's name without ".toml"."""
    return cfg.path.stem


def read_peers(cfg: ServerConfig, store: Store) -> PeerSet:
    """The relay's peers: the config's [[peers]] and those added by `gtun peer add`,
    with their addresses (fixed ones first, so leases move out of their way), leased in
    one transaction.  When the pool is full, the peers without an address are refused
    (named in PeerSet.refused), not the whole set.

    Raises ConfigError for a stored peer that clashes with the config or has a
    low-order key (the config's own peers were checked as it was read), or a fixed
    address the pool cannot give, before any address is leased."""
    pool = AddressPool(cfg.network, store)
    entries: list[tuple[str, bytes, IPv4Address | None, tuple[Any, ...]]] = [
        (p.name, p.public_key, p.address, p.subnets) for p in cfg.peers
    ]
    names = {p.name for p in cfg.peers}
    keys = {p.public_key for p in cfg.peers}
    own = {(p.name, p.public_key) for p in cfg.peers}
    for sp in store.peers():
        if not sp.enabled:
            continue
        key = decode_key(sp.public_key, file=store.path, key=f"peers.{sp.name}")
        if sp.source is not None and (sp.name, key) in own:
            continue  # this relay's own [[peers]] entry (or the same peer in another's)
        if is_degenerate_key(key):
            raise ConfigError(
                f"peer {sp.name} has a low-order public key {sp.public_key} "
                "(its Diffie-Hellman result is all zeros); remove it",
                file=store.path,
                key=f"peers.{sp.name}",
            )
        if sp.name in names or key in keys:
            log.warning(
                "peer %s from %s clashes with %s (same name or key); using the config's",
                sp.name,
                store.path,
                cfg.path,
            )
            continue
        names.add(sp.name)
        keys.add(key)
        fixed = IPv4Address(sp.address) if sp.address else None
        subnets = tuple(ip_network(s) for s in sp.subnets)
        entries.append((sp.name, key, fixed, subnets))
    ordered = sorted(entries, key=lambda e: (e[2] is None, e[0]))
    wanted = []
    for name, key, fixed, _ in ordered:
        if fixed is not None:
            try:
                pool.check_fixed(fixed)
            except ConfigError as exc:
                raise ConfigError(exc.message, file=cfg.path, key=f"peers.{name}.address") from exc
        wanted.append(LeaseWanted(encode_key(key), fixed, name))
    assignment = pool.assign_all(wanted)
    result = PeerSet()
    for (name, key, _, subnets), want in zip(ordered, wanted, strict=True):
        address = assignment.addresses.get(want.public_key)
        if address is None:
            result.refused.append(name)
            continue
        # IPv6 twin of the (stable) IPv4 lease: same host number in network6 (ipv6.py).
        address6 = (
            None if cfg.network6 is None else address6_for(cfg.network, cfg.network6, address)
        )
        result.specs.append(PeerSpec(name, key, address, subnets, address6))
    return result


# Up to this many refused peers get a log line each; more get one line naming them all.
REFUSED_LINES = 20


def refused_lines(refused: list[str], network: Any) -> list[str]:
    """The log lines naming the peers a full pool refused."""
    if len(refused) <= REFUSED_LINES:
        return [
            f"peer {name} refused: no free address left in {network}; it is not served"
            for name in refused
        ]
    return [
        f"address pool {network} is full: {len(refused)} peers refused and not served: "
        + ", ".join(refused)
    ]
