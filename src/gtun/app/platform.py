"""What the daemons change on the machine, behind one seam.

`Platform` groups every change a daemon makes outside its own process (the device, its
addresses and routes, sysctls, NAT, DNS, the full tunnel, where the `wg` socket goes), and
the one look the relay takes at its machine (relay_health), so that a relay or a client
can run in-process on fakes (gtun.testing.platform).  `LinuxPlatform` is the real one:
each method is the function of io/ or system/ the daemons called directly before.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Protocol

from gtun.app.uapi import UAPI_DIR
from gtun.core.tunnel import RelayHealth
from gtun.errors import ConfigError
from gtun.io.tun import PacketDevice, TunDevice, log_offloads, open_tun, open_tun_queues
from gtun.system import dns as dnsconf
from gtun.system import fulltunnel as exitroute
from gtun.system import health as hostcheck
from gtun.system import journal
from gtun.system.ipv6 import enable_ipv6, eui64_link_local
from gtun.system.netlink import LinkConfig
from gtun.system.nft import Forwarding, Nat

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class Device(PacketDevice, Protocol):
    """A TUN or TAP device as a daemon holds it."""

    tap: bool
    vnet: bool  # the virtio-net header and offloads are on
    offload_error: str  # why offloads were asked for and not granted


class Link(Protocol):
    """One device's addresses, routes and link state; `undo()` reverses them
    (system/netlink.py LinkConfig)."""

    ifname: str

    def set_mtu(self, mtu: int) -> None: ...
    def set_mac(self, mac: str) -> None: ...
    def add_address(self, iface: IPv4Interface | IPv6Interface) -> None: ...
    def set_up(self) -> None: ...
    def add_route(self, network: Network, *, gateway: Address | None = None) -> None: ...
    def remove_route(self, network: Network) -> None: ...
    def undo(self) -> None: ...
    def close(self) -> None: ...


class IpForwarding(Protocol):
    def enable(
        self, ipv6: bool = False, record: Callable[[dict[str, str]], None] | None = None
    ) -> None: ...
    def restore(self) -> None: ...


class NatTable(Protocol):
    def apply(self) -> None: ...
    def remove(self) -> None: ...


class ExitRoute(Protocol):
    """A client's full tunnel (system/fulltunnel.py FullTunnel)."""

    table: int
    fwmark: int

    @property
    def active(self) -> bool: ...

    def apply(
        self,
        addresses: Sequence[Address],
        dns: Sequence[Address],
        *,
        ipv6: bool,
        gateways: Sequence[Address] = (),
    ) -> None: ...

    def undo(self) -> None: ...


class Platform(Protocol):
    """Methods raise what the functions they stand for raise (ConfigError,
    RuntimeFailure)."""

    def check_privileges(self) -> None: ...
    def open_tun(self, name: str, *, tap: bool, offload: bool) -> Device: ...
    def log_offloads(self, dev: Device, asked: bool) -> None: ...
    def link(self, ifname: str) -> Link: ...
    def enable_ipv6(self, device: str) -> bool: ...
    def eui64_link_local(self, device: str) -> bool: ...
    def forwarding(self) -> IpForwarding: ...
    def nat(self, device: str, networks: list[Network]) -> NatTable: ...
    def dns_method(self) -> str: ...
    def apply_dns(self, change: dnsconf.DnsChange, dns: Sequence[Address]) -> None: ...
    def restore_dns(self, change: dnsconf.DnsChange) -> str: ...
    def recover_full_tunnel(self, state_path: Path) -> bool: ...
    def recover_host(self, journal_path: Path) -> bool: ...
    def full_tunnel(self, device: str, state_path: Path, config_file: Path) -> ExitRoute: ...
    def mark_socket(self, sock: socket.socket, mark: int) -> None: ...
    def wg_socket_dir(self) -> Path | None:
        """Where `wg` looks for DEVICE.sock (app/uapi.py); None: nowhere."""

    def relay_health(
        self, device: str, *, ipv6: bool, nat_table: str | None, routes: Sequence[Network]
    ) -> RelayHealth:
        """What the relay's machine looks like now (never raises: unknown is None)."""
        ...


class LinuxPlatform:
    """The machine itself."""

    def check_privileges(self) -> None:
        """Exit-2 problems of the machine, found before anything is changed."""
        if os.geteuid() != 0:
            raise ConfigError("gtun must run as root to create and configure its network device")
        if not os.path.exists("/dev/net/tun"):
            raise ConfigError("/dev/net/tun is missing: load the tun module (modprobe tun)")

    def open_tun(self, name: str, *, tap: bool, offload: bool) -> TunDevice:
        return open_tun(name, tap=tap, offload=offload)

    def open_tun_queues(
        self, name: str, queues: int, *, tap: bool, offload: bool
    ) -> list[TunDevice]:
        """The device with a queue per relay worker (app/workers.py)."""
        return open_tun_queues(name, queues, tap=tap, offload=offload)

    def log_offloads(self, dev: Device, asked: bool) -> None:
        assert isinstance(dev, TunDevice)
        log_offloads(dev, asked)

    def link(self, ifname: str) -> LinkConfig:
        return LinkConfig(ifname)

    def enable_ipv6(self, device: str) -> bool:
        return enable_ipv6(device)

    def eui64_link_local(self, device: str) -> bool:
        return eui64_link_local(device)

    def forwarding(self) -> Forwarding:
        return Forwarding()

    def nat(self, device: str, networks: list[Network]) -> Nat:
        return Nat(device, networks)

    def dns_method(self) -> str:
        return dnsconf.dns_method()

    def apply_dns(self, change: dnsconf.DnsChange, dns: Sequence[Address]) -> None:
        dnsconf.apply_dns(change, dns)

    def restore_dns(self, change: dnsconf.DnsChange) -> str:
        return dnsconf.restore_dns(change)

    def recover_full_tunnel(self, state_path: Path) -> bool:
        return exitroute.recover(state_path)

    def recover_host(self, journal_path: Path) -> bool:
        return journal.recover_host(journal_path)

    def full_tunnel(self, device: str, state_path: Path, config_file: Path) -> exitroute.FullTunnel:
        return exitroute.FullTunnel.prepare(device, state_path, config_file)

    def mark_socket(self, sock: socket.socket, mark: int) -> None:
        exitroute.mark_socket(sock, mark)

    def wg_socket_dir(self) -> Path:
        return UAPI_DIR

    def relay_health(
        self, device: str, *, ipv6: bool, nat_table: str | None, routes: Sequence[Network]
    ) -> RelayHealth:
        """The forwarding sysctls (IPv6 only with `ipv6`), the NAT table `nat_table`
        (None: nat = false), `device`'s link state and which of `routes` no longer
        leave by it.  Blocks for up to nft's timeout: run it off the event loop."""
        missing = hostcheck.missing_routes(device, routes)
        return RelayHealth(
            device=device,
            forwarding=hostcheck.sysctl_on("net/ipv4/ip_forward"),
            dev_forwarding=hostcheck.sysctl_on(f"net/ipv4/conf/{device}/forwarding"),
            forwarding6=hostcheck.sysctl_on("net/ipv6/conf/all/forwarding") if ipv6 else None,
            nat=None if nat_table is None else hostcheck.nft_table_present("inet", nat_table),
            device_up=hostcheck.link_up(device),
            missing_routes=missing or (),
        )
