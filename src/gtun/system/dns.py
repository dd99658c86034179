"""The pushed DNS servers, applied for the duration of a full tunnel and taken back.

With `resolvconf` when it is installed (as wg-quick), otherwise by rewriting
/etc/resolv.conf in place: opened and truncated, never renamed, because under `ip netns
exec` it is a bind mount of /etc/netns/<ns>/resolv.conf (and may be a symlink
elsewhere).  When /etc/resolv.conf is itself a mount point (`ip netns exec`, containers)
the file is rewritten even if resolvconf exists, since resolvconf's files are the
host's.  The original is put back only if the file still holds what gtun wrote; a newer
change by someone else is left alone.  A `DnsChange` records what was done, so that the
state file of a full tunnel can take it back after a crash.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from gtun.errors import RuntimeFailure
from gtun.system.tools import run_tool

log = logging.getLogger("gtun")

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVCONF_TIMEOUT = 10.0  # seconds

Address = IPv4Address | IPv6Address


@dataclass
class DnsChange:
    """How the pushed DNS servers were applied, and how to take them back."""

    method: str  # "file" or "resolvconf"
    path: str = ""  # file: the resolv.conf rewritten in place
    original: str | None = None  # file: its bytes (latin-1), None if it did not exist
    written: str = ""  # file: what gtun wrote
    interface: str = ""  # resolvconf: the record name given to resolvconf -a


def render_resolv(dns: Iterable[Address], config_name: str) -> str:
    lines = [
        f"# Written by the gtun client {config_name} for its full tunnel; the original "
        "comes back when it stops.",
        *(f"nameserver {d}" for d in dns),
    ]
    return "\n".join(lines) + "\n"


def is_mount_point(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> bool:
    """Whether `path` is a mount point in this process's mount namespace (as
    /etc/resolv.conf is under `ip netns exec` and in containers)."""
    try:
        text = mountinfo.read_text()
    except OSError:
        return False
    target = str(path)
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and _unescape_mount(fields[4]) == target:
            return True
    return False


def _unescape_mount(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(text):
        code = text[i + 1 : i + 4]
        if text[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def dns_method(resolv: Path = RESOLV_CONF) -> str:
    """ "resolvconf" when it is installed and resolv.conf is not a private mount,
    otherwise "file"."""
    if shutil.which("resolvconf") is not None and not is_mount_point(resolv):
        return "resolvconf"
    return "file"


def _read_bytes(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("latin-1")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RuntimeFailure(f"cannot read {path}: {exc.strerror or exc}") from exc


def write_in_place(path: Path, text: str) -> None:
    """Replace the contents of `path` without replacing the file itself (a bind mount
    or a symlink target stays what it is).  Raises RuntimeFailure."""
    data = text.encode("latin-1")
    try:
        # O_RDWR without O_TRUNC: the same inode, emptied only by truncate() below.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b") as f:
            f.seek(0)
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {path}: {exc.strerror or exc}") from exc


def _resolvconf(args: list[str], stdin: str | None, what: str) -> None:
    result = run_tool(["resolvconf", *args], what, stdin=stdin, timeout=RESOLVCONF_TIMEOUT)
    if result.returncode != 0:
        message = result.stderr.strip().replace("\n", " ") or f"exit {result.returncode}"
        raise RuntimeFailure(f"{what}: resolvconf: {message}")


def plan_dns(
    dns: Sequence[Address], device: str, config_name: str, resolv: Path
) -> DnsChange | None:
    """Decide how to apply `dns`, reading what it will replace.  Changes nothing."""
    if not dns:
        return None
    if dns_method(resolv) == "resolvconf":
        return DnsChange("resolvconf", interface=f"tun.{device}")
    written = render_resolv(dns, f"{config_name} (pid {os.getpid()})")
    return DnsChange("file", path=str(resolv), original=_read_bytes(resolv), written=written)


def apply_dns(change: DnsChange, dns: Sequence[Address]) -> None:
    """Raises RuntimeFailure."""
    if change.method == "resolvconf":
        _resolvconf(
            ["-a", change.interface, "-m", "0", "-x"],
            "".join(f"nameserver {d}\n" for d in dns),
            "cannot apply the pushed DNS servers",
        )
    else:
        write_in_place(Path(change.path), change.written)


def restore_dns(change: DnsChange) -> str:
    """Take back what `apply_dns` did; returns what was done, for the log.

    Raises RuntimeFailure."""
    if change.method == "resolvconf":
        _resolvconf(["-d", change.interface, "-f"], None, "cannot remove the DNS servers")
        return f"removed DNS record {change.interface} from resolvconf"
    path = Path(change.path)
    current = _read_bytes(path)
    if current == change.original:
        return f"{path} was unchanged"
    if current != change.written:
        log.warning("%s was changed by someone else since gtun wrote it; left as it is", path)
        return f"{path} left as changed by someone else"
    if change.original is None:
        try:
            path.unlink()
        except OSError as exc:
            raise RuntimeFailure(f"cannot remove {path}: {exc.strerror or exc}") from exc
    else:
        write_in_place(path, change.original)
    return f"restored {path}"
