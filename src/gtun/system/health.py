"""What a running relay's own machine looks like now, read and never changed: the
forwarding sysctls, its NAT table, its device's link state and the routes into it.

The relay's edge reads these every few seconds in a worker thread (app/server.py) and
gives the relay core the snapshot it answers health requests from (core/tunnel.py,
RelayHealth), so that `gtun doctor` on a client can say what is wrong at the relay.
Each reader returns None for what it cannot read, and never raises: a fact it does not
know is left unknown, not turned into an error.  Everything acts on the calling
process's network namespace.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from gtun.errors import GtunError
from gtun.system.netlink import IFF_UP, open_ipr
from gtun.system.nft import NFT_TIMEOUT
from gtun.system.tools import run_tool

Network = IPv4Network | IPv6Network

PROC_SYS = Path("/proc/sys")
SYS_CLASS_NET = Path("/sys/class/net")
RT_TABLE_MAIN = 254  # <linux/rtnetlink.h>


def sysctl_on(key: str, proc_sys: Path = PROC_SYS) -> bool | None:
    """Whether a /proc/sys switch (e.g. "net/ipv4/ip_forward") reads 1 (None: it does
    not exist or cannot be read)."""
    try:
        value = (proc_sys / key).read_text().strip()
    except OSError:
        return None
    return value == "1" if value.isdigit() else None


def link_up(device: str, sys_class_net: Path = SYS_CLASS_NET) -> bool | None:
    """Whether `device` exists and is administratively up (False when it does not
    exist; None when its flags cannot be read)."""
    path = sys_class_net / device
    if not path.exists():
        return False
    try:
        return bool(int((path / "flags").read_text().strip(), 16) & IFF_UP)
    except (OSError, ValueError):
        return None


def nft_table_present(family: str, table: str) -> bool | None:
    """Whether nftables has `family table` (None: nft cannot be run)."""
    try:
        result = run_tool(
            ["nft", "list", "table", family, table], "cannot query nft", timeout=NFT_TIMEOUT
        )
    except GtunError:
        return None
    return result.returncode == 0


def missing_routes(device: str, wanted: Iterable[Network]) -> tuple[Network, ...] | None:
    """Those of `wanted` that no route of the main table sends into `device` (None: the
    routes cannot be read).  One dump per family, whatever the number of routes."""
    wanted = list(wanted)
    if not wanted:
        return ()
    try:
        ipr = open_ipr()
    except GtunError:
        return None
    present: set[Network] = set()
    try:
        found = ipr.link_lookup(ifname=device)
        if not found:
            return tuple(wanted)
        index = int(found[0])
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN, oif=index):
                dst = msg.get_attr("RTA_DST")
                if dst is None:
                    continue
                try:
                    present.add(ip_network(f"{dst}/{msg['dst_len']}", strict=False))
                except ValueError:
                    continue
    except (NetlinkError, OSError):
        return None
    finally:
        ipr.close()
    return tuple(net for net in wanted if net not in present)
