"""Device configuration through netlink (pyroute2): MTU, link state, addresses, routes.

A `LinkConfig` remembers every change it made so that `undo()` can reverse them in
reverse order when gtun stops.  It acts on the network namespace of the calling
process.  Every netlink failure becomes one RuntimeFailure line that names the device
and the change.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from gtun.errors import RuntimeFailure

# From <linux/if.h>, <linux/if_addr.h> and <linux/rtnetlink.h>.
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255  # in a delete request: any scope

# Errors meaning "already gone" when undoing: the device, address or route is not there.
_GONE = frozenset({errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENOENT})


def error_reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(exc, NetlinkError) and isinstance(code, int) and code > 0:
        return os.strerror(code)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def error_code(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        return int(exc.code)
    if isinstance(exc, OSError):
        return exc.errno
    return None


def _family(net: IPv4Network | IPv6Network | IPv4Interface | IPv6Interface) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def open_ipr() -> IPRoute:
    try:
        return IPRoute()
    except (NetlinkError, OSError) as exc:
        raise RuntimeFailure(f"cannot open a netlink socket: {error_reason(exc)}") from exc


def link_index(name: str) -> int | None:
    """The interface index of `name` in this namespace, or None if there is none."""
    ipr = open_ipr()
    try:
        found = ipr.link_lookup(ifname=name)
    except (NetlinkError, OSError) as exc:
        raise RuntimeFailure(f"cannot look up device {name}: {error_reason(exc)}") from exc
    finally:
        ipr.close()
    return int(found[0]) if found else None


def link_exists(name: str) -> bool:
    """Whether a device named `name` exists in this namespace."""
    return link_index(name) is not None


class LinkConfig:
    """Configures one device and can undo what it did.

    Adding something that already exists is not an error, and is not undone (it was
    not ours).  Methods raise RuntimeFailure naming the device and the change.
    """

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self._ipr: IPRoute | None = None
        # Undo actions, most recent last; each is (description, action).
        self._undo: list[tuple[str, Callable[[IPRoute], None]]] = []

    # -- plumbing --

    def _conn(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = open_ipr()
        return self._ipr

    def _index(self, what: str) -> int:
        try:
            found = self._conn().link_lookup(ifname=self.ifname)
        except (NetlinkError, OSError) as exc:
            raise RuntimeFailure(f"cannot {what}: {error_reason(exc)}") from exc
        if not found:
            raise RuntimeFailure(f"cannot {what}: device {self.ifname} does not exist")
        return int(found[0])

    def _link(self, what: str) -> tuple[int, Any]:
        index = self._index(what)
        try:
            return index, self._conn().link("get", index=index)[0]
        except (NetlinkError, OSError) as exc:
            raise RuntimeFailure(f"cannot {what}: {error_reason(exc)}") from exc

    def _do(self, what: str, action: Callable[[IPRoute], object]) -> bool:
        """Run one change; False if it already existed (EEXIST)."""
        try:
            action(self._conn())
        except (NetlinkError, OSError) as exc:
            if error_code(exc) == errno.EEXIST:
                return False
            raise RuntimeFailure(f"cannot {what}: {error_reason(exc)}") from exc
        return True

    # -- changes --

    def set_mtu(self, mtu: int) -> None:
        self._set_link("mtu", mtu)

    def set_mac(self, mac: str) -> None:
        """Set the link-layer address ("02:…", a TAP device's)."""
        self._set_link("address", mac)

    def _set_link(self, attr: str, value: object) -> None:
        """Set one link attribute, remembering the old value to restore on undo."""
        what = f"set {attr} {value} on {self.ifname}"
        index, link = self._link(what)
        old = link.get(attr)
        if old == value:
            return
        self._do(what, lambda ipr: ipr.link("set", index=index, **{attr: value}))
        if old is not None:
            desc = f"restore {attr} {old} on {self.ifname}"
            self._undo.append(
                (desc, lambda ipr: ipr.link("set", index=self._index(desc), **{attr: old}))
            )

    def set_up(self) -> None:
        what = f"bring {self.ifname} up"
        index, link = self._link(what)
        if link["flags"] & IFF_UP:
            return
        self._do(what, lambda ipr: ipr.link("set", index=index, state="up"))
        self._undo.append(
            (
                f"bring {self.ifname} down",
                lambda ipr: ipr.link(
                    "set", index=self._index(f"bring {self.ifname} down"), state="down"
                ),
            )
        )

    def add_address(self, iface: IPv4Interface | IPv6Interface) -> None:
        what = f"add address {iface} to {self.ifname}"
        index = self._index(what)
        extra: dict[str, Any] = {}
        if iface.version == 6:
            # A tunnel address has no neighbours to collide with: skip duplicate
            # address detection so the address is usable at once.
            extra["flags"] = IFA_F_NODAD
        added = self._do(
            what,
            lambda ipr: ipr.addr(
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                family=_family(iface),
                **extra,
            ),
        )
        if added:
            self._undo.append(
                (
                    f"remove address {iface} from {self.ifname}",
                    lambda ipr: ipr.addr(
                        "del",
                        index=self._index(f"remove address {iface} from {self.ifname}"),
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                        family=_family(iface),
                    ),
                )
            )

    def _route_args(self, network: IPv4Network | IPv6Network, index: int) -> dict[str, Any]:
        args: dict[str, Any] = {"dst": str(network), "oif": index, "family": _family(network)}
        if network.version == 4:
            args["scope"] = RT_SCOPE_LINK  # as `ip route add NET dev DEV` does
        return args

    def add_route(
        self,
        network: IPv4Network | IPv6Network,
        *,
        metric: int | None = None,
        gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    ) -> None:
        """Route `network` via this device (optionally with a metric, and through a
        gateway on the device's link, as a TAP device needs: `ip route add NET via GW
        dev DEV`)."""
        what = f"add route {network} via {self.ifname}"
        index = self._index(what)
        args = self._route_args(network, index)
        if metric is not None:
            args["priority"] = metric
        if gateway is not None:
            what = f"add route {network} via {gateway} dev {self.ifname}"
            args["gateway"] = str(gateway)
            args.pop("scope", None)  # a gatewayed route has global scope
        added = self._do(what, lambda ipr: ipr.route("add", **args))
        if added:
            self._undo.append((f"remove route {network} via {self.ifname}", self._route_undo(args)))

    def _route_undo(self, args: dict[str, Any]) -> Callable[[IPRoute], None]:
        def undo(ipr: IPRoute) -> None:
            current = dict(args, oif=self._index(f"remove route {args['dst']}"))
            if "scope" in current:
                current["scope"] = RT_SCOPE_NOWHERE
            ipr.route("del", **current)

        return undo

    def remove_route(self, network: IPv4Network | IPv6Network) -> None:
        """Remove the route to `network` via this device; no error if it is not there."""
        what = f"remove route {network} via {self.ifname}"
        index = self._index(what)
        args = self._route_args(network, index)
        if "scope" in args:
            args["scope"] = RT_SCOPE_NOWHERE
        try:
            self._conn().route("del", **args)
        except (NetlinkError, OSError) as exc:
            if error_code(exc) not in _GONE:
                raise RuntimeFailure(f"cannot {what}: {error_reason(exc)}") from exc
        # It is gone now: undo must not try again.
        self._undo = [
            (desc, act)
            for desc, act in self._undo
            if desc != f"remove route {network} via {self.ifname}"
        ]

    # -- teardown --

    def undo(self) -> None:
        """Reverse every change this object made, most recent first.

        Things already gone (the device was deleted, the route removed) are skipped.
        Raises RuntimeFailure for the first other failure, after trying all the rest.
        """
        first: RuntimeFailure | None = None
        while self._undo:
            desc, action = self._undo.pop()
            try:
                action(self._conn())
            except RuntimeFailure:
                continue  # the device is gone, and everything on it with it
            except (NetlinkError, OSError) as exc:
                if error_code(exc) in _GONE:
                    continue
                if first is None:
                    first = RuntimeFailure(f"cannot {desc}: {error_reason(exc)}")
        if first is not None:
            raise first

    def close(self) -> None:
        """Close the netlink socket (without undoing).  Idempotent."""
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def __enter__(self) -> LinkConfig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Watching for a new local path (a client that roams)

# Multicast groups of <linux/rtnetlink.h>: IPv4 and IPv6 addresses and routes.
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
NETLINK_ROUTE = 0


class PathWatcher:
    """A netlink socket told of every address and route change in this namespace.

    Only its readiness matters (the event loop watches `fileno()`, `drain()` empties
    it): what the change means for the way to the relay is asked afterwards, once
    (`source_for`), so a burst of changes costs one look-up.  Raises RuntimeFailure."""

    def __init__(self) -> None:
        groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        except OSError as exc:
            raise RuntimeFailure(f"cannot open a netlink socket: {error_reason(exc)}") from exc
        try:
            sock.bind((0, groups))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise RuntimeFailure(f"cannot watch address changes: {error_reason(exc)}") from exc
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> int:
        """Read every pending notification (an overrun counts as one); how many."""
        n = 0
        while n < 1024:  # bounded: a storm of changes is looked at once anyway
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: notifications were lost, so something changed
                pass
            n += 1
        return n

    def close(self) -> None:
        self.sock.close()


def source_for(destination: str, mark: int = 0) -> str | None:
    """The local address the kernel would send from to `destination` (and the device),
    as "address%device", or None when there is no route; `mark`: for packets with this
    firewall mark.  Synchronous pyroute2: call it from the netlink thread."""
    ipr = open_ipr()
    try:
        extra = {"mark": mark} if mark else {}
        routes = ipr.route("get", dst=destination, **extra)
    except (NetlinkError, OSError):
        return None
    finally:
        ipr.close()
    for route in routes:
        return f"{route.get_attr('RTA_PREFSRC')}%{route.get_attr('RTA_OIF')}"
    return None
