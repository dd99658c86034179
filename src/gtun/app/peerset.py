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
    peers), so that every relay of the network serves them.  Called after read_peers(),
    which refused any clash; one that came in between (another relay, `peer add`) is
    logged, and the config's peer is still served here.  Nothing to do on SQLite."""
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
            preshared_key=None if p.preshared_key is None else encode_key(p.preshared_key),
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

    A stored peer with the name or the public key of a [[peers]] entry, but not both,
    is a clash: refused, never settled silently.  The same peer (name and key) in both
    is served once, as the config gives it.  With a shared store, the rows this relay
    published (source: its name) are its config's and not read here.

    Raises ConfigError, before any address is leased, for a clash (naming the config
    file and the store), a stored peer with a malformed or low-order key, or a fixed
    address the pool cannot give."""
    pool = AddressPool(cfg.network, store)
    entries: list[tuple[str, bytes, IPv4Address | None, tuple[Any, ...], bytes | None]] = [
        (p.name, p.public_key, p.address, p.subnets, p.preshared_key) for p in cfg.peers
    ]
    names = {p.name: i for i, p in enumerate(cfg.peers)}
    keys = {p.public_key: i for i, p in enumerate(cfg.peers)}
    me = relay_name(cfg) if cfg.store is not None else None
    for sp in store.peers():
        if me is not None and sp.source == me:
            continue  # this relay's own [[peers]], published: read from the file
        key = decode_key(sp.public_key, file=store.path, key=f"peers.{sp.name}")
        _check_clash(cfg, store, sp, key, names, keys)
        if sp.name in names:
            continue  # the same peer (name and key) in the config: served as it says
        if not sp.enabled:
            continue
        if is_degenerate_key(key):
            raise ConfigError(
                f"peer {sp.name} has a low-order public key {sp.public_key} "
                "(its Diffie-Hellman result is all zeros); remove it",
                file=store.path,
                key=f"peers.{sp.name}",
            )
        psk = (
            None
            if sp.preshared_key is None
            else decode_key(sp.preshared_key, file=store.path, key=f"peers.{sp.name}.preshared_key")
        )
        fixed = IPv4Address(sp.address) if sp.address else None
        subnets = tuple(ip_network(s) for s in sp.subnets)
        entries.append((sp.name, key, fixed, subnets, psk))
    ordered = sorted(entries, key=lambda e: (e[2] is None, e[0]))
    wanted = []
    for name, key, fixed, _, _ in ordered:
        if fixed is not None:
            try:
                pool.check_fixed(fixed)
            except ConfigError as exc:
                raise ConfigError(exc.message, file=cfg.path, key=f"peers.{name}.address") from exc
        wanted.append(LeaseWanted(encode_key(key), fixed, name))
    assignment = pool.assign_all(wanted)
    result = PeerSet()
    for (name, key, _, subnets, psk), want in zip(ordered, wanted, strict=True):
        address = assignment.addresses.get(want.public_key)
        if address is None:
            result.refused.append(name)
            continue
        # IPv6 twin of the (stable) IPv4 lease: same host number in network6 (ipv6.py).
        address6 = (
            None if cfg.network6 is None else address6_for(cfg.network, cfg.network6, address)
        )
        result.specs.append(PeerSpec(name, key, address, subnets, address6, psk))
    return result


def _check_clash(
    cfg: ServerConfig,
    store: Store,
    sp: StoredPeer,
    key: bytes,
    names: dict[str, int],
    keys: dict[bytes, int],
) -> None:
    """Raises ConfigError when stored peer `sp` shares its name or its key, but not
    both, with a [[peers]] entry of `cfg` (`names`, `keys`: their indexes)."""
    by_name, by_key = names.get(sp.name), keys.get(key)
    if by_name is not None and by_name == by_key:
        return  # the same peer
    where = (
        f"the store {store.path} (added by `gtun peer add`; `gtun peer remove {sp.name}` "
        "forgets it)"
        if sp.source is None
        else f"the store {store.path} (the [[peers]] of relay {sp.source})"
    )
    if by_name is not None:
        raise ConfigError(
            f"peer {sp.name} is in this file with one public key and in {where} with "
            "another; rename or remove one of them",
            file=cfg.path,
            key=f"peers[{by_name}].name",
        )
    if by_key is not None:
        raise ConfigError(
            f"the public key of peer {cfg.peers[by_key].name} is also peer {sp.name}'s in "
            f"{where}; one key is one peer: remove one of them",
            file=cfg.path,
            key=f"peers[{by_key}].public_key",
        )


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
