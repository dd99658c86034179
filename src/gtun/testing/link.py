"""An in-memory link between the pure cores (tier 1): a relay at "R", gtun clients at
their names and, optionally, a stock WireGuard peer (a bare `WireGuard` device, as
wireguard-go would be) at "S".  `pump()` delivers datagrams until the link is quiet and
records what every side handed out."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from gtun.core.client import ClientCore
from gtun.core.offload import Gso
from gtun.core.relay import Relay, RelaySettings
from gtun.core.wg import PacketReceived, WireGuard

RELAY = "R"
STOCK = "S"
NETWORK = IPv4Network("10.66.0.0/24")

# What a core hands its device: a packet, or a (header, super-packet) pair.
TunWrite = bytes | tuple[Gso, bytes]


def relay_settings(**overrides: Any) -> RelaySettings:
    """The tier-1 relay: 10.66.0.0/24, itself at .1, MTU 1420, plus `overrides`."""
    return RelaySettings(
        network=NETWORK, relay_address=IPv4Address("10.66.0.1"), mtu=1420, **overrides
    )


class CoreLink:
    def __init__(self, relay: Relay, now: float) -> None:
        self.relay = relay
        self.now = now
        self.clients: dict[str, ClientCore] = {}
        self.stock: WireGuard | None = None
        self.events: dict[str, list[object]] = {}  # each client's events
        self.got: dict[str, list[TunWrite]] = {}  # what each client wrote to its device
        self.tun_in: list[TunWrite] = []  # what the relay wrote to its device
        self.relay_events: list[object] = []
        self.stock_got: list[bytes] = []  # the stock peer's decrypted packets
        # The address a client sees the relay's datagrams come from ("R" unless set).
        self.relay_addr: dict[str, object] = {}

    def add_client(self, name: str, client: ClientCore) -> ClientCore:
        self.clients[name] = client
        self.events[name] = []
        self.got[name] = []
        return client

    def take(self, name: str) -> list[TunWrite]:
        """What client `name` wrote to its device since the last take."""
        got, self.got[name] = self.got[name], []
        return got

    def clock(self) -> float:
        return self.now

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for name, client in self.clients.items():
                for data, _ in client.datagrams_to_send():
                    self.relay.receive_datagram(data, name, self.now)
                    moved = True
                while (ev := client.next_event()) is not None:
                    self.events[name].append(ev)
                self.got[name].extend(client.tun_writes())
            if self.stock is not None:
                for data, _ in self.stock.datagrams_to_send():
                    self.relay.receive_datagram(data, STOCK, self.now)
                    moved = True
                while (ev := self.stock.next_event()) is not None:
                    if isinstance(ev, PacketReceived):
                        self.stock_got.append(ev.data)
            for data, addr in self.relay.datagrams_to_send():
                if addr == STOCK:
                    assert self.stock is not None
                    self.stock.receive_datagram(data, RELAY, self.now)
                else:
                    source = self.relay_addr.get(addr, RELAY)
                    self.clients[addr].receive_datagram(data, source, self.now)
                moved = True
            self.tun_in.extend(self.relay.tun_writes())
            while (ev := self.relay.next_event()) is not None:
                self.relay_events.append(ev)
            if not moved:
                return
        raise AssertionError("link did not settle")

    def start(self, *names: str) -> None:
        """Start the named clients (all of them by default) and pump."""
        for name in names or tuple(self.clients):
            self.clients[name].start(self.now)
        self.pump()
