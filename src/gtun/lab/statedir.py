"""A relay's state directory made read-only or full, for bench/faults.py and the tests,
without touching the host: the relay runs in a private mount namespace (`unshare -m`,
mounts private) where its state directory is a bind mount of itself (made read-only on
demand) or a small tmpfs holding a copy of it (filled on demand).  Every mount lives and
dies with that namespace, that is with the relay.

    wrap = readonly_wrap(state)            # the command prefix for GtunNet.start_relay
    net.start_relay(wrap=wrap) ... make_readonly(pid, state)
"""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
from pathlib import Path

UNSHARE = ("unshare", "--mount", "--propagation", "private")


def _wrap(setup: str) -> list[str]:
    """A command prefix: run `setup` (shell) in a new private mount namespace, then exec
    the command that follows the prefix there."""
    return [*UNSHARE, "sh", "-c", f'{setup} && exec "$@"', "sh"]


def bind_wrap(state: Path, *, readonly: bool = False) -> list[str]:
    """The state directory bound over itself (read-only at once with `readonly`)."""
    d = shlex.quote(str(state))
    setup = f"mkdir -p {d} && mount --bind {d} {d}"
    if readonly:
        setup += f" && mount -o remount,bind,ro {d}"
    return _wrap(setup)


def tmpfs_wrap(state: Path, copy: Path, *, size_kb: int = 512, full: bool = False) -> list[str]:
    """A tmpfs of `size_kb` over the state directory, holding a copy of `copy` (a
    directory); with `full`, filled up before the relay starts."""
    d, c = shlex.quote(str(state)), shlex.quote(str(copy))
    setup = (
        f"mkdir -p {d} && mount -t tmpfs -o size={size_kb}k,mode=0700 gtunstate {d} "
        f"&& cp -a {c}/. {d}/"
    )
    if full:
        setup += f" && {{ {fill_command(state)} ; true; }}"
    return _wrap(setup)


def fill_command(state: Path) -> str:
    return f"dd if=/dev/zero of={shlex.quote(str(state / 'filler'))} bs=4096 2>/dev/null"


def in_mounts_of(pid: int, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in the mount namespace of process `pid` (the wrapped relay)."""
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-m", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def make_readonly(pid: int, state: Path) -> None:
    """The relay's state directory read-only from now on (bind_wrap): a read-only bind
    mount stacked over it, since a mount with files open for writing cannot be
    remounted read-only.  Every file created or opened from now on is read-only (SQLite's
    journal among them), as after an emergency remount."""
    d = str(state)
    out = in_mounts_of(pid, ["mount", "--bind", "-o", "ro", d, d])
    if out.returncode:
        raise RuntimeError(f"cannot make {state} read-only: {out.stderr.strip()}")


def fill(pid: int, state: Path) -> None:
    """Fill the relay's tmpfs state directory (tmpfs_wrap) to the last byte."""
    in_mounts_of(pid, ["sh", "-c", fill_command(state)])


def leases_seen_by(pid: int | None, db: Path) -> dict[str, str]:
    """The leases in `db` (public key to address), read-only, as the process `pid`
    sees the file (through its mount namespace; None: as this process sees it)."""
    if pid is None:
        uri = f"file:{db}?mode=ro"
        with sqlite3.connect(uri, uri=True) as conn:
            return {
                str(k): str(a) for k, a in conn.execute("SELECT public_key, address FROM leases")
            }
    out = in_mounts_of(
        pid,
        [
            "sqlite3",
            "-readonly",
            "-separator",
            " ",
            str(db),
            "SELECT public_key, address FROM leases",
        ],
    )
    if out.returncode:
        raise RuntimeError(f"cannot read {db}: {out.stderr.strip()}")
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if line)
