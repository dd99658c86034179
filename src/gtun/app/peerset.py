"""The relay's peer set: the config's [[peers]] and the peers `gtun peer add` stored, each
with its leased (or fixed) address and its IPv6 twin.  Read at start, at every reload,
and by `gtun peer add` itself."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, ip_network
from typing import Any

from gtun.app.config import ServerConfig
from gtun.app.keys import decode_key, encode_key
from gtun.app.store import AddressPool, StateFileError, StateStore
from gtun.core.relay import PeerSpec
from gtun.core.wg.crypto import is_degenerate_key
from gtun.errors import ConfigError
from gtun.system.ipv6 import address6_for

log = logging.getLogger("gtun")

STATE_FILE = "gtun.sqlite"


def open_state(cfg: ServerConfig) -> StateStore:
    return StateStore(cfg.state_dir / STATE_FILE)


def collect_peers(cfg: ServerConfig, store: StateStore) -> list[PeerSpec]:
    """The relay's peers: the config's [[peers]] and those added by `gtun peer add`,
    with their addresses (fixed ones first, so leases move out of their way).

    Raises ConfigError for a stored peer that clashes with the config or has a
    low-order key (the config's own peers were checked as it was read), before any
    address is leased."""
    pool = AddressPool(cfg.network, store)
    entries: list[tuple[str, bytes, IPv4Address | None, tuple[Any, ...]]] = [
        (p.name, p.public_key, p.address, p.subnets) for p in cfg.peers
    ]
    names = {p.name for p in cfg.peers}
    keys = {p.public_key for p in cfg.peers}
    for sp in store.peers():
        key = decode_key(sp.public_key, file=store.path, key=f"peers.{sp.name}")
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
    specs = []
    ordered = sorted(entries, key=lambda e: (e[2] is None, e[0]))
    for name, key, fixed, subnets in ordered:
        try:
            address = pool.assign(encode_key(key), fixed=fixed, name=name)
        except StateFileError:
            raise  # the state file's fault, named as such, not this peer's
        except ConfigError as exc:
            raise ConfigError(exc.message, file=cfg.path, key=f"peers.{name}.address") from exc
        # IPv6 twin of the (stable) IPv4 lease: same host number in network6 (ipv6.py).
        address6 = (
            None if cfg.network6 is None else address6_for(cfg.network, cfg.network6, address)
        )
        specs.append(PeerSpec(name, key, address, subnets, address6))
    return specs
