"""Journals of what a daemon changed on the machine, so that the next run can undo what
a killed one left (SIGKILL, a crash, a power cut).

Theory of operation
-------------------
Before a daemon changes anything it cannot take back by closing a descriptor (a sysctl,
an nftables table, a routing rule), it writes what it is about to change and the values
it found to a journal file in its state directory: a temporary file, fsync, rename over
the old one, fsync the directory, so that the file is either the old or the new whole.
A clean exit undoes the changes and removes the file.  The next start finds a file
only when a run did not exit cleanly; unless the process that wrote it still runs, it
undoes what the file lists (each step tolerating "already gone"), says so in one line
and removes the file.

The client's full tunnel (fulltunnel.py) keeps its routing rules, table and DNS this
way; the relay (`HostChanges` below) its forwarding sysctls and NAT table.  Devices need
no journal: a TUN device dies with the process that holds it, and with it its
addresses and routes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gtun.errors import RuntimeFailure
from gtun.system.nft import read_sysctl, run_nft, write_sysctl

log = logging.getLogger("gtun")

PROC_SYS = Path("/proc/sys")
HOST_JOURNAL_VERSION = 1
# The sysctls a relay may change (relative to /proc/sys): nothing else is written back
# from a journal, whatever the file says.
RELAY_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding")


def write_atomic(path: Path, text: str, what: str) -> None:
    """Write `text` to `path` so that it survives a crash or power loss: a temporary
    file, fsync, rename over the old one, fsync the directory.  Raises RuntimeFailure
    naming `what` and the file."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise RuntimeFailure(f"cannot write the {what} {path}: {exc.strerror or exc}") from exc


def read_text(path: Path, what: str) -> str | None:
    """The text of `path`, or None when there is none.  Raises RuntimeFailure."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuntimeFailure(f"cannot read the {what} {path}: {exc}") from exc


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def pid_is_gtun(pid: int) -> bool:
    """Whether `pid` is a live gtun process other than this one (a zombie is not)."""
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"gtun" in cmdline


# ---------------------------------------------------------------------------
# The relay's host changes


def host_journal_path(state_dir: Path, config_file: Path) -> Path:
    """Where the relay configured by `config_file` records its changes to the host."""
    return state_dir / f"host-{config_file.stem}.json"


@dataclass
class HostChanges:
    """What a relay changes on its host: sysctls (relative to /proc/sys, with the value
    found before) and its nftables table (None: none)."""

    pid: int
    config: str
    sysctls: dict[str, str] = field(default_factory=dict)
    nft_table: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = HOST_JOURNAL_VERSION
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> HostChanges:
        """Raises ValueError for anything but a journal this version wrote."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != HOST_JOURNAL_VERSION:
                raise ValueError(f"not a version {HOST_JOURNAL_VERSION} journal")
            sysctls = data["sysctls"]
            table = data.get("nft_table")
            if not isinstance(sysctls, dict) or not isinstance(data["pid"], int):
                raise TypeError("bad fields")
            for name, value in sysctls.items():
                if name not in RELAY_SYSCTLS or value not in ("0", "1", "2"):
                    raise ValueError(f"damaged journal: sysctl {name} = {value!r}")
            if table is not None and (not isinstance(table, str) or not table.startswith("gtun_")):
                raise ValueError(f"damaged journal: unexpected nftables table {table!r}")
            return cls(int(data["pid"]), str(data["config"]), dict(sysctls), table)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"damaged journal: {exc}") from exc


def record_host(path: Path, changes: HostChanges) -> None:
    """On disk before anything changes.  Raises RuntimeFailure."""
    write_atomic(path, changes.to_json(), "relay's journal")


def recover_host(path: Path, proc_sys: Path = PROC_SYS) -> bool:
    """Undo what a relay that did not exit cleanly left, as its journal `path` lists;
    whether there was anything.  Raises RuntimeFailure when another gtun relay still
    owns the journal, when it is damaged, or when something could not be undone (the
    file is kept, so the next start tries again)."""
    text = read_text(path, "relay's journal")
    if text is None:
        return False
    try:
        changes = HostChanges.from_json(text)
    except ValueError as exc:
        raise RuntimeFailure(
            f"{path}: {exc}; check net.ipv4.ip_forward and `nft list tables` by hand, "
            "then remove it"
        ) from exc
    if pid_is_gtun(changes.pid):
        raise RuntimeFailure(
            f"another gtun relay (pid {changes.pid}, {changes.config}) uses the journal "
            f"{path}: stop it first"
        )
    done: list[str] = []
    problems: list[str] = []
    if changes.nft_table is not None:
        ref = f"inet {changes.nft_table}"
        try:
            run_nft(["-f", "-"], f"table {ref}\ndelete table {ref}\n", "cannot remove " + ref)
            done.append(f"nftables table {changes.nft_table} removed")
        except RuntimeFailure as exc:
            problems.append(str(exc))
    for name, old in changes.sysctls.items():
        try:
            if read_sysctl(proc_sys / name) != old:
                write_sysctl(proc_sys / name, old)
            done.append(f"{name.replace('/', '.')} back to {old}")
        except RuntimeFailure as exc:
            problems.append(str(exc))
    if problems:
        raise RuntimeFailure(
            f"cannot undo what an earlier run left (journal {path}): {'; '.join(problems)}"
        )
    remove(path)
    log.warning(
        "an earlier run (pid %d) did not exit cleanly; undid what it left: %s",
        changes.pid,
        "; ".join(done) or "nothing was left",
    )
    return True
