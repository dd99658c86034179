"""A throwaway PostgreSQL server for tests and benchmarks: Debian's `postgresql` binaries
run by an unprivileged user in a fresh folder, listening only on a Unix socket in that
folder, removed again when it stops.

As root the server runs as the `postgres` user (the folder is made theirs); as anyone
else it runs as the caller.  Authentication is `trust`: only whoever may enter the
folder (mode 0700, its owner, and root) can reach the socket.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PostgresServer", "find_bindir", "postgres_server"]

START_TIMEOUT = 30.0  # seconds pg_ctl waits for the server to accept connections
STOP_TIMEOUT = 20.0
PORT = 5432  # only names the socket file (.s.PGSQL.5432); no TCP port is opened


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/N/bin),
    or None."""
    env = os.environ.get("GTUN_PG_BINDIR")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    root = Path("/usr/lib/postgresql")
    found = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


class PostgresServer:
    """One server in its own folder.  start() and stop() may be called again (a test of
    the store going away); close() stops it and removes the folder."""

    def __init__(self, bindir: Path | None = None, user: str = "postgres") -> None:
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed (apt install postgresql)")
        self.bindir = found
        self.folder = Path(tempfile.mkdtemp(prefix="gtpg-"))
        self.data = self.folder / "data"
        self.socket_dir = self.folder
        self._as: list[str] = []
        if os.geteuid() == 0:
            entry = pwd.getpwnam(user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", user, "--"]
        os.chmod(self.folder, 0o700)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-instructions",
            timeout=60.0,
        )

    def _run(self, tool: str, *args: str, timeout: float) -> None:
        cmd = [*self._as, str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}")

    @property
    def dsn(self) -> str:
        """A libpq URI for the `postgres` database over the Unix socket."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    def start(self) -> None:
        # No TCP (listen_addresses empty), no fsync (a test's data need not survive
        # a power cut), and few processes on a small machine.
        options = (
            f"-c listen_addresses='' -k {self.socket_dir} -p {PORT} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40 "
            "-c shared_buffers=16MB"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "log"),
            "-o",
            options,
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
            timeout=START_TIMEOUT + 5,
        )

    def stop(self) -> None:
        """Stop the server (fast: connections are cut), if it runs."""
        if not (self.data / "postmaster.pid").exists():
            return
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "-t",
            str(int(STOP_TIMEOUT)),
            "stop",
            timeout=STOP_TIMEOUT + 5,
        )

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its DSN."""
        self._run(
            "psql",
            "-h",
            str(self.socket_dir),
            "-p",
            str(PORT),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            f'CREATE DATABASE "{name}"',
            timeout=30.0,
        )
        return self.dsn_for(name)

    def close(self) -> None:
        """Stop the server and remove its folder, whatever state it is in."""
        try:
            self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            # Last resort: the postmaster's pid, from its own file.
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, 9)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(bindir: Path | None = None) -> Iterator[PostgresServer]:
    """A started server, stopped and removed when the block ends, even on failure."""
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.close()
