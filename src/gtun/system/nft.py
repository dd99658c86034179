"""The relay's packet forwarding and NAT, both undoable.

`Forwarding` turns on IP forwarding and remembers what was there before.  `Nat`
installs one nftables table of its own (so removing it cannot touch anyone else's
rules) that masquerades the clients' traffic leaving by another interface.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from gtun.errors import ConfigError, RuntimeFailure
from gtun.system.tools import run_tool

NFT = "nft"
NFT_TIMEOUT = 10.0  # seconds

# Interface names nft is given inside a quoted string; the kernel allows more, but a
# gtun device name never needs it.
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")


class Forwarding:
    """IPv4 (and optionally IPv6) forwarding, restored on `restore()`."""

    def __init__(self, proc_sys: Path = Path("/proc/sys")) -> None:
        self.proc_sys = proc_sys
        self.ipv4_path = proc_sys / "net/ipv4/ip_forward"
        self.ipv6_path = proc_sys / "net/ipv6/conf/all/forwarding"
        self._saved: dict[Path, str] = {}

    def enable(
        self, ipv6: bool = False, record: Callable[[dict[str, str]], None] | None = None
    ) -> None:
        """Set forwarding to 1.  `record`, before anything is written, is given the
        values found (sysctl path relative to /proc/sys: old value) of those that will
        change, for a journal (journal.py).  Raises RuntimeFailure naming the file, or
        what `record` raises (then nothing changed)."""
        paths = [self.ipv4_path] + ([self.ipv6_path] if ipv6 else [])
        found = {path: read_sysctl(path) for path in paths}
        if record is not None:
            record(
                {
                    str(path.relative_to(self.proc_sys)): old
                    for path, old in found.items()
                    if old != "1"
                }
            )
        for path, old in found.items():
            if path not in self._saved:
                self._saved[path] = old
            if old != "1":
                write_sysctl(path, "1")

    def restore(self) -> None:
        """Write back the values found by `enable()`.  Idempotent."""
        first: RuntimeFailure | None = None
        while self._saved:
            path, old = self._saved.popitem()
            try:
                if read_sysctl(path) != old:
                    write_sysctl(path, old)
            except RuntimeFailure as exc:
                first = first or exc
        if first is not None:
            raise first


def read_sysctl(path: Path) -> str:
    """A /proc/sys value, stripped.  Raises RuntimeFailure naming the file."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise RuntimeFailure(f"cannot read {path}: {exc.strerror or exc}") from exc


def write_sysctl(path: Path, value: str) -> None:
    """Write a /proc/sys value.  Raises RuntimeFailure naming the file."""
    try:
        path.write_text(value + "\n")
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {value} to {path}: {exc.strerror or exc}") from exc


def table_name(device: str) -> str:
    """The nftables table gtun uses for `device`: gtun_<device>, sanitized."""
    return "gtun_" + re.sub(r"[^A-Za-z0-9_]", "_", device)


class Nat:
    """Masquerade traffic from `networks` that leaves by any interface but `device`.

    Raises ConfigError for a device name nft cannot be given safely.
    """

    family = "inet"

    def __init__(self, device: str, networks: list[IPv4Network | IPv6Network]) -> None:
        if not _DEVICE_RE.match(device):
            raise ConfigError(f"invalid device name {device!r} for NAT")
        self.device = device
        self.networks = list(networks)
        self.table = table_name(device)

    def ruleset(self) -> str:
        """The nft script `apply()` runs: it replaces any table of the same name."""
        ref = f"{self.family} {self.table}"
        rules = []
        for version, match in ((4, "ip"), (6, "ip6")):
            nets = [str(n) for n in self.networks if n.version == version]
            if nets:
                rules.append(
                    f"        {match} saddr {{ {', '.join(nets)} }} "
                    f'oifname != "{self.device}" masquerade'
                )
        # "table X" then "delete table X" removes a stale table, if any, without failing
        # when there is none; the whole script is applied as one transaction.
        return "\n".join(
            [
                f"table {ref}",
                f"delete table {ref}",
                f"table {ref} {{",
                "    chain postrouting {",
                "        type nat hook postrouting priority 100; policy accept;",
                *rules,
                "    }",
                "}",
                "",
            ]
        )

    def apply(self) -> None:
        """Install the table (replacing a stale one).  Raises RuntimeFailure."""
        run_nft(["-f", "-"], self.ruleset(), f"cannot install NAT table {self.table}")

    def remove(self) -> None:
        """Delete the table; no error if it is not there.  Raises RuntimeFailure."""
        ref = f"{self.family} {self.table}"
        run_nft(
            ["-f", "-"], f"table {ref}\ndelete table {ref}\n", f"cannot remove table {self.table}"
        )

    def active(self) -> bool:
        """Whether the table is installed.  Raises RuntimeFailure if nft cannot run."""
        result = _run_nft(["list", "table", self.family, self.table], None, "cannot query nft")
        return result.returncode == 0


def _run_nft(args: list[str], stdin: str | None, what: str) -> subprocess.CompletedProcess[str]:
    return run_tool(
        [NFT, *args], what, stdin=stdin, timeout=NFT_TIMEOUT, install="apt install nftables"
    )


def run_nft(args: list[str], stdin: str | None, what: str) -> None:
    result = _run_nft(args, stdin, what)
    if result.returncode != 0:
        # nft prints "Error: ..." lines, each followed by the offending line and a caret.
        errors = [line.strip() for line in result.stderr.splitlines() if "Error:" in line]
        message = "; ".join(errors) or result.stderr.strip().replace("\n", " ")
        raise RuntimeFailure(f"{what}: {message or f'nft exited with {result.returncode}'}")
