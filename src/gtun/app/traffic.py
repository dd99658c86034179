"""The relay's traffic fold: what its per-peer counters became since the last fold.

Pure: no I/O, no clock.  The relay (app/server.py) reads its merged counters from
`Server.status()` every FOLD_INTERVAL and once at stop, calls fold() with the totals it
kept from the last successful write, writes the deltas into the store's buckets
(`Store.add_traffic`) and the sources seen (`note_sources`), then keeps `Fold.totals`
for the next fold.  A write that fails keeps the old totals, so the next fold's deltas
include what this one could not write.

A counter that went down counts nothing this time, and its new value is the base for
the next fold.  It goes down when its peer was removed and added again (its counters
start afresh) or when one of several relay workers restarted (its part of the merged
total is gone while the others' stays): counting the new value from 0 would count the
other workers' part of the whole run a second time, which may be gigabytes, where
counting nothing loses at most one fold interval's traffic of that peer.

quota_changes() says which stored peers to disable for their monthly quota (rx+tx in
this month's bucket at or over it) and which peers disabled for it to enable again (a
new month, a raised or removed quota); enforce_quotas() reads the store and applies them
(the one function here that does I/O: the relay calls it in a worker thread).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gtun.app.store import Store, StoredPeer, bucket_start

__all__ = ["QUOTA_REASON", "Fold", "Quotas", "enforce_quotas", "fold", "quota_changes"]

QUOTA_REASON = "quota"  # StoredPeer.disabled_reason of a peer the relay disabled


@dataclass(frozen=True)
class Fold:
    """One fold: the counters now (to keep for the next fold), what grew since the
    last, and the endpoints that carried it."""

    totals: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (rx, tx)
    deltas: list[tuple[str, int, int]] = field(default_factory=list)  # (key, rx, tx)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (key, endpoint, transport)


def fold(last: Mapping[str, tuple[int, int]], peers: Iterable[Mapping[str, Any]]) -> Fold:
    """The deltas of `peers` (status() peer entries: public_key, rx_bytes, tx_bytes,
    endpoint, transport) since the totals `last`.  A peer not in `last` counts from 0;
    a counter lower than its last total counts nothing (see the module's docstring).
    A peer with traffic in the interval and an endpoint is among `seen`."""
    result = Fold()
    for peer in peers:
        key = peer.get("public_key")
        rx, tx = peer.get("rx_bytes"), peer.get("tx_bytes")
        if not isinstance(key, str) or not isinstance(rx, int) or not isinstance(tx, int):
            continue
        old_rx, old_tx = last.get(key, (0, 0))
        d_rx = rx - old_rx if rx >= old_rx else 0
        d_tx = tx - old_tx if tx >= old_tx else 0
        result.totals[key] = (rx, tx)
        if not d_rx and not d_tx:
            continue
        result.deltas.append((key, d_rx, d_tx))
        endpoint, transport = peer.get("endpoint"), peer.get("transport")
        if isinstance(endpoint, str) and endpoint and endpoint != "-":
            result.seen.append((key, endpoint, transport if isinstance(transport, str) else "udp"))
    return result


def quota_changes(
    stored: Iterable[StoredPeer], month: Mapping[str, tuple[int, int]]
) -> tuple[list[str], list[str]]:
    """(names to disable for their quota, names to enable again): an enabled peer whose
    month total (`month`: key -> (rx, tx)) is at or over its quota, and a peer disabled
    for QUOTA_REASON now under its quota or with none."""
    disable: list[str] = []
    enable: list[str] = []
    for peer in stored:
        used = sum(month.get(peer.public_key, (0, 0)))
        over = peer.quota is not None and used >= peer.quota
        if peer.enabled and over:
            disable.append(peer.name)
        elif not peer.enabled and peer.disabled_reason == QUOTA_REASON and not over:
            enable.append(peer.name)
    return disable, enable


@dataclass(frozen=True)
class Quotas:
    """What enforce_quotas() read and did."""

    month: dict[str, tuple[int, int]]  # key -> (rx, tx) this month, every relay's
    stored: list[StoredPeer]  # the stored peers, as read before the changes
    disabled: list[str]  # names disabled for their quota now
    enabled: list[str]  # names enabled again now


def enforce_quotas(store: Store, now: float) -> Quotas:
    """Disable (reason QUOTA_REASON) the stored peers over their quota this month (the
    month holding `now`) and enable again those disabled for it and now under it, each
    with Store.set_enabled (NOTIFY on a shared store; the caller reloads otherwise).
    Raises what the store raises (GtunError)."""
    month = store.totals("month", bucket_start("month", now))
    stored = store.peers()
    disable, enable = quota_changes(stored, month)
    for name in disable:
        store.set_enabled(name, False, QUOTA_REASON)
    for name in enable:
        store.set_enabled(name, True)
    return Quotas(month, stored, disable, enable)
