"""What the relay remembers across restarts: address leases, peers added at run time,
and each peer's traffic history, source addresses and monthly quota.

All live in one SQLite file under `state_dir`.  The running relay and `gtun peer add`
may open it at the same time, so every change is one short IMMEDIATE transaction (the
write lock is taken at its start, so two writers queue instead of deadlocking) and a
busy timeout makes the second process wait for the first instead of failing.

Traffic history: the relay's fold (app/traffic.py) adds each peer's bytes into one
bucket per PERIOD (minute, hour, day, calendar month; UTC) keyed by the bucket's start;
buckets older than KEEP of their period are pruned, so the table holds at most
peers x (buckets kept) rows.  Sources: the last MAX_SOURCES endpoints each peer came
from.  Settings: small named values (the console's admin hash).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Protocol

from gtun.errors import ConfigError, GtunError, RuntimeFailure

__all__ = [
    "AddressPool",
    "Assignment",
    "KEEP",
    "LeaseWanted",
    "MAX_SOURCES",
    "PERIODS",
    "Source",
    "StateFileError",
    "StateStore",
    "Store",
    "StoredPeer",
    "SCHEMA_VERSION",
    "bucket_rows",
    "bucket_start",
    "check_period",
]

# 1: leases, peers (an `enabled` column added later), endpoints.  2: peers'
# `preshared_key`: a gtun that knows only 1 would serve those peers without their key,
# so it refuses the file instead (a newer schema).  3: peers' `quota` and
# `disabled_reason`, the tables traffic, sources and settings.
SCHEMA_VERSION = 3
BUSY_TIMEOUT = 10.0  # seconds another gtun process may hold the write lock

# Traffic history: the bucket sizes (UTC), and how long each is kept (seconds).
PERIODS = ("minute", "hour", "day", "month")
KEEP = {"minute": 86400, "hour": 90 * 86400, "day": 400 * 86400, "month": 3 * 366 * 86400}
PRUNE_INTERVAL = 60.0  # seconds between prunings of old buckets, per store object
MAX_SOURCES = 20  # source endpoints kept per peer (the oldest last_seen go)
SOURCES_KEEP = KEEP["hour"]  # seconds a source unseen is kept (a removed peer's too)
_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    public_key TEXT PRIMARY KEY,
    address TEXT UNIQUE NOT NULL,
    name TEXT,
    updated REAL
);
CREATE TABLE IF NOT EXISTS peers (
    name TEXT PRIMARY KEY,
    public_key TEXT UNIQUE NOT NULL,
    address TEXT,
    subnets TEXT,
    created REAL
);
CREATE TABLE IF NOT EXISTS endpoints (
    relay TEXT NOT NULL,
    public_key TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    updated REAL,
    PRIMARY KEY (relay, public_key)
);
CREATE TABLE IF NOT EXISTS traffic (
    public_key TEXT NOT NULL,
    period TEXT NOT NULL,
    start REAL NOT NULL,
    rx INTEGER NOT NULL DEFAULT 0,
    tx INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (public_key, period, start)
);
CREATE INDEX IF NOT EXISTS traffic_bucket ON traffic (period, start);
CREATE TABLE IF NOT EXISTS sources (
    public_key TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    transport TEXT NOT NULL,
    relay TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    PRIMARY KEY (public_key, endpoint, transport, relay)
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def check_period(period: str) -> None:
    """Raises ValueError for a period not in PERIODS."""
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r} (one of {', '.join(PERIODS)})")


def bucket_start(period: str, t: float) -> float:
    """The start (Unix seconds) of the `period` bucket holding time `t`, in UTC: a
    month starts on its first day at 00:00 UTC.  Raises ValueError for an unknown
    period."""
    check_period(period)
    if period == "month":
        day = datetime.fromtimestamp(t, UTC)
        return day.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
    size = _SECONDS[period]
    return float(int(t // size) * size)


def bucket_rows(
    deltas: Iterable[tuple[str, int, int]], now: float
) -> list[tuple[str, str, float, int, int]]:
    """(public key, period, bucket start, rx, tx): each delta with traffic, once for
    the bucket of every period holding `now`, in the order of `deltas` (what both
    stores' add_traffic() upsert)."""
    starts = [(period, bucket_start(period, now)) for period in PERIODS]
    return [
        (key, period, start, rx, tx)
        for key, rx, tx in deltas
        if rx or tx
        for period, start in starts
    ]


@dataclass(frozen=True)
class Source:
    """An endpoint a peer's traffic came from, at a relay."""

    endpoint: str  # "203.0.113.5:51820" (endpoint_text form)
    transport: str  # "udp" | "tcp"
    relay: str  # the relay's name (its config file's stem; "" for a lone relay)
    first_seen: float  # Unix seconds
    last_seen: float


class StateFileError(ConfigError):
    """The state file itself is unusable: it cannot be created or written (a read-only
    or full file system), is corrupt, or was written by a newer gtun.  A ConfigError
    (exit 2 at start): the relay cannot keep its leases, so it refuses to run, or,
    while running, refuses the change that needed the file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message, file=path)


@dataclass(frozen=True)
class StoredPeer:
    """A peer added by `gtun peer add`; the key is base64 text, as in a config file."""

    name: str
    public_key: str
    address: str | None = None
    subnets: tuple[str, ...] = ()
    enabled: bool = True  # a disabled peer is kept, with its lease, but not served
    source: str | None = None  # shared store: the relay whose [[peers]] it is (else None)
    preshared_key: str | None = None  # WireGuard's PSK, base64 text (None: none)
    quota: int | None = None  # bytes per calendar month (UTC), rx+tx; None: no quota
    disabled_reason: str | None = None  # "quota" when the relay disabled it; else None


class Store(Protocol):
    """What the relay, AddressPool and `gtun peer add` need of a store: StateStore
    (SQLite, one relay) or pgstore.PgStore (PostgreSQL, shared by several relays).
    Every method raises a GtunError naming the store (`path`) when it cannot be used."""

    @property
    def path(self) -> Any:
        """Where the state is, for messages: a file, or a DSN without its password."""

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Hold the store's write lock (for its network) for the block."""

    def get_lease(self, public_key: str) -> str | None: ...
    def set_lease(self, public_key: str, address: str, name: str = "") -> None: ...
    def delete_lease(self, public_key: str) -> None: ...
    def leases(self) -> dict[str, str]: ...
    def lease_rows(self) -> list[tuple[str, str, str]]: ...
    def replace_leases(self, drop: Iterable[str], put: Iterable[tuple[str, str, str]]) -> None: ...
    def add_peer(self, peer: StoredPeer) -> None: ...
    def remove_peer(self, name: str) -> bool: ...
    def set_enabled(self, name: str, enabled: bool, reason: str | None = None) -> bool: ...
    def set_quota(self, name: str, quota: int | None) -> bool: ...
    def peers(self) -> list[StoredPeer]: ...
    def endpoints(self, relay: str) -> dict[str, str]: ...
    def save_endpoints(self, relay: str, changed: dict[str, str]) -> None: ...
    def add_traffic(self, deltas: Iterable[tuple[str, int, int]], now: float) -> None: ...
    def traffic(
        self, public_key: str, period: str, since: float
    ) -> list[tuple[float, int, int]]: ...
    def totals(self, period: str, start: float) -> dict[str, tuple[int, int]]: ...
    def note_sources(
        self, relay: str, seen: Iterable[tuple[str, str, str]], now: float
    ) -> None: ...
    def sources(self, public_key: str) -> list[Source]: ...
    def get_setting(self, name: str) -> str | None: ...
    def set_setting(self, name: str, value: str) -> None: ...
    def close(self) -> None: ...


class StateStore:
    """The relay's SQLite state file.  Usable from several threads (one lock) and by
    several processes at once.

    Every method raises StateFileError naming the file if the database cannot be used
    (corrupt, read-only, disk full), RuntimeFailure if another process holds it locked
    for longer than BUSY_TIMEOUT.
    """

    def __init__(self, path: Path) -> None:
        """Open `path`, creating it (mode 0600) and its directory (mode 0700) if missing.

        Raises StateFileError naming the file if it cannot be created or opened for
        writing, is not an SQLite database or is damaged (`PRAGMA quick_check`: a
        truncated file), is empty though it existed (truncated to nothing), or was
        written by a newer gtun.
        """
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._pruned = float("-inf")  # when add_traffic() last pruned old buckets
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created here rather than by SQLite so that it is never readable by others.
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                os.close(os.open(self.path, flags, 0o600))
            except FileExistsError:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CLOEXEC))
                if self.path.stat().st_size == 0:
                    # SQLite would take it for a new database: its leases would be gone
                    # without a word.  A file gtun made has its schema within milliseconds.
                    raise StateFileError(
                        self.path,
                        "the state database is empty (0 bytes): truncated? move it aside "
                        "to start afresh (its leases are lost then)",
                    ) from None
        except OSError as exc:
            raise StateFileError(
                self.path, f"cannot open the state database for writing: {exc.strerror or exc}"
            ) from None
        try:
            # isolation_level=None: transactions are begun and ended here, explicitly.
            self._db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StateFileError(self.path, f"cannot open the state database: {exc}") from None
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self.transaction():
            # Every page read once (milliseconds for thousands of leases): a truncated
            # or damaged file is refused now, not found half-read at the first lease.
            check = self._db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise self._failure(sqlite3.DatabaseError("database disk image is malformed"))
            # One statement at a time: executescript() would commit the transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            # An added column (a gtun without it serves every stored peer); schema 1 holds.
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(peers)")}
            if "enabled" not in columns:
                self._db.execute("ALTER TABLE peers ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1")
            row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StateFileError(
                    self.path,
                    f"the state database was written by a newer gtun "
                    f"(schema version {version}, this one knows {SCHEMA_VERSION})",
                )
            if "preshared_key" not in columns:  # schema 2
                self._db.execute("ALTER TABLE peers ADD COLUMN preshared_key TEXT")
            if "quota" not in columns:  # schema 3 (its tables are made above)
                self._db.execute("ALTER TABLE peers ADD COLUMN quota INTEGER")
                self._db.execute("ALTER TABLE peers ADD COLUMN disabled_reason TEXT")
            if version is None:
                self._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                self._db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the database's write lock for the block; commit at its end, roll back on
        an exception.  Nested uses join the outermost transaction.

        Raises StateFileError or RuntimeFailure (locked) naming the file on any
        database error.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._failure(exc) from None
            self._depth = 1
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                    raise self._failure(exc) from None
                raise
            finally:
                self._depth = 0

    def _failure(self, exc: sqlite3.Error) -> GtunError:
        text = str(exc)
        if isinstance(exc, sqlite3.ProgrammingError):  # closed: not the file's fault
            return RuntimeFailure(f"state database {self.path}: {text}")
        if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
            return RuntimeFailure(
                f"state database {self.path} is locked by another process "
                f"for more than {BUSY_TIMEOUT:g}s"
            )
        if "not a database" in text or "malformed" in text:
            return StateFileError(
                self.path,
                f"the state database is corrupt or not an SQLite database ({text}); "
                "move it aside to start afresh (its leases are lost then)",
            )
        if "unable to open" in text:  # SQLite's journal, beside the file
            text += self._directory_state()
        if "readonly" in text or "read-only" in text:
            return StateFileError(self.path, f"cannot write the state database: read-only ({text})")
        if "full" in text:
            return StateFileError(self.path, f"cannot write the state database: disk full ({text})")
        return StateFileError(self.path, f"state database error: {text}")

    def _directory_state(self) -> str:
        """Why a file cannot be created beside the database, if the file system says."""
        try:
            fs = os.statvfs(self.path.parent)
        except OSError:
            return ""
        if fs.f_flag & os.ST_RDONLY:
            return "; the directory is on a read-only file system"
        if fs.f_bavail == 0:
            return "; the file system is full"
        return ""

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run one read statement in its own transaction (or the enclosing one)."""
        with self.transaction():
            return list(self._db.execute(sql, args).fetchall())

    # -- leases ----------------------------------------------------------------

    def get_lease(self, public_key: str) -> str | None:
        """The address leased to `public_key`, or None."""
        rows = self._query("SELECT address FROM leases WHERE public_key = ?", (public_key,))
        return str(rows[0][0]) if rows else None

    def set_lease(self, public_key: str, address: str, name: str = "") -> None:
        """Lease `address` to `public_key`, taking it from any other key holding it."""
        with self.transaction():
            self._db.execute(
                "DELETE FROM leases WHERE address = ? AND public_key != ?", (address, public_key)
            )
            self._db.execute(
                "INSERT INTO leases (public_key, address, name, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (public_key) DO UPDATE SET "
                "address = excluded.address, name = excluded.name, updated = excluded.updated",
                (public_key, address, name, time.time()),
            )

    def delete_lease(self, public_key: str) -> None:
        """Forget the lease of `public_key`, if any."""
        with self.transaction():
            self._db.execute("DELETE FROM leases WHERE public_key = ?", (public_key,))

    def leases(self) -> dict[str, str]:
        """Every lease: public key (base64) to address."""
        rows = self._query("SELECT public_key, address FROM leases ORDER BY public_key")
        return {str(key): str(address) for key, address in rows}

    def lease_rows(self) -> list[tuple[str, str, str]]:
        """Every lease as (public key, address, name), in one read."""
        rows = self._query("SELECT public_key, address, name FROM leases")
        return [(str(key), str(address), str(name or "")) for key, address, name in rows]

    def replace_leases(self, drop: Iterable[str], put: Iterable[tuple[str, str, str]]) -> None:
        """Forget the leases of the keys `drop`, then lease (key, address, name) of `put`,
        in one transaction (the caller's, if it holds one).  Raises RuntimeFailure, or
        sqlite3.IntegrityError if an address of `put` is still leased to another key."""
        with self.transaction():
            self._db.executemany(
                "DELETE FROM leases WHERE public_key = ?", [(key,) for key in drop]
            )
            now = time.time()
            self._db.executemany(
                "INSERT INTO leases (public_key, address, name, updated) VALUES (?, ?, ?, ?)",
                [(key, address, name, now) for key, address, name in put],
            )

    # -- peers -----------------------------------------------------------------

    def add_peer(self, peer: StoredPeer) -> None:
        """Remember a peer added at run time.

        Raises ConfigError if its name or public key is already taken by a stored peer.
        """
        try:
            with self.transaction():
                self._db.execute(
                    "INSERT INTO peers (name, public_key, address, subnets, created, enabled, "
                    "preshared_key, quota, disabled_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        peer.name,
                        peer.public_key,
                        peer.address,
                        json.dumps(list(peer.subnets)),
                        time.time(),
                        int(peer.enabled),
                        peer.preshared_key,
                        peer.quota,
                        None if peer.enabled else peer.disabled_reason,
                    ),
                )
        except sqlite3.IntegrityError as exc:
            what = f"name {peer.name!r}" if "peers.name" in str(exc) else "public key"
            raise ConfigError(
                f"a peer with this {what} already exists", file=self.path, key=peer.name
            ) from None

    def remove_peer(self, name: str) -> bool:
        """Forget the stored peer `name` and its lease; return whether it existed."""
        with self.transaction():
            row = self._db.execute(
                "SELECT public_key FROM peers WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM peers WHERE name = ?", (name,))
            self._db.execute("DELETE FROM leases WHERE public_key = ?", (row[0],))
            return True

    def set_enabled(self, name: str, enabled: bool, reason: str | None = None) -> bool:
        """Enable or disable the stored peer `name` (a disabled one keeps its lease but
        is not served), keeping `reason` as its disabled_reason (cleared on enable);
        return whether it exists."""
        with self.transaction():
            cur = self._db.execute(
                "UPDATE peers SET enabled = ?, disabled_reason = ? WHERE name = ?",
                (int(enabled), None if enabled else reason, name),
            )
            return cur.rowcount > 0

    def set_quota(self, name: str, quota: int | None) -> bool:
        """Set (None: remove) the monthly quota of stored peer `name`, in bytes;
        return whether it exists."""
        with self.transaction():
            cur = self._db.execute("UPDATE peers SET quota = ? WHERE name = ?", (quota, name))
            return cur.rowcount > 0

    def peers(self) -> list[StoredPeer]:
        """The stored peers, oldest first."""
        rows = self._query(
            "SELECT name, public_key, address, subnets, enabled, preshared_key, quota, "
            "disabled_reason FROM peers ORDER BY created, name"
        )
        peers = []
        for name, key, address, subnets, enabled, psk, quota, reason in rows:
            try:
                decoded = json.loads(str(subnets)) if subnets else []
            except ValueError:
                raise StateFileError(
                    self.path, f"the state database is corrupt: peer {name!r}'s subnets"
                ) from None
            peers.append(
                StoredPeer(
                    name=str(name),
                    public_key=str(key),
                    address=None if address is None else str(address),
                    subnets=tuple(str(s) for s in decoded),
                    enabled=bool(enabled),
                    preshared_key=None if psk is None else str(psk),
                    quota=None if quota is None else int(str(quota)),
                    disabled_reason=None if reason is None else str(reason),
                )
            )
        return peers

    # -- endpoints ---------------------------------------------------------------
    # Where each peer last reached the relay (keyed by the relay's own public key, so
    # relays sharing a store keep theirs apart): a restarted relay initiates handshakes
    # there.  An added table: a gtun without it ignores it, and schema 1 still holds.

    def endpoints(self, relay: str) -> dict[str, str]:
        """The endpoints stored by `relay`: peer public key (base64) to its
        endpoint (the text the relay wrote: JSON of the socket address)."""
        rows = self._query("SELECT public_key, endpoint FROM endpoints WHERE relay = ?", (relay,))
        return {str(key): str(endpoint) for key, endpoint in rows}

    def save_endpoints(self, relay: str, changed: dict[str, str]) -> None:
        """Store the endpoints `changed` (peer public key to endpoint text), in one
        transaction."""
        now = time.time()
        with self.transaction():
            self._db.executemany(
                "INSERT INTO endpoints (relay, public_key, endpoint, updated) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (relay, public_key) DO UPDATE SET "
                "endpoint = excluded.endpoint, updated = excluded.updated",
                [(relay, key, endpoint, now) for key, endpoint in changed.items()],
            )

    # -- traffic history, sources, settings --------------------------------------------

    def add_traffic(self, deltas: Iterable[tuple[str, int, int]], now: float) -> None:
        """Add each (public key, rx bytes, tx bytes) into the buckets of every period
        holding `now`, in one transaction; prune buckets older than KEEP (at most once
        every PRUNE_INTERVAL)."""
        rows = bucket_rows(deltas, now)
        with self.transaction():
            self._db.executemany(
                "INSERT INTO traffic (public_key, period, start, rx, tx) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (public_key, period, start) DO UPDATE SET "
                "rx = traffic.rx + excluded.rx, tx = traffic.tx + excluded.tx",
                rows,
            )
            if now - self._pruned >= PRUNE_INTERVAL:
                self._pruned = now
                self._db.executemany(
                    "DELETE FROM traffic WHERE period = ? AND start < ?",
                    [(period, now - KEEP[period]) for period in PERIODS],
                )
                # A source unseen for as long as the hourly history is kept goes too
                # (a removed peer's among them): the table stays bounded by the peers.
                self._db.execute("DELETE FROM sources WHERE last_seen < ?", (now - SOURCES_KEEP,))

    def traffic(self, public_key: str, period: str, since: float) -> list[tuple[float, int, int]]:
        """The (bucket start, rx, tx) of `public_key`'s `period` buckets starting at or
        after `since`, oldest first.  Raises ValueError for an unknown period."""
        check_period(period)
        rows = self._query(
            "SELECT start, rx, tx FROM traffic WHERE public_key = ? AND period = ? "
            "AND start >= ? ORDER BY start",
            (public_key, period, since),
        )
        return [(float(str(s)), int(str(rx)), int(str(tx))) for s, rx, tx in rows]

    def totals(self, period: str, start: float) -> dict[str, tuple[int, int]]:
        """Every peer's (rx, tx) in the `period` bucket starting at `start`.  Raises
        ValueError for an unknown period."""
        check_period(period)
        rows = self._query(
            "SELECT public_key, rx, tx FROM traffic WHERE period = ? AND start = ?",
            (period, start),
        )
        return {str(k): (int(str(rx)), int(str(tx))) for k, rx, tx in rows}

    def note_sources(self, relay: str, seen: Iterable[tuple[str, str, str]], now: float) -> None:
        """Record that each (public key, endpoint, transport) was seen at `relay` now
        (its first_seen kept); keep the MAX_SOURCES most recent per peer."""
        rows = sorted(set(seen))
        if not rows:
            return
        with self.transaction():
            self._db.executemany(
                "INSERT INTO sources (public_key, endpoint, transport, relay, first_seen, "
                "last_seen) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (public_key, endpoint, transport, relay) DO UPDATE SET "
                "last_seen = excluded.last_seen",
                [(key, endpoint, transport, relay, now, now) for key, endpoint, transport in rows],
            )
            self._db.executemany(
                "DELETE FROM sources WHERE public_key = ? AND rowid NOT IN ("
                "SELECT rowid FROM sources WHERE public_key = ? "
                "ORDER BY last_seen DESC, rowid DESC LIMIT ?)",
                [(key, key, MAX_SOURCES) for key in sorted({r[0] for r in rows})],
            )

    def sources(self, public_key: str) -> list[Source]:
        """The endpoints `public_key` came from, the most recently seen first."""
        rows = self._query(
            "SELECT endpoint, transport, relay, first_seen, last_seen FROM sources "
            "WHERE public_key = ? ORDER BY last_seen DESC, endpoint",
            (public_key,),
        )
        return [
            Source(str(e), str(t), str(r), float(str(f)), float(str(last)))
            for e, t, r, f, last in rows
        ]

    def get_setting(self, name: str) -> str | None:
        """The setting `name`, or None if unset."""
        rows = self._query("SELECT value FROM settings WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def set_setting(self, name: str, value: str) -> None:
        """Set the setting `name` to `value`."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    # -- life --------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; further calls raise RuntimeFailure."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class LeaseWanted:
    """One key asking the pool for an address: `fixed` if the config gives one."""

    public_key: str
    fixed: IPv4Address | None = None
    name: str = ""


@dataclass
class Assignment:
    """What AddressPool.assign_all() gave: an address per key, and the keys refused
    because the pool had no free address left (in the order they asked)."""

    addresses: dict[str, IPv4Address] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


class AddressPool:
    """Hands out the IPv4 addresses of `network` to public keys, remembering them in a
    StateStore so that a key gets the same address after a restart.

    The network and broadcast addresses are never handed out, nor the relay's own
    address (the first host) nor any of `reserved`.  A whole peer set is assigned in one
    transaction that reads the leases once and writes only the ones that change, so
    another process assigning at the same time (`gtun peer add` beside a running relay)
    cannot be given the same address, and 10,000 peers cost one read and one commit.
    """

    def __init__(
        self, network: IPv4Network, store: Store, reserved: Iterable[IPv4Address] = ()
    ) -> None:
        self.network = network
        self.store = store
        self._first = int(network.network_address) + 1
        self._last = int(network.broadcast_address) - 1
        self.reserved = frozenset({network.network_address + 1, *reserved})
        self._reserved_ints = frozenset(int(a) for a in self.reserved)

    def _usable(self, address: IPv4Address) -> bool:
        return self._first <= int(address) <= self._last and address not in self.reserved

    def check_fixed(self, fixed: IPv4Address) -> None:
        """Raises ConfigError if `fixed` cannot be given to a peer: outside the network,
        its network or broadcast address, or a reserved one."""
        if fixed not in self.network:
            raise ConfigError(f"address {fixed} is outside network {self.network}")
        if fixed in self.reserved:
            raise ConfigError(f"address {fixed} is reserved (the relay's own, or in use)")
        if not self._usable(fixed):
            raise ConfigError(
                f"address {fixed} is the network or broadcast address of {self.network}"
            )

    def assign(
        self, public_key: str, *, fixed: IPv4Address | None = None, name: str = ""
    ) -> IPv4Address:
        """The address of `public_key`, as assign_all() gives it.

        Raises ConfigError if `fixed` cannot be given (check_fixed()); RuntimeFailure if
        no address is free or the store fails.
        """
        result = self.assign_all([LeaseWanted(public_key, fixed, name)])
        if result.refused:
            raise RuntimeFailure(f"address pool {self.network} is exhausted")
        return result.addresses[public_key]

    def assign_all(self, wanted: Sequence[LeaseWanted]) -> Assignment:
        """Addresses for every key of `wanted`, in one transaction: a fixed address
        where given (taken from any other key that held it, which then moves
        elsewhere if it is in `wanted`, or loses its lease), else the key's previous
        lease if still usable and not taken by a fixed one, else the lowest free host,
        in the order of `wanted`.  Keys for which no address is left are refused and
        keep no lease in this pool; leases of keys not in `wanted` stay as they are.

        Raises ConfigError for a fixed address check_fixed() refuses, or one given to
        two keys, before anything is written; RuntimeFailure if the store fails.
        """
        fixed_owner: dict[IPv4Address, str] = {}
        for want in wanted:
            if want.fixed is not None:
                self.check_fixed(want.fixed)
                other = fixed_owner.setdefault(want.fixed, want.public_key)
                if other != want.public_key:
                    raise ConfigError(f"address {want.fixed} is wanted by two keys")
        result = Assignment()
        with self.store.transaction():
            rows = self.store.lease_rows()
            lease: dict[str, tuple[int | None, str]] = {}  # key -> (address, name)
            holder: dict[int, str] = {}  # address -> key: the unique index, in memory
            for key, text, name in rows:
                parsed = _parse(text)
                number = None if parsed is None else int(parsed)
                lease[key] = (number, name)
                if number is not None:
                    holder[number] = key
            new: dict[str, tuple[int, str]] = {}  # what the leases of `wanted` become
            lost: set[str] = set()  # keys whose lease is forgotten

            def take(key: str, number: int, name: str) -> None:
                other = holder.get(number)
                if other is not None and other != key:
                    lost.add(other)
                    new.pop(other, None)
                old = new[key][0] if key in new else lease.get(key, (None, ""))[0]
                if old is not None and holder.get(old) == key:
                    del holder[old]
                holder[number] = key
                new[key] = (number, name)
                lost.discard(key)

            for want in wanted:
                if want.fixed is not None:
                    take(want.public_key, int(want.fixed), want.name)
            later: list[LeaseWanted] = []
            for want in wanted:
                if want.fixed is not None:
                    continue
                key = want.public_key
                number = None if key in lost else lease.get(key, (None, ""))[0]
                if (
                    number is not None
                    and self._first <= number <= self._last
                    and number not in self._reserved_ints
                    and holder.get(number) == key
                ):
                    new[key] = (number, want.name)
                else:
                    later.append(want)
            candidate = self._first
            for want in later:
                key = want.public_key
                while candidate <= self._last and (
                    candidate in holder or candidate in self._reserved_ints
                ):
                    candidate += 1
                if candidate > self._last:
                    result.refused.append(key)
                    if key in lease:
                        lost.add(key)
                        old = lease[key][0]
                        if old is not None and holder.get(old) == key:
                            del holder[old]
                    continue
                take(key, candidate, want.name)
            changed = [
                (key, str(IPv4Address(number)), name)
                for key, (number, name) in new.items()
                if lease.get(key) != (number, name)
            ]
            self.store.replace_leases(lost | {key for key, _, _ in changed}, changed)
        result.addresses = {key: IPv4Address(number) for key, (number, _) in new.items()}
        return result

    def lookup(self, public_key: str) -> IPv4Address | None:
        """The address currently leased to `public_key` inside this pool, or None."""
        text = self.store.get_lease(public_key)
        address = None if text is None else _parse(text)
        return address if address is not None and address in self.network else None

    def release(self, public_key: str) -> None:
        """Give up the lease of `public_key`, if any."""
        self.store.delete_lease(public_key)


def _parse(text: str) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None
