"""The shared store on PostgreSQL: the state of one gtun network kept where several
relays (and `gtun peer add` beside any of them) read and change it at once.

Theory of operation.  Every table is keyed by the network (`server.network`, as text),
so one database may hold several gtun networks.  A write transaction first takes an
advisory lock of its network (`pg_advisory_xact_lock`), as StateStore's `BEGIN
IMMEDIATE` takes SQLite's write lock: two relays leasing at the same moment run one
after the other, the second reading what the first wrote, and the unique constraints on
(network, address) and (network, public key) stay the last word should anything ever
write without the lock.  A change to the peers sends `NOTIFY gtun_peers` with the network
as payload, delivered at commit; every relay LISTENs on a connection of its own
(StoreWatch, a thread) and reloads.  A change to the relays (a relay registering) or to
the presence (a client's session completing at a relay) sends `NOTIFY gtun_mesh` the
same way: every relay re-reads the mesh and the presence map.

Traffic history, sources and settings are StateStore's (store.py), keyed by the
network too; several relays add into the same bucket (an upsert that adds, rows written
in one order so that two relays never deadlock).  Live rows (`live`): every relay
publishes the sessions it holds with their counters, and its own stats (relays.stats),
at each fold, so that any relay's console shows the whole network.

The schema is versioned (`gtun_schema`): `gtun store migrate` applies MIGRATIONS in one
transaction; a relay or `gtun peer add` refuses a schema older or newer than its own.

Connections are synchronous and used from worker threads (the relay calls the store off
its event loop, app/background.py).  A lost connection is a StoreUnavailable; the next
call connects afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.types.json import Jsonb

from gtun.app.store import (
    KEEP,
    MAX_SOURCES,
    PERIODS,
    PRUNE_INTERVAL,
    SOURCES_KEEP,
    Source,
    StateStore,
    StoredPeer,
    bucket_rows,
    check_period,
)
from gtun.errors import ConfigError, GtunError, RuntimeFailure

__all__ = [
    "CHANNEL",
    "MESH_CHANNEL",
    "SCHEMA_VERSION",
    "ImportSummary",
    "LIVE_FRESH",
    "LiveRow",
    "PgStore",
    "StoreConflict",
    "StoreSchemaError",
    "StoreUnavailable",
    "StoreWatch",
    "is_pg_dsn",
    "migrate",
    "redact",
    "schema_version",
]

CHANNEL = "gtun_peers"  # NOTIFY channel; the payload is the network
MESH_CHANNEL = "gtun_mesh"  # NOTIFY channel of the relays and presence; payload: the network
CONNECT_TIMEOUT = 5  # seconds to reach the server before a call fails
STATEMENT_TIMEOUT_MS = 15000  # no statement (nor a wait for the lease lock) runs longer
WATCH_POLL = 0.5  # seconds between looks for notifications (and for stop)
WATCH_PING = 2.0  # seconds between liveness checks of the LISTEN connection
WATCH_BACKOFF = (0.5, 10.0)  # seconds between reconnection attempts: first, most
_MIGRATE_LOCK = 0x67_74_75_6E  # "gtun": one migration at a time
LIVE_FRESH = 60.0  # seconds a relay's live row counts (it publishes every fold, 10 s)
LIVE_KEEP = 86400.0  # seconds after which a relay deletes its rows no longer refreshed

# Each migration: (the version it makes, its statements).  Append, never edit.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE peers (
                network text NOT NULL,
                name text NOT NULL,
                public_key text NOT NULL,
                address text,
                subnets text[] NOT NULL DEFAULT '{}',
                enabled boolean NOT NULL DEFAULT true,
                created timestamptz NOT NULL DEFAULT clock_timestamp(),
                CONSTRAINT peers_name UNIQUE (network, name),
                CONSTRAINT peers_key UNIQUE (network, public_key)
            )""",
            """CREATE TABLE leases (
                network text NOT NULL,
                public_key text NOT NULL,
                address text NOT NULL,
                name text NOT NULL DEFAULT '',
                updated timestamptz NOT NULL DEFAULT now(),
                CONSTRAINT leases_key UNIQUE (network, public_key),
                CONSTRAINT leases_address UNIQUE (network, address)
            )""",
            """CREATE TABLE relays (
                network text NOT NULL,
                public_key text NOT NULL,
                name text NOT NULL,
                endpoint text,
                updated timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (network, public_key)
            )""",
            """CREATE TABLE presence (
                network text NOT NULL,
                public_key text NOT NULL,
                relay text NOT NULL,
                heartbeat timestamptz NOT NULL,
                expires timestamptz NOT NULL,
                PRIMARY KEY (network, public_key)
            )""",
            """CREATE TABLE endpoints (
                relay text NOT NULL,
                public_key text NOT NULL,
                endpoint text NOT NULL,
                updated timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (relay, public_key)
            )""",
        ),
    ),
    # The routes each relay's configuration pushes (the LANs behind it), for the mesh.
    (2, ("ALTER TABLE relays ADD COLUMN routes text[] NOT NULL DEFAULT '{}'",)),
    # Each relay's last heartbeat and its clock's offset from the database's then, for
    # `gtun doctor` (a relay gone quiet, clocks that disagree); and which relay's
    # [[peers]] a peer comes from (NULL: `gtun peer add`), so that every relay serves it.
    (
        3,
        (
            "ALTER TABLE relays ADD COLUMN seen timestamptz",
            "ALTER TABLE relays ADD COLUMN clock_offset double precision",
            "ALTER TABLE peers ADD COLUMN source text",
        ),
    ),
    # Each peer's WireGuard preshared key (base64; NULL: none), served by every relay.
    (4, ("ALTER TABLE peers ADD COLUMN preshared_key text",)),
    # Traffic history, sources, quotas, settings (the console), live sessions and each
    # relay's stats (store.py, app/traffic.py).
    (
        5,
        (
            "ALTER TABLE peers ADD COLUMN quota bigint",
            "ALTER TABLE peers ADD COLUMN disabled_reason text",
            """CREATE TABLE traffic (
                network text NOT NULL,
                public_key text NOT NULL,
                period text NOT NULL,
                start double precision NOT NULL,
                rx bigint NOT NULL DEFAULT 0,
                tx bigint NOT NULL DEFAULT 0,
                PRIMARY KEY (network, public_key, period, start)
            )""",
            "CREATE INDEX traffic_bucket ON traffic (network, period, start)",
            """CREATE TABLE sources (
                network text NOT NULL,
                public_key text NOT NULL,
                endpoint text NOT NULL,
                transport text NOT NULL,
                relay text NOT NULL,
                first_seen double precision NOT NULL,
                last_seen double precision NOT NULL,
                PRIMARY KEY (network, public_key, endpoint, transport, relay)
            )""",
            """CREATE TABLE settings (
                network text NOT NULL,
                name text NOT NULL,
                value text NOT NULL,
                PRIMARY KEY (network, name)
            )""",
            """CREATE TABLE live (
                network text NOT NULL,
                public_key text NOT NULL,
                relay text NOT NULL,
                endpoint text,
                transport text,
                last_handshake double precision,
                rx_bytes bigint NOT NULL DEFAULT 0,
                tx_bytes bigint NOT NULL DEFAULT 0,
                updated timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (network, public_key)
            )""",
            "ALTER TABLE relays ADD COLUMN stats jsonb",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class RelayHealth:
    """A relay of the network as `gtun doctor` sees it in the store."""

    name: str
    public_key: str
    endpoint: str | None
    seen_ago: float | None  # seconds since its last heartbeat (None: never)
    clock_offset: float | None  # its clock minus the database's, at that heartbeat


@dataclass(frozen=True)
class LiveRow:
    """A session a relay holds now, with its counters as that relay sees them."""

    public_key: str
    relay: str  # the relay's name (its config file's stem)
    endpoint: str | None
    transport: str | None
    last_handshake: float | None  # Unix seconds
    rx_bytes: int
    tx_bytes: int
    updated: float  # Unix seconds, the database's clock (0 when publishing)


class StoreUnavailable(RuntimeFailure):
    """The PostgreSQL server cannot be reached, or the connection to it was lost."""


class StoreConflict(RuntimeFailure):
    """A write broke a unique constraint (`constraint` names it)."""

    def __init__(self, message: str, constraint: str | None) -> None:
        super().__init__(message)
        self.constraint = constraint


class StoreSchemaError(ConfigError):
    """The database's gtun schema is missing, older or newer than this gtun's."""


def is_pg_dsn(text: str) -> bool:
    return text.startswith(("postgresql://", "postgres://"))


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection in autocommit (transactions are begun explicitly).  Raises
    StoreUnavailable."""
    try:
        return psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
    except psycopg.Error as exc:
        raise StoreUnavailable(f"store {redact(dsn)} is unavailable: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _version(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    row = conn.execute("SELECT to_regclass('gtun_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM gtun_schema").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def schema_version(dsn: str) -> int:
    """The database's gtun schema version (0: none).  Raises StoreUnavailable."""
    with contextlib.closing(_connect(dsn)) as conn:
        try:
            return _version(conn)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"store {redact(dsn)}: {_first_line(exc)}") from None


def migrate(dsn: str) -> tuple[int, int]:
    """Bring the database's schema to SCHEMA_VERSION, in one transaction (two runs at
    once queue on a lock).  Returns (version before, version after).

    Raises StoreSchemaError if the database is newer than this gtun, StoreUnavailable
    or RuntimeFailure if the server fails."""
    with contextlib.closing(_connect(dsn)) as conn:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS gtun_schema (version integer NOT NULL)")
                before = _version(conn)
                if before > SCHEMA_VERSION:
                    raise StoreSchemaError(
                        f"the store's schema is version {before}, newer than this gtun's "
                        f"({SCHEMA_VERSION}); upgrade gtun",
                        file=redact(dsn),
                    )
                for version, statements in MIGRATIONS:
                    if version > before:
                        for statement in statements:
                            conn.execute(statement)
                        conn.execute("DELETE FROM gtun_schema")
                        conn.execute("INSERT INTO gtun_schema VALUES (%s)", (version,))
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"store {redact(dsn)}: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise RuntimeFailure(f"store {redact(dsn)}: migration failed: {exc}") from None
    return before, SCHEMA_VERSION


def _lock_id(network: str) -> int:
    """The advisory lock of a network's leases: 64 bits of a hash of its text."""
    digest = hashlib.blake2b(f"gtun leases {network}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class ImportSummary:
    """What `gtun store import` moved: new rows, rows already there, rows skipped."""

    peers: int = 0
    peers_there: int = 0
    leases: int = 0
    leases_there: int = 0
    leases_skipped: int = 0  # the address is another key's, or outside the network
    endpoints: int = 0
    endpoints_there: int = 0

    def line(self, source: str, target: str) -> str:
        return (
            f"imported {source} into {target}: peers {self.peers} new, {self.peers_there} "
            f"already there; leases {self.leases} new, {self.leases_there} already there, "
            f"{self.leases_skipped} skipped; endpoints {self.endpoints} new, "
            f"{self.endpoints_there} already there"
        )


class PgStore:
    """One gtun network's state in PostgreSQL, behind StateStore's interface (the
    `Store` protocol).  Usable from several threads (one lock, one connection).

    Every method raises StoreUnavailable if the server cannot be reached (the next call
    tries again), RuntimeFailure for any other database error; add_peer a ConfigError
    for a name or key already taken.
    """

    def __init__(self, dsn: str, network: IPv4Network | str, *, check_schema: bool = True) -> None:
        """Connect.  Raises StoreUnavailable; StoreSchemaError if `check_schema` and the
        database's schema is not this gtun's (missing, older: `gtun store migrate`)."""
        self.dsn = dsn
        self.path = redact(dsn)
        self.network = str(network)
        self._lock_key = _lock_id(self.network)
        self._lock = threading.RLock()
        self._depth = 0
        self._pruned = float("-inf")  # when add_traffic() last pruned old buckets
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = _connect(dsn)
        self._closed = False
        self._suspect = False  # set by suspect_connection(), from any thread
        if check_schema:
            try:
                version = _version(self._conn)
            except psycopg.Error as exc:
                self.close()
                raise self._failure(exc) from None
            if version != SCHEMA_VERSION:
                self.close()
                raise StoreSchemaError(
                    (
                        f"the store's schema is version {version}, this gtun's is "
                        f"{SCHEMA_VERSION}; "
                        + (
                            "upgrade gtun"
                            if version > SCHEMA_VERSION
                            else "run `gtun store migrate -c CONFIG` first"
                        )
                    ),
                    file=self.path,
                )

    # -- connection ----------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._closed:
            raise RuntimeFailure(f"store {self.path}: closed")
        if self._suspect and not self._depth:  # never in the middle of a transaction
            self._suspect = False
            self._drop()
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            self._conn = _connect(self.dsn)
        return self._conn

    def suspect_connection(self) -> None:
        """The store was seen away (another connection, StoreWatch's, was lost): the
        next call opens a new connection instead of finding out on its first statement
        that the one it has died with the server (a restarted server's first answer to
        an old connection is an error).  Never waits: the event loop may call it while
        a worker thread holds the store."""
        self._suspect = True

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _failure(self, exc: psycopg.Error) -> GtunError:
        """The error to raise for `exc`.  A broken connection is replaced at the next
        call (_connection)."""
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return StoreConflict(f"store {self.path}: {_first_line(exc)}", exc.diag.constraint_name)
        if (
            isinstance(exc, psycopg.OperationalError)
            and not isinstance(exc, psycopg.errors.QueryCanceled)
        ) or (self._conn is not None and self._conn.broken):
            return StoreUnavailable(f"store {self.path} is unavailable: {_first_line(exc)}")
        return RuntimeFailure(f"store {self.path}: {_first_line(exc)}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the network's lease lock for the block; commit at its end, roll back on
        an exception.  Nested uses join the outermost transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            conn = self._connection()
            try:
                with conn.transaction():
                    self._depth = 1
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                    yield
            except psycopg.Error as exc:
                raise self._failure(exc) from None
            finally:
                self._depth = 0

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[psycopg.Cursor[tuple[Any, ...]]]:
        """A cursor in a transaction of its own, without the lease lock: for writes
        keyed by one relay, or that add into counters, which no lease depends on.
        Commits at the block's end; raises StoreUnavailable or RuntimeFailure."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.Error as exc:
                raise self._failure(exc) from None

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement, inside the transaction held or on its own (no lock); its rows
        (none for a statement that returns none)."""
        with self._lock:
            try:
                cur = self._connection().execute(sql, args)
                return cur.fetchall() if cur.description is not None else []
            except psycopg.Error as exc:
                raise self._failure(exc) from None

    def _exec(self, sql: str, args: Iterable[tuple[object, ...]]) -> None:
        """A write statement for each of `args`, inside a transaction (the caller's)."""
        with self.transaction():
            assert self._conn is not None
            try:
                with self._conn.cursor() as cur:
                    cur.executemany(sql, list(args))
            except psycopg.Error as exc:
                raise self._failure(exc) from None

    def _notify(self) -> None:
        """Tell every relay the peers changed (sent when the transaction commits)."""
        self._rows("SELECT pg_notify(%s, %s)", (CHANNEL, self.network))

    # -- leases ----------------------------------------------------------------

    def get_lease(self, public_key: str) -> str | None:
        rows = self._rows(
            "SELECT address FROM leases WHERE network = %s AND public_key = %s",
            (self.network, public_key),
        )
        return str(rows[0][0]) if rows else None

    def set_lease(self, public_key: str, address: str, name: str = "") -> None:
        """Lease `address` to `public_key`, taking it from any other key holding it."""
        with self.transaction():
            self._exec(
                "DELETE FROM leases WHERE network = %s AND address = %s AND public_key != %s",
                [(self.network, address, public_key)],
            )
            self._exec(
                "INSERT INTO leases (network, public_key, address, name) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (network, public_key) DO UPDATE SET "
                "address = excluded.address, name = excluded.name, updated = now()",
                [(self.network, public_key, address, name)],
            )

    def delete_lease(self, public_key: str) -> None:
        self._exec(
            "DELETE FROM leases WHERE network = %s AND public_key = %s",
            [(self.network, public_key)],
        )

    def leases(self) -> dict[str, str]:
        rows = self._rows(
            "SELECT public_key, address FROM leases WHERE network = %s ORDER BY public_key",
            (self.network,),
        )
        return {str(key): str(address) for key, address in rows}

    def lease_rows(self) -> list[tuple[str, str, str]]:
        rows = self._rows(
            "SELECT public_key, address, name FROM leases WHERE network = %s", (self.network,)
        )
        return [(str(key), str(address), str(name or "")) for key, address, name in rows]

    def replace_leases(self, drop: Iterable[str], put: Iterable[tuple[str, str, str]]) -> None:
        """Forget the leases of the keys `drop`, then lease (key, address, name) of `put`,
        in one transaction (the caller's, if it holds one).  Raises RuntimeFailure if an
        address of `put` is still leased to another key (the unique constraint)."""
        with self.transaction():
            self._exec(
                "DELETE FROM leases WHERE network = %s AND public_key = %s",
                [(self.network, key) for key in drop],
            )
            self._exec(
                "INSERT INTO leases (network, public_key, address, name) VALUES (%s, %s, %s, %s)",
                [(self.network, key, address, name) for key, address, name in put],
            )

    # -- peers -----------------------------------------------------------------

    def add_peer(self, peer: StoredPeer) -> None:
        """Store a peer and tell every relay.  Raises ConfigError if its name or public
        key is already taken in this network."""
        with self._lock:
            try:
                with self.transaction():
                    self._rows(
                        "INSERT INTO peers (network, name, public_key, address, subnets, enabled, "
                        "preshared_key, quota, disabled_reason) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            self.network,
                            peer.name,
                            peer.public_key,
                            peer.address,
                            list(peer.subnets),
                            peer.enabled,
                            peer.preshared_key,
                            peer.quota,
                            None if peer.enabled else peer.disabled_reason,
                        ),
                    )
                    self._notify()
            except StoreConflict as exc:
                what = f"name {peer.name!r}" if exc.constraint == "peers_name" else "public key"
                raise ConfigError(
                    f"a peer with this {what} already exists", file=self.path, key=peer.name
                ) from None

    def remove_peer(self, name: str) -> bool:
        """Forget the stored peer `name` and its lease; return whether it existed."""
        with self.transaction():
            rows = self._rows(
                "DELETE FROM peers WHERE network = %s AND name = %s RETURNING public_key",
                (self.network, name),
            )
            if not rows:
                return False
            self.delete_lease(str(rows[0][0]))
            self._notify()
            return True

    def set_enabled(self, name: str, enabled: bool, reason: str | None = None) -> bool:
        """Enable or disable the stored peer `name` (a disabled one keeps its lease but
        is served by no relay), keeping `reason` as its disabled_reason (cleared on
        enable); tell every relay; return whether it exists."""
        with self.transaction():
            rows = self._rows(
                "UPDATE peers SET enabled = %s, disabled_reason = %s "
                "WHERE network = %s AND name = %s RETURNING 1",
                (enabled, None if enabled else reason, self.network, name),
            )
            if rows:
                self._notify()
            return bool(rows)

    def set_quota(self, name: str, quota: int | None) -> bool:
        """Set (None: remove) the monthly quota of stored peer `name`, in bytes;
        return whether it exists.  No relay needs telling: the next fold reads it."""
        rows = self._rows(
            "UPDATE peers SET quota = %s WHERE network = %s AND name = %s RETURNING 1",
            (quota, self.network, name),
        )
        return bool(rows)

    def peers(self) -> list[StoredPeer]:
        rows = self._rows(
            "SELECT name, public_key, address, subnets, enabled, source, preshared_key, "
            "quota, disabled_reason FROM peers WHERE network = %s ORDER BY created, name",
            (self.network,),
        )
        return [
            StoredPeer(
                name=str(name),
                public_key=str(key),
                address=None if address is None else str(address),
                subnets=tuple(str(s) for s in subnets or ()),
                enabled=bool(enabled),
                source=None if source is None else str(source),
                preshared_key=None if psk is None else str(psk),
                quota=None if quota is None else int(quota),
                disabled_reason=None if reason is None else str(reason),
            )
            for name, key, address, subnets, enabled, source, psk, quota, reason in rows
        ]

    def publish_config_peers(self, relay: str, peers: Iterable[StoredPeer]) -> list[str]:
        """Make relay `relay`'s [[peers]] the store's peers of that source, so that every
        relay serves them: new ones added, changed ones updated, those gone from its
        configuration removed (with their leases); every relay told when anything
        changed.  A peer whose name or key another peer already has (a `peer add` one,
        or another relay's with another key) is left out; its name is returned.  The
        same peer (name and key) in several relays' files is one row, kept by the first
        to publish it.  Raises StoreUnavailable or RuntimeFailure."""
        clashes: list[str] = []
        with self.transaction():  # under the network's lock, as leases
            rows = self._rows(
                "SELECT name, public_key, address, subnets, source, preshared_key FROM peers "
                "WHERE network = %s",
                (self.network,),
            )
            by_name = {str(r[0]): r for r in rows}
            by_key = {str(r[1]): r for r in rows}
            changed = False
            wanted: set[str] = set()
            for peer in peers:
                row = by_name.get(peer.name) or by_key.get(peer.public_key)
                if row is None:
                    self._rows(
                        "INSERT INTO peers (network, name, public_key, address, subnets, "
                        "source, preshared_key) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        (
                            self.network,
                            peer.name,
                            peer.public_key,
                            peer.address,
                            list(peer.subnets),
                            relay,
                            peer.preshared_key,
                        ),
                    )
                    changed = True
                    wanted.add(peer.name)
                    continue
                name, key, address, subnets, source, psk = row
                if (
                    source == relay
                    and name == peer.name
                    and key != peer.public_key
                    and peer.public_key not in by_key
                ):
                    # This relay's own peer, given a new key in its file: the old key
                    # and its lease go, the peer stays.
                    self._rows(
                        "UPDATE peers SET public_key = %s WHERE network = %s AND name = %s",
                        (peer.public_key, self.network, name),
                    )
                    self.delete_lease(str(key))
                    key = peer.public_key
                    changed = True
                if name != peer.name or key != peer.public_key or source is None:
                    clashes.append(peer.name)
                    continue
                wanted.add(peer.name)
                if source == relay and (
                    address != peer.address
                    or tuple(subnets or ()) != peer.subnets
                    or psk != peer.preshared_key
                ):
                    self._rows(
                        "UPDATE peers SET address = %s, subnets = %s, preshared_key = %s "
                        "WHERE network = %s AND name = %s",
                        (
                            peer.address,
                            list(peer.subnets),
                            peer.preshared_key,
                            self.network,
                            peer.name,
                        ),
                    )
                    changed = True
            for name, key, _, _, source, _ in rows:
                if source == relay and name not in wanted:
                    self._rows(
                        "DELETE FROM peers WHERE network = %s AND name = %s", (self.network, name)
                    )
                    self.delete_lease(str(key))
                    changed = True
            if changed:
                self._notify()
        return clashes

    # -- endpoints ---------------------------------------------------------------

    def endpoints(self, relay: str) -> dict[str, str]:
        rows = self._rows("SELECT public_key, endpoint FROM endpoints WHERE relay = %s", (relay,))
        return {str(key): str(endpoint) for key, endpoint in rows}

    def save_endpoints(self, relay: str, changed: dict[str, str]) -> None:
        # Keyed by the relay's own key: no lease lock needed, so not in transaction().
        with self._cursor() as cur:
            cur.executemany(
                "INSERT INTO endpoints (relay, public_key, endpoint) VALUES (%s, %s, %s) "
                "ON CONFLICT (relay, public_key) DO UPDATE SET "
                "endpoint = excluded.endpoint, updated = now()",
                [(relay, key, endpoint) for key, endpoint in changed.items()],
            )

    # -- relays and presence -------------------------------------------------------

    def register_relay(
        self, public_key: str, name: str, endpoint: str | None, routes: Iterable[str] = ()
    ) -> None:
        """Record (or refresh) a relay of this network, with the routes its
        configuration pushes, and tell every relay (MESH_CHANNEL)."""
        with self._cursor() as cur:
            cur.execute(
                "INSERT INTO relays (network, public_key, name, endpoint, routes) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (network, public_key) DO UPDATE SET name = excluded.name, "
                "endpoint = excluded.endpoint, routes = excluded.routes, updated = now()",
                (self.network, public_key, name, endpoint, list(routes)),
            )
            cur.execute("SELECT pg_notify(%s, %s)", (MESH_CHANNEL, self.network))

    def relay_rows(self) -> list[tuple[str, str, str | None, tuple[str, ...]]]:
        """The relays of this network: (public key, name, endpoint, routes)."""
        rows = self._rows(
            "SELECT public_key, name, endpoint, routes FROM relays WHERE network = %s "
            "ORDER BY name",
            (self.network,),
        )
        return [
            (str(k), str(n), None if e is None else str(e), tuple(str(r) for r in routes or ()))
            for k, n, e, routes in rows
        ]

    def relay_alive(self, public_key: str, clock: float) -> None:
        """Record that relay `public_key` is alive now, its clock reading `clock` (Unix
        seconds): the offset from the database's clock is kept for `gtun doctor`."""
        self._exec(
            "UPDATE relays SET seen = now(), clock_offset = %s - extract(epoch FROM now()) "
            "WHERE network = %s AND public_key = %s",
            [(clock, self.network, public_key)],
        )

    def relay_health(self) -> list[RelayHealth]:
        """Every relay of this network with the age of its last heartbeat and its clock
        offset then (both None before its first heartbeat), by the database's clock."""
        rows = self._rows(
            "SELECT name, public_key, endpoint, extract(epoch FROM now() - seen), "
            "clock_offset FROM relays WHERE network = %s ORDER BY name",
            (self.network,),
        )
        return [
            RelayHealth(
                str(n),
                str(k),
                None if e is None else str(e),
                None if age is None else float(age),
                None if off is None else float(off),
            )
            for n, k, e, age, off in rows
        ]

    def clock(self) -> float:
        """The database server's clock, in Unix seconds."""
        rows = self._rows("SELECT extract(epoch FROM now())")
        return float(rows[0][0])

    def relays(self) -> list[tuple[str, str, str | None]]:
        """The relays of this network: (public key, name, endpoint)."""
        rows = self._rows(
            "SELECT public_key, name, endpoint FROM relays WHERE network = %s ORDER BY name",
            (self.network,),
        )
        return [(str(k), str(n), None if e is None else str(e)) for k, n, e in rows]

    def heartbeat(
        self, relay: str, peers: Iterable[str], ttl: float, *, notify: bool = False
    ) -> None:
        """Say that `relay` holds the sessions of `peers` now, for `ttl` seconds.  Times
        are the database server's, so relays' clocks do not matter.  With `notify`, tell
        every relay (MESH_CHANNEL): a session that moved here."""
        with self._cursor() as cur:
            cur.executemany(
                "INSERT INTO presence (network, public_key, relay, heartbeat, expires) "
                "VALUES (%s, %s, %s, now(), now() + make_interval(secs => %s)) "
                "ON CONFLICT (network, public_key) DO UPDATE SET relay = excluded.relay, "
                "heartbeat = excluded.heartbeat, expires = excluded.expires",
                [(self.network, key, relay, ttl) for key in peers],
            )
            if notify:
                cur.execute("SELECT pg_notify(%s, %s)", (MESH_CHANNEL, self.network))

    def presence(self) -> dict[str, str]:
        """Peer public key to the relay holding its session, for unexpired heartbeats."""
        rows = self._rows(
            "SELECT public_key, relay FROM presence WHERE network = %s AND expires > now()",
            (self.network,),
        )
        return {str(k): str(r) for k, r in rows}

    # -- traffic history, sources, settings --------------------------------------------

    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        """`sql` for each of `rows` in one transaction of its own (no lease lock: rows
        are upserted in a fixed order, so two relays writing at once queue on the row
        locks and never deadlock)."""
        with self._cursor() as cur:
            cur.executemany(sql, rows)

    def add_traffic(self, deltas: Iterable[tuple[str, int, int]], now: float) -> None:
        """Add each (public key, rx bytes, tx bytes) into the buckets of every period
        holding `now`, in one transaction (several relays may add into one bucket);
        prune buckets older than KEEP (at most once every PRUNE_INTERVAL)."""
        # Sorted: two relays adding at once lock the rows in one order, never deadlock.
        rows = [(self.network, *row) for row in bucket_rows(sorted(deltas), now)]
        prune = now - self._pruned >= PRUNE_INTERVAL
        with self._cursor() as cur:
            cur.executemany(
                "INSERT INTO traffic (network, public_key, period, start, rx, tx) "
                "VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (network, public_key, period, start) DO UPDATE SET "
                "rx = traffic.rx + excluded.rx, tx = traffic.tx + excluded.tx",
                rows,
            )
            if prune:
                cur.executemany(
                    "DELETE FROM traffic WHERE network = %s AND period = %s AND start < %s",
                    [(self.network, p, now - KEEP[p]) for p in PERIODS],
                )
                cur.execute(
                    "DELETE FROM sources WHERE network = %s AND last_seen < %s",
                    (self.network, now - SOURCES_KEEP),
                )
        if prune:  # committed
            self._pruned = now

    def traffic(self, public_key: str, period: str, since: float) -> list[tuple[float, int, int]]:
        """The (bucket start, rx, tx) of `public_key`'s `period` buckets starting at or
        after `since`, oldest first.  Raises ValueError for an unknown period."""
        check_period(period)
        rows = self._rows(
            "SELECT start, rx, tx FROM traffic WHERE network = %s AND public_key = %s "
            "AND period = %s AND start >= %s ORDER BY start",
            (self.network, public_key, period, since),
        )
        return [(float(s), int(rx), int(tx)) for s, rx, tx in rows]

    def totals(self, period: str, start: float) -> dict[str, tuple[int, int]]:
        """Every peer's (rx, tx) in the `period` bucket starting at `start`.  Raises
        ValueError for an unknown period."""
        check_period(period)
        rows = self._rows(
            "SELECT public_key, rx, tx FROM traffic WHERE network = %s AND period = %s "
            "AND start = %s",
            (self.network, period, start),
        )
        return {str(k): (int(rx), int(tx)) for k, rx, tx in rows}

    def note_sources(self, relay: str, seen: Iterable[tuple[str, str, str]], now: float) -> None:
        """Record that each (public key, endpoint, transport) was seen at `relay` now
        (its first_seen kept); keep the MAX_SOURCES most recent per peer."""
        rows = sorted(set(seen))
        if not rows:
            return
        keys = sorted({r[0] for r in rows})
        with self._cursor() as cur:
            cur.executemany(
                "INSERT INTO sources (network, public_key, endpoint, transport, relay, "
                "first_seen, last_seen) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (network, public_key, endpoint, transport, relay) "
                "DO UPDATE SET last_seen = greatest(sources.last_seen, "
                "excluded.last_seen)",
                [(self.network, k, e, t, relay, now, now) for k, e, t in rows],
            )
            cur.executemany(
                "DELETE FROM sources WHERE network = %s AND public_key = %s "
                "AND (endpoint, transport, relay) NOT IN ("
                "SELECT endpoint, transport, relay FROM sources WHERE network = %s "
                "AND public_key = %s ORDER BY last_seen DESC, endpoint LIMIT %s)",
                [(self.network, k, self.network, k, MAX_SOURCES) for k in keys],
            )

    def sources(self, public_key: str) -> list[Source]:
        """The endpoints `public_key` came from (at any relay), the most recent first."""
        rows = self._rows(
            "SELECT endpoint, transport, relay, first_seen, last_seen FROM sources "
            "WHERE network = %s AND public_key = %s ORDER BY last_seen DESC, endpoint",
            (self.network, public_key),
        )
        return [Source(str(e), str(t), str(r), float(f), float(ls)) for e, t, r, f, ls in rows]

    def get_setting(self, name: str) -> str | None:
        """The setting `name` of this network, or None if unset."""
        rows = self._rows(
            "SELECT value FROM settings WHERE network = %s AND name = %s", (self.network, name)
        )
        return str(rows[0][0]) if rows else None

    def set_setting(self, name: str, value: str) -> None:
        """Set the setting `name` of this network to `value`."""
        self._write(
            "INSERT INTO settings (network, name, value) VALUES (%s, %s, %s) "
            "ON CONFLICT (network, name) DO UPDATE SET value = excluded.value",
            [(self.network, name, value)],
        )

    # -- live sessions and relays' stats ---------------------------------------------

    def publish_live(self, relay: str, rows: Iterable[LiveRow], stats: dict[str, Any]) -> None:
        """The sessions relay `relay` (its name) holds now, one row per peer (the
        latest writer wins), and its stats (a JSON object) in its relays row, in one
        transaction."""
        values = [
            (
                self.network,
                r.public_key,
                relay,
                r.endpoint,
                r.transport,
                r.last_handshake,
                r.rx_bytes,
                r.tx_bytes,
            )
            for r in sorted(rows, key=lambda r: r.public_key)
        ]
        with self._cursor() as cur:
            cur.executemany(
                "INSERT INTO live (network, public_key, relay, endpoint, transport, "
                "last_handshake, rx_bytes, tx_bytes) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (network, public_key) DO UPDATE SET "
                "relay = excluded.relay, endpoint = excluded.endpoint, "
                "transport = excluded.transport, "
                "last_handshake = excluded.last_handshake, "
                "rx_bytes = excluded.rx_bytes, tx_bytes = excluded.tx_bytes, "
                "updated = now()",
                values,
            )
            cur.execute(
                "UPDATE relays SET stats = %s WHERE network = %s AND name = %s",
                (Jsonb(stats), self.network, relay),
            )
            # Rows of peers gone (removed, or held nowhere) for a day: the
            # table stays about as large as the peers held now.
            cur.execute(
                "DELETE FROM live WHERE network = %s AND relay = %s "
                "AND updated < now() - make_interval(secs => %s)",
                (self.network, relay, LIVE_KEEP),
            )

    def live(self) -> dict[str, LiveRow]:
        """The live rows updated within LIVE_FRESH, by peer public key."""
        rows = self._rows(
            "SELECT public_key, relay, endpoint, transport, last_handshake, rx_bytes, "
            "tx_bytes, extract(epoch FROM updated) FROM live WHERE network = %s "
            "AND updated > now() - make_interval(secs => %s)",
            (self.network, LIVE_FRESH),
        )
        return {
            str(k): LiveRow(
                str(k),
                str(r),
                None if e is None else str(e),
                None if t is None else str(t),
                None if h is None else float(h),
                int(rx),
                int(tx),
                float(u),
            )
            for k, r, e, t, h, rx, tx, u in rows
        }

    def relay_stats(self) -> list[tuple[str, str, str | None, float | None, dict[str, Any]]]:
        """Every relay of this network: (name, public key, endpoint, seconds since its
        last heartbeat or None, its last published stats or {})."""
        rows = self._rows(
            "SELECT name, public_key, endpoint, extract(epoch FROM now() - seen), stats "
            "FROM relays WHERE network = %s ORDER BY name",
            (self.network,),
        )
        return [
            (
                str(n),
                str(k),
                None if e is None else str(e),
                None if age is None else float(age),
                dict(stats) if isinstance(stats, dict) else {},
            )
            for n, k, e, age, stats in rows
        ]

    # -- import ----------------------------------------------------------------------

    def import_state(self, source: StateStore, relay: str) -> ImportSummary:
        """Copy a single relay's SQLite state (peers, leases, the endpoints `relay`
        stored) into this network, in one transaction.  Rows already here are left as
        they are, so a second run changes nothing; a lease whose address another key
        holds here, or outside the network, is skipped."""
        summary = ImportSummary()
        network = IPv4Network(self.network)
        peers, leases = source.peers(), source.lease_rows()
        endpoints = source.endpoints(relay)
        with self.transaction():
            for peer in peers:
                rows = self._rows(
                    "INSERT INTO peers (network, name, public_key, address, subnets, "
                    "enabled, preshared_key, quota, disabled_reason) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT DO NOTHING RETURNING 1",
                    (
                        self.network,
                        peer.name,
                        peer.public_key,
                        peer.address,
                        list(peer.subnets),
                        peer.enabled,
                        peer.preshared_key,
                        peer.quota,
                        peer.disabled_reason,
                    ),
                )
                if rows:
                    summary.peers += 1
                else:
                    summary.peers_there += 1
            held = self.leases()
            for key, address, name in leases:
                if held.get(key) == address:
                    summary.leases_there += 1
                    continue
                try:
                    inside = IPv4Address(address) in network
                except ValueError:
                    inside = False
                rows = (
                    self._rows(
                        "INSERT INTO leases (network, public_key, address, name) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                        (self.network, key, address, name),
                    )
                    if inside
                    else []
                )
                if rows:
                    summary.leases += 1
                else:
                    summary.leases_skipped += 1
            for key, endpoint in endpoints.items():
                rows = self._rows(
                    "INSERT INTO endpoints (relay, public_key, endpoint) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING RETURNING 1",
                    (relay, key, endpoint),
                )
                if rows:
                    summary.endpoints += 1
                else:
                    summary.endpoints_there += 1
            if summary.peers:
                self._notify()
        return summary

    # -- life --------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; further calls raise RuntimeFailure."""
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class StoreWatch:
    """A connection of its own that LISTENs for changes to a network's peers, in a
    thread of its own (the event loop never waits for it).

    It calls, from its thread: `on_change()` for each notification of this network's
    peers; `on_mesh()` (when given) for each of its relays or presence;
    `on_state(up, error)` after every connection attempt and liveness check (up: the
    store answers; else `error` says why), so the caller can act on the transitions.
    After a lost connection it reconnects with backoff (WATCH_BACKOFF), LISTENs again,
    and reports up: what was missed meanwhile is the caller's to catch up with (a
    reload).  The callbacks must not raise or block.
    """

    def __init__(
        self,
        dsn: str,
        network: str,
        on_change: Callable[[], None],
        on_state: Callable[[bool, str | None], None],
        on_mesh: Callable[[], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.network = network
        self.on_change = on_change
        self.on_state = on_state
        self.on_mesh = on_mesh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gtun-store-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = WATCH_BACKOFF[0]
        while not self._stop.is_set():
            try:
                conn = _connect(self.dsn)
            except StoreUnavailable as exc:
                self.on_state(False, str(exc))
                self._stop.wait(delay)
                delay = min(delay * 2, WATCH_BACKOFF[1])
                continue
            try:
                with conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if self.on_mesh is not None:
                        conn.execute(f"LISTEN {MESH_CHANNEL}")
                    delay = WATCH_BACKOFF[0]
                    self.on_state(True, None)
                    self._listen(conn)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    self.on_state(
                        False, f"store {redact(self.dsn)} is unavailable: {_first_line(exc)}"
                    )
                    self._stop.wait(delay)

    def _listen(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Deliver notifications until stopped; raises psycopg.Error when the
        connection is lost (a liveness check every WATCH_PING catches a silent one)."""
        pinged = 0.0
        while not self._stop.is_set():
            for note in conn.notifies(timeout=WATCH_POLL):
                if note.payload != self.network:
                    continue
                if note.channel == MESH_CHANNEL:
                    if self.on_mesh is not None:
                        self.on_mesh()
                else:
                    self.on_change()
            pinged += WATCH_POLL
            if pinged >= WATCH_PING:
                pinged = 0.0
                conn.execute("SELECT 1")
                self.on_state(True, None)
