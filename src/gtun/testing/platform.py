"""A fake `Platform` (gtun.app.platform): a relay or a client daemon runs in-process on
it, without touching the machine.

Every change a daemon makes is recorded as a `Change` and marked undone when the daemon
takes it back, so a test can check that clean-up left nothing behind (`outstanding()`).
Devices are FakeTun ones: the test holds the other end of each (`ends`, non-blocking).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path

from gtun.core.tunnel import RelayHealth
from gtun.system.dns import DnsChange
from gtun.testing.tun import FakeTun

# As gtun.app.platform's (a layer this one may not import from).
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
FAKE_TABLE = 51820  # the full tunnel's routing table and mark, as wg-quick's default


@dataclass
class Change:
    """One change to the (fake) machine."""

    what: str
    undone: bool = False


class FakeDevice(FakeTun):
    """A FakeTun with what a daemon asks of its device."""

    def __init__(self, sock: socket.socket, name: str, *, tap: bool) -> None:
        super().__init__(sock, name)
        self.tap = tap
        self.vnet = False
        self.offload_error = ""
        self.closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


class FakePlatform:
    """Records what a daemon changes; `fail` names methods that raise instead."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.devices: list[FakeDevice] = []  # every device opened, in order
        self.ends: dict[str, socket.socket] = {}  # the test's end of the newest of each name
        self.links: dict[str, FakeLink] = {}  # the newest link configuration of each device
        self.ipv6: set[str] = set()  # devices IPv6 was enabled on (it dies with them)
        self.eui64: set[str] = set()  # devices told to form their link-local from the MAC
        self.marks: list[int] = []  # firewall marks put on sockets
        self.recovered: list[Path] = []  # full-tunnel state files looked at
        # Where the daemon puts its `wg` socket (app/uapi.py): none unless a test says.
        self.wg_sockets: Path | None = None
        # What relay_health() says the machine looks like (a test changes it), and the
        # arguments of each call.
        self.health = RelayHealth(forwarding=True, dev_forwarding=True, nat=True, device_up=True)
        self.health_asked: list[tuple[str, bool, str | None, tuple[Network, ...]]] = []

    def change(self, what: str) -> Change:
        done = Change(what)
        self.changes.append(done)
        return done

    def outstanding(self) -> list[str]:
        """The changes not undone, and the devices not closed."""
        return [c.what for c in self.changes if not c.undone] + [
            f"device {d.name} open" for d in self.devices if not d.closed
        ]

    def close_ends(self) -> None:
        """Close the test's ends of the devices."""
        for end in self.ends.values():
            end.close()

    # --- the Platform ------------------------------------------------------------------

    def check_privileges(self) -> None:
        pass

    def open_tun(self, name: str, *, tap: bool, offload: bool) -> FakeDevice:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)  # for the test's loop.sock_recv and sock_sendall
        dev = FakeDevice(ours, name, tap=tap)
        self.devices.append(dev)
        self.ends[name] = theirs
        return dev

    def log_offloads(self, dev: object, asked: bool) -> None:
        pass

    def link(self, ifname: str) -> FakeLink:
        link = FakeLink(self, ifname)
        self.links[ifname] = link
        return link

    def eui64_link_local(self, device: str) -> bool:
        changed = device not in self.eui64
        self.eui64.add(device)
        return changed

    def enable_ipv6(self, device: str) -> bool:
        changed = device not in self.ipv6
        self.ipv6.add(device)
        return changed

    def forwarding(self) -> FakeForwarding:
        return FakeForwarding(self)

    def nat(self, device: str, networks: list[Network]) -> FakeNat:
        return FakeNat(self, device, networks)

    def dns_method(self) -> str:
        return "resolvconf"

    def apply_dns(self, change: DnsChange, dns: Sequence[Address]) -> None:
        self.change(f"DNS {change.interface}: {', '.join(str(d) for d in dns)}")

    def restore_dns(self, change: DnsChange) -> str:
        self._undo(f"DNS {change.interface}:")
        return f"removed DNS record {change.interface}"

    def recover_full_tunnel(self, state_path: Path) -> bool:
        self.recovered.append(state_path)
        return False

    def recover_host(self, journal_path: Path) -> bool:
        self.recovered.append(journal_path)
        return False

    def full_tunnel(self, device: str, state_path: Path, config_file: Path) -> FakeFullTunnel:
        return FakeFullTunnel(self, device)

    def mark_socket(self, sock: socket.socket, mark: int) -> None:
        self.marks.append(mark)

    def wg_socket_dir(self) -> Path | None:
        return self.wg_sockets

    def relay_health(
        self, device: str, *, ipv6: bool, nat_table: str | None, routes: Sequence[Network]
    ) -> RelayHealth:
        self.health_asked.append((device, ipv6, nat_table, tuple(routes)))
        return replace(self.health, device=device)

    def _undo(self, prefix: str) -> None:
        """Mark undone the newest change not yet undone whose description starts so."""
        for c in reversed(self.changes):
            if not c.undone and c.what.startswith(prefix):
                c.undone = True
                return


@dataclass
class FakeLink:
    """One device's configuration, as system/netlink.py LinkConfig makes it."""

    platform: FakePlatform
    ifname: str
    mtu: int | None = None
    mac: str | None = None
    up: bool = False
    addresses: list[IPv4Interface | IPv6Interface] = field(default_factory=list)
    routes: dict[Network, Address | None] = field(default_factory=dict)
    closed: bool = False
    _made: list[Change] = field(default_factory=list)

    def _change(self, what: str) -> None:
        self._made.append(self.platform.change(f"{self.ifname}: {what}"))

    def set_mtu(self, mtu: int) -> None:
        self.mtu = mtu
        self._change(f"mtu {mtu}")

    def set_mac(self, mac: str) -> None:
        self.mac = mac
        self._change(f"mac {mac}")

    def add_address(self, iface: IPv4Interface | IPv6Interface) -> None:
        self.addresses.append(iface)
        self._change(f"address {iface}")

    def set_up(self) -> None:
        self.up = True
        self._change("up")

    def add_route(self, network: Network, *, gateway: Address | None = None) -> None:
        self.routes[network] = gateway
        self._change(f"route {network}")

    def remove_route(self, network: Network) -> None:
        self.routes.pop(network, None)
        for c in self._made:
            if c.what == f"{self.ifname}: route {network}":
                c.undone = True

    def undo(self) -> None:
        while self._made:
            self._made.pop().undone = True
        self.mtu, self.mac, self.up = None, None, False
        self.addresses.clear()
        self.routes.clear()

    def close(self) -> None:
        self.closed = True


class FakeForwarding:
    def __init__(self, platform: FakePlatform) -> None:
        self.platform = platform
        self._made: list[Change] = []

    def enable(
        self, ipv6: bool = False, record: Callable[[dict[str, str]], None] | None = None
    ) -> None:
        if record is not None:
            record({"net/ipv4/ip_forward": "0"})
        self._made.append(self.platform.change("IPv4 forwarding"))
        if ipv6:
            self._made.append(self.platform.change("IPv6 forwarding"))

    def restore(self) -> None:
        while self._made:
            self._made.pop().undone = True


class FakeNat:
    def __init__(self, platform: FakePlatform, device: str, networks: list[Network]) -> None:
        self.platform = platform
        self.what = f"NAT from {', '.join(str(n) for n in networks)} out of all but {device}"
        self._made: Change | None = None

    def apply(self) -> None:
        self._made = self.platform.change(self.what)

    def remove(self) -> None:
        if self._made is not None:
            self._made.undone = True


class FakeFullTunnel:
    def __init__(self, platform: FakePlatform, device: str) -> None:
        self.platform = platform
        self.device = device
        self.table = FAKE_TABLE
        self.fwmark = FAKE_TABLE
        self._made: Change | None = None

    @property
    def active(self) -> bool:
        return self._made is not None

    def apply(
        self,
        addresses: Sequence[Address],
        dns: Sequence[Address],
        *,
        ipv6: bool,
        gateways: Sequence[Address] = (),
    ) -> None:
        self.undo()
        self._made = self.platform.change(
            f"full tunnel through {self.device} for {', '.join(str(a) for a in addresses)}"
        )

    def undo(self) -> None:
        if self._made is not None:
            self._made.undone = True
            self._made = None
