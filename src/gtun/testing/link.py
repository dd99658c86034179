"""An in-memory link between the pure cores (tier 1): a relay at "R", gtun clients at
their names and, optionally, a stock WireGuard peer (a bare `WireGuard` device, as
wireguard-go would be) at "S".  `pump()` delivers datagrams until the link is quiet and
records what every side handed out.

Besides its UDP path (addresses: the names), a client may have a stream path, a TCP
connection's stand-in (`connect()`: two `Stream` ends, one for each side, as each side
of a real connection has its own endpoint object).  A client's UDP path can be blocked
(`blocked`: every datagram either way is dropped and counted) and healed."""

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


class Stream:
    """One end of an in-memory stream connection between a client and the relay (the
    endpoint its side sends to); `other` is the far end.  Hashable by identity."""

    stream = True  # as a TCP endpoint: frames may be large (bulk.py)

    def __init__(self, client: str, side: str) -> None:
        self.client = client
        self.side = side  # "client" or "relay"
        self.other: Stream = self
        self.open = True

    def __repr__(self) -> str:
        return f"<stream {self.client} {self.side}{'' if self.open else ' closed'}>"


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
        self.blocked: set[str] = set()  # clients whose UDP path drops everything
        self.dropped: dict[str, int] = {}  # datagrams the blocked paths dropped, by client
        # Datagrams delivered, by (client, "udp" or "tcp", "up" to the relay or "down").
        self.carried: dict[tuple[str, str, str], int] = {}

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

    def connect(self, name: str) -> Stream:
        """A new stream connection for client `name`: its end (the relay's is `other`)."""
        mine, theirs = Stream(name, "client"), Stream(name, "relay")
        mine.other, theirs.other = theirs, mine
        return mine

    def disconnect(self, end: Stream) -> None:
        """Close a stream connection: both sides forget it as an endpoint, as the TCP
        transports' close callbacks have them do."""
        end.open = end.other.open = False
        self.clients[end.client].path_lost(end if end.side == "client" else end.other)
        relay_end = end if end.side == "relay" else end.other
        for peer in self.relay.wg.peers.values():
            if peer.endpoint is relay_end:
                peer.endpoint = None

    def _count(self, name: str, path: str, way: str) -> None:
        key = (name, path, way)
        self.carried[key] = self.carried.get(key, 0) + 1

    def _drop(self, name: str) -> None:
        self.dropped[name] = self.dropped.get(name, 0) + 1

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for name, client in self.clients.items():
                for data, addr in client.datagrams_to_send():
                    moved = True
                    if isinstance(addr, Stream):
                        if addr.open:
                            self._count(name, "tcp", "up")
                            self.relay.receive_datagram(data, addr.other, self.now)
                    elif name in self.blocked:
                        self._drop(name)
                    else:
                        self._count(name, "udp", "up")
                        self.relay.receive_datagram(data, name, self.now)
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
                elif isinstance(addr, Stream):
                    if addr.open:
                        self._count(addr.client, "tcp", "down")
                        self.clients[addr.client].receive_datagram(data, addr.other, self.now)
                elif addr in self.blocked:
                    assert isinstance(addr, str)
                    self._drop(addr)
                else:
                    if isinstance(addr, str):
                        self._count(addr, "udp", "down")
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
