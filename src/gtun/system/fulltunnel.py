"""Full-tunnel exit (`default_route = true`): all of a client's traffic through the relay.

Theory of operation (as wg-quick does it)
-----------------------------------------
Every socket the client uses to reach the relay carries a firewall mark M (SO_MARK,
`mark_socket`).  A routing table T of its own (the first free table from 51820; M = T)
holds one route, `default dev <device>`, and two rules per family send traffic to it:

    32764:  from all lookup main suppress_prefixlength 0
    32765:  from all not fwmark M lookup T

The first consults the main table but ignores an answer that is a default route, so the
networks on the client's own links (and any other specific route) keep working; every
other destination falls to the second rule, which sends unmarked packets into the tunnel.
The relay's own endpoint is reached by the marked packets, which skip T and find the main
table's default route as before.

With strict reverse-path filtering the relay's answers would be dropped (their source is
routed into the tunnel).  As wg-quick, an nftables table copies the mark to the
connection on the way out and back onto the answers on the way in, and
net.ipv4.conf.all.src_valid_mark = 1 lets the reverse-path check see it.  The same table
drops packets for the tunnel address that arrive by any other interface.

IPv6 never leaks: when the relay pushes no IPv6 address, T holds an `unreachable` IPv6
default route instead, so IPv6 to anything but the client's own links fails at once
(programs fall back to IPv4 through the tunnel) rather than leaving by the local network.

DNS: the pushed servers are applied for the duration (dnsconf.py: resolvconf, or
/etc/resolv.conf rewritten in place).

Crash safety: before changing anything, everything that will be changed (rules, routes,
table, the sysctl's old value, the nftables table, the original resolv.conf) is written
to a state file (fsync'd, atomically replaced).  A clean exit undoes it all and removes the
file; the next start after a crash or reboot undoes what the file lists (each undo step
tolerates "already gone") and logs that it did so.

Every netlink call here is synchronous pyroute2: call these from the client's netlink
worker thread, never from the event loop thread.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gtun.errors import GtunError, RuntimeFailure
from gtun.system import journal
from gtun.system.dns import RESOLV_CONF, DnsChange, apply_dns, plan_dns, restore_dns
from gtun.system.netlink import error_code, error_reason, open_ipr
from gtun.system.nft import read_sysctl, run_nft, write_sysctl

log = logging.getLogger("gtun")

# From <linux/rtnetlink.h>, <linux/fib_rules.h> and <asm-generic/socket.h>.
RT_TABLE_MAIN = 254
FIB_RULE_INVERT = 0x2
SO_MARK = getattr(socket, "SO_MARK", 36)

# wg-quick's numbers: the first table it tries, and the priorities the kernel gives its
# two rules (the first rules added in front of the main table's 32766).
FIRST_TABLE = 51820
TABLES_TRIED = 1000
PRIORITY_SUPPRESS = 32764
PRIORITY_TUNNEL = 32765

# Tuning knobs and paths.
STATE_VERSION = 1
PROC_SYS = Path("/proc/sys")
SRC_VALID_MARK = "net/ipv4/conf/all/src_valid_mark"
NFT_FAMILY = "inet"
# nftables hook priorities (raw, mangle), as numbers for old nft versions.
NFT_RAW = -300
NFT_MANGLE = -150

_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})

Address = IPv4Address | IPv6Address


def mark_socket(sock: socket.socket, mark: int) -> None:
    """Mark every packet `sock` sends with `mark`, so it bypasses the tunnel's routing
    table and reaches the relay by the ordinary routes.  Call it before connect() or
    the first send.  Raises RuntimeFailure (setting a mark needs CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot set firewall mark {mark} on the relay's socket: {exc.strerror or exc}"
        ) from exc


def state_file(state_dir: Path, config_file: Path) -> Path:
    """Where the client configured by `config_file` records its full-tunnel changes."""
    return state_dir / f"exit-{config_file.stem}.json"


# ---------------------------------------------------------------------------
# What is changed: rules and routes (pure)


@dataclass(frozen=True)
class Rule:
    """One policy routing rule gtun adds (and deletes by exactly this description)."""

    family: int  # 4 or 6
    priority: int
    table: int
    fwmark: int | None = None  # always inverted: "not fwmark"
    suppress_prefixlength: int | None = None

    def netlink(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "family": socket.AF_INET if self.family == 4 else socket.AF_INET6,
            "priority": self.priority,
            "table": self.table,
        }
        if self.fwmark is not None:
            args["fwmark"] = self.fwmark
            args["flags"] = FIB_RULE_INVERT
        if self.suppress_prefixlength is not None:
            args["suppress_prefixlen"] = self.suppress_prefixlength
        return args

    def __str__(self) -> str:
        match = f"not fwmark {self.fwmark:#x} " if self.fwmark is not None else ""
        table = "main" if self.table == RT_TABLE_MAIN else str(self.table)
        suppress = (
            f" suppress_prefixlength {self.suppress_prefixlength}"
            if self.suppress_prefixlength is not None
            else ""
        )
        return f"IPv{self.family} rule {self.priority}: {match}lookup {table}{suppress}"


@dataclass(frozen=True)
class Route:
    """A default route in gtun's table: into the device, or unreachable."""

    family: int
    table: int
    device: str | None  # None: an unreachable route
    gateway: str | None = None  # a TAP device's routes go via the relay's address

    @property
    def dst(self) -> str:
        return "0.0.0.0/0" if self.family == 4 else "::/0"

    def netlink(self, index: int | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {
            "family": socket.AF_INET if self.family == 4 else socket.AF_INET6,
            "dst": self.dst,
            "table": self.table,
            "type": "unicast" if self.device is not None else "unreachable",
        }
        if index is not None:
            args["oif"] = index
        if self.gateway is not None and self.device is not None:
            args["gateway"] = self.gateway
        return args

    def __str__(self) -> str:
        how = f"dev {self.device}" if self.device is not None else "unreachable"
        if self.gateway is not None and self.device is not None:
            how = f"via {self.gateway} {how}"
        return f"IPv{self.family} default route {how} in table {self.table}"


def plan(
    device: str,
    table: int,
    fwmark: int,
    *,
    ipv6: bool,
    gateways: Sequence[Address] = (),
) -> tuple[list[Rule], list[Route]]:
    """The rules and routes of a full tunnel through `device`.

    IPv6 is always covered: into the device when the tunnel carries IPv6 (`ipv6`),
    otherwise unreachable, so that it cannot leave by the local network.  `gateways`
    (the relay's tunnel addresses) are next hops on a TAP device, where a route straight
    into the device would ask the link for every destination's address.
    """
    via = {a.version: str(a) for a in gateways}
    rules: list[Rule] = []
    routes = [
        Route(4, table, device, via.get(4)),
        Route(6, table, device, via.get(6)) if ipv6 else Route(6, table, None),
    ]
    for family in (4, 6):
        rules.append(Rule(family, PRIORITY_SUPPRESS, RT_TABLE_MAIN, suppress_prefixlength=0))
        rules.append(Rule(family, PRIORITY_TUNNEL, table, fwmark=fwmark))
    return rules, routes


def nft_table_name(device: str) -> str:
    return "gtun_exit_" + "".join(c if c.isalnum() or c == "_" else "_" for c in device)


def nft_ruleset(table: str, device: str, fwmark: int, addresses: Sequence[Address]) -> str:
    """The nftables script of the mark-keeping table (replaces one of the same name)."""
    ref = f"{NFT_FAMILY} {table}"
    guards = [
        f'        iifname != "{device}" {"ip" if a.version == 4 else "ip6"} daddr {a} '
        "fib saddr type != local drop"
        for a in addresses
    ]
    return "\n".join(
        [
            f"table {ref}",
            f"delete table {ref}",
            f"table {ref} {{",
            "    chain preraw {",
            f"        type filter hook prerouting priority {NFT_RAW}; policy accept;",
            *guards,
            "    }",
            "    chain premangle {",
            f"        type filter hook prerouting priority {NFT_MANGLE}; policy accept;",
            f"        meta l4proto {{ tcp, udp }} ct mark {fwmark} meta mark set ct mark",
            "    }",
            "    chain postmangle {",
            f"        type filter hook postrouting priority {NFT_MANGLE}; policy accept;",
            f"        meta l4proto {{ tcp, udp }} meta mark {fwmark} ct mark set meta mark",
            "    }",
            "}",
            "",
        ]
    )


# ---------------------------------------------------------------------------
# The state file


@dataclass
class ExitState:
    """Everything a full tunnel changed (or is about to change), as saved on disk."""

    pid: int
    config: str
    device: str
    table: int
    fwmark: int
    rules: list[Rule] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    src_valid_mark_old: str | None = None  # None: gtun did not change it
    nft_table: str | None = None
    dns: DnsChange | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = STATE_VERSION
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ExitState:
        """Raises ValueError for anything but a state file this version wrote."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} state file")
            dns = data.get("dns")
            state = cls(
                pid=_int(data["pid"]),
                config=str(data["config"]),
                device=str(data["device"]),
                table=_int(data["table"]),
                fwmark=_int(data["fwmark"]),
                rules=[Rule(**r) for r in data["rules"]],
                routes=[Route(**r) for r in data["routes"]],
                src_valid_mark_old=_opt_str(data.get("src_valid_mark_old")),
                nft_table=_opt_str(data.get("nft_table")),
                dns=DnsChange(**dns) if dns is not None else None,
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"damaged state file: {exc}") from exc
        for rule in state.rules:
            if rule.family not in (4, 6) or not all(
                isinstance(v, int) for v in (rule.priority, rule.table)
            ):
                raise ValueError(f"damaged state file: bad rule {rule}")
        for route in state.routes:
            if route.family not in (4, 6) or not isinstance(route.table, int):
                raise ValueError(f"damaged state file: bad route {route}")
        if state.nft_table is not None and state.nft_table != nft_table_name(state.device):
            raise ValueError(f"damaged state file: unexpected nftables table {state.nft_table}")
        return state


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _opt_str(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def save_state(path: Path, state: ExitState) -> None:
    """Write `state` so that it survives a crash or power loss (journal.write_atomic).
    Raises RuntimeFailure."""
    journal.write_atomic(path, state.to_json(), "full-tunnel state file")


def load_state(path: Path) -> ExitState | None:
    """The state left in `path`, or None if there is none.

    Raises RuntimeFailure when the file cannot be read or is damaged."""
    text = journal.read_text(path, "full-tunnel state file")
    if text is None:
        return None
    try:
        return ExitState.from_json(text)
    except ValueError as exc:
        raise RuntimeFailure(
            f"{path}: {exc}; check `ip rule` and /etc/resolv.conf by hand, then remove it"
        ) from exc


_remove_state = journal.remove


# ---------------------------------------------------------------------------
# Netlink and sysctl


def choose_table() -> int:
    """The first routing table from 51820 that has no routes and that no rule uses (as
    wg-quick chooses).  Raises RuntimeFailure."""
    ipr = open_ipr()
    try:
        used: set[int] = set()
        for family in _families():
            for rule in ipr.get_rules(family=family):
                used.add(int(rule.get("table") or 0))
                used.add(int(rule.get("fwmark") or 0))
            for route in ipr.route("dump", family=family):
                used.add(int(route.get("table") or 0))
    except (NetlinkError, OSError) as exc:
        raise RuntimeFailure(f"cannot list routing rules and tables: {error_reason(exc)}") from exc
    finally:
        ipr.close()
    for table in range(FIRST_TABLE, FIRST_TABLE + TABLES_TRIED):
        if table not in used:
            return table
    raise RuntimeFailure(
        f"no free routing table in {FIRST_TABLE}..{FIRST_TABLE + TABLES_TRIED - 1}"
    )


def _ipv6_available() -> bool:
    return os.path.exists("/proc/sys/net/ipv6")


def _families() -> list[int]:
    return [socket.AF_INET, socket.AF_INET6] if _ipv6_available() else [socket.AF_INET]


def _link_index(ipr: IPRoute, device: str) -> int:
    try:
        found = ipr.link_lookup(ifname=device)
    except (NetlinkError, OSError) as exc:
        raise RuntimeFailure(f"cannot look up device {device}: {error_reason(exc)}") from exc
    if not found:
        raise RuntimeFailure(f"cannot route into {device}: the device does not exist")
    return int(found[0])


def undo_state(state: ExitState, proc_sys: Path = PROC_SYS) -> tuple[list[str], list[str]]:
    """Undo everything `state` lists, tolerating what is already gone.

    Returns (what was undone, problems); a problem does not stop the other steps.
    """
    done: list[str] = []
    problems: list[str] = []
    if state.dns is not None:
        try:
            done.append(restore_dns(state.dns))
        except RuntimeFailure as exc:
            problems.append(str(exc))
    ipr: IPRoute | None = None
    if state.rules or state.routes:
        try:
            ipr = open_ipr()
        except RuntimeFailure as exc:
            problems.append(str(exc))
    if ipr is not None:
        try:
            for rule in reversed(state.rules):
                _netlink_del(ipr, "rule", rule.netlink(), str(rule), done, problems)
            for route in reversed(state.routes):
                _netlink_del(ipr, "route", route.netlink(), str(route), done, problems)
        finally:
            ipr.close()
    if state.nft_table is not None:
        ref = f"{NFT_FAMILY} {state.nft_table}"
        try:
            run_nft(
                ["-f", "-"],
                f"table {ref}\ndelete table {ref}\n",
                f"cannot remove nftables table {state.nft_table}",
            )
            done.append(f"nftables table {state.nft_table}")
        except RuntimeFailure as exc:
            problems.append(str(exc))
    if state.src_valid_mark_old is not None:
        path = proc_sys / SRC_VALID_MARK
        try:
            if read_sysctl(path) == "1":
                write_sysctl(path, state.src_valid_mark_old)
                done.append(f"src_valid_mark back to {state.src_valid_mark_old}")
        except RuntimeFailure as exc:
            problems.append(str(exc))
    return done, problems


def _netlink_del(
    ipr: IPRoute,
    kind: str,
    args: dict[str, Any],
    what: str,
    done: list[str],
    problems: list[str],
) -> None:
    try:
        if kind == "rule":
            ipr.rule("del", **args)
        else:
            ipr.route("del", **args)
        done.append(what)
    except (NetlinkError, OSError) as exc:
        code = error_code(exc)
        if code in _GONE or (code == errno.EAFNOSUPPORT and not _ipv6_available()):
            return
        problems.append(f"cannot remove {what}: {error_reason(exc)}")


_pid_is_gtun = journal.pid_is_gtun


def recover(path: Path, proc_sys: Path = PROC_SYS) -> bool:
    """Undo what a run that did not exit cleanly left, as its state file `path` lists.

    Returns whether there was anything to recover.  Raises RuntimeFailure when another
    gtun client still owns the file, or when something could not be undone (the file
    is kept, so the next start tries again).
    """
    state = load_state(path)
    if state is None:
        return False
    if _pid_is_gtun(state.pid):
        raise RuntimeFailure(
            f"another gtun client (pid {state.pid}, {state.config}) is running its full "
            f"tunnel with the state file {path}: stop it first"
        )
    done, problems = undo_state(state, proc_sys)
    if problems:
        raise RuntimeFailure(
            f"cannot undo what an earlier run left (state file {path}): {'; '.join(problems)}"
        )
    _remove_state(path)
    log.warning(
        "an earlier run (pid %d) did not exit cleanly; undid what it left: %s",
        state.pid,
        "; ".join(done) or "nothing was left",
    )
    return True


# ---------------------------------------------------------------------------
# The full tunnel


class FullTunnel:
    """One client's full-tunnel routing and DNS.

    Made at start (`prepare`, before the relay's socket, which must carry `fwmark`);
    `apply()` once the device is configured, `undo()` before it is unconfigured.
    Methods raise RuntimeFailure naming what failed.
    """

    def __init__(
        self,
        device: str,
        table: int,
        state_path: Path,
        config_file: Path,
        *,
        proc_sys: Path = PROC_SYS,
        resolv: Path = RESOLV_CONF,
    ) -> None:
        self.device = device
        self.table = table
        self.fwmark = table  # as wg-quick: the mark is the table's number
        self.state_path = state_path
        self.config_file = config_file
        self.proc_sys = proc_sys
        self.resolv = resolv
        self.state: ExitState | None = None  # set once all of it is in place

    @classmethod
    def prepare(cls, device: str, state_path: Path, config_file: Path) -> FullTunnel:
        return cls(device, choose_table(), state_path, config_file)

    @property
    def active(self) -> bool:
        """True once `apply` has finished (status is read from another thread while it
        runs: a half-applied tunnel is not reported as up)."""
        return self.state is not None

    def apply(
        self,
        addresses: Sequence[Address],
        dns: Sequence[Address],
        *,
        ipv6: bool,
        gateways: Sequence[Address] = (),
    ) -> None:
        """Route everything into the device and apply `dns`; `ipv6`: the tunnel carries
        IPv6; `gateways`: next hops on a TAP device.  On failure, whatever was done is
        undone before the error is raised."""
        if self.state is not None:
            self.undo()
        rules, routes = plan(self.device, self.table, self.fwmark, ipv6=ipv6, gateways=gateways)
        if not _ipv6_available():
            log.info("IPv6 is not available here: only IPv4 needs routing")
            rules = [r for r in rules if r.family == 4]
            routes = [r for r in routes if r.family == 4]
        svm_path = self.proc_sys / SRC_VALID_MARK
        svm_old = read_sysctl(svm_path)
        state = ExitState(
            pid=os.getpid(),
            config=str(self.config_file),
            device=self.device,
            table=self.table,
            fwmark=self.fwmark,
            rules=rules,
            routes=routes,
            src_valid_mark_old=None if svm_old == "1" else svm_old,
            nft_table=nft_table_name(self.device),
            dns=plan_dns(dns, self.device, self.config_file.name, self.resolv),
        )
        # On disk before anything changes: a crash from here on is recoverable.
        save_state(self.state_path, state)
        try:
            self._apply(state, addresses, dns)
        except GtunError:
            with contextlib.suppress(GtunError):
                self._undo(state)
            raise
        self.state = state

    def _apply(
        self, state: ExitState, addresses: Sequence[Address], dns: Sequence[Address]
    ) -> None:
        if state.src_valid_mark_old is not None:
            write_sysctl(self.proc_sys / SRC_VALID_MARK, "1")
        assert state.nft_table is not None
        try:
            run_nft(
                ["-f", "-"],
                nft_ruleset(state.nft_table, self.device, self.fwmark, addresses),
                f"cannot install nftables table {state.nft_table}",
            )
        except RuntimeFailure as exc:
            log.warning(
                "%s; the full tunnel works without it, but a strict rp_filter may drop the "
                "relay's answers",
                exc,
            )
            state.nft_table = None  # nothing to remove later (nft may not even exist)
            save_state(self.state_path, state)
        ipr = open_ipr()
        try:
            index = _link_index(ipr, self.device)
            not_ours: list[Rule | Route] = []
            for route in state.routes:
                if not self._add(ipr, "route", route.netlink(index), str(route)):
                    not_ours.append(route)
            # Rules last: until the table has its routes, a rule would lead nowhere.
            for rule in state.rules:
                if not self._add(ipr, "rule", rule.netlink(), str(rule)):
                    not_ours.append(rule)
        finally:
            ipr.close()
        if not_ours:
            # Already there (another program's identical rule): not ours to delete.
            state.rules = [r for r in state.rules if r not in not_ours]
            state.routes = [r for r in state.routes if r not in not_ours]
            save_state(self.state_path, state)
        if state.dns is not None:
            apply_dns(state.dns, dns)

    @staticmethod
    def _add(ipr: IPRoute, kind: str, args: dict[str, Any], what: str) -> bool:
        try:
            if kind == "rule":
                ipr.rule("add", **args)
            else:
                ipr.route("add", **args)
        except (NetlinkError, OSError) as exc:
            if error_code(exc) == errno.EEXIST:
                return False
            raise RuntimeFailure(f"cannot add {what}: {error_reason(exc)}") from exc
        return True

    def undo(self) -> None:
        """Undo everything; the state file goes only when all of it was undone (else
        the next start tries again).  Idempotent.  Raises RuntimeFailure."""
        state = self.state
        if state is None:
            return
        self.state = None
        self._undo(state)

    def _undo(self, state: ExitState) -> None:
        _, problems = undo_state(state, self.proc_sys)
        if problems:
            raise RuntimeFailure(
                f"full tunnel not entirely undone ({'; '.join(problems)}); the next start "
                f"retries what {self.state_path} lists"
            )
        _remove_state(self.state_path)
        log.info("full tunnel removed: routing rules, table %d and DNS restored", state.table)
