"""An in-memory relay mesh (tier 1): several relay cores of one network, each a
WireGuard peer of the others, and gtun clients, each at one relay.  A relay's endpoint
is its name, a client's is its name; `pump()` delivers datagrams until the link is
quiet, records what every side handed out, and logs every plaintext a relay took from
another relay (`mesh_log`), so that a test can see how many hops a packet made."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from gtun.core.client import ClientCore
from gtun.core.relay import MeshRelay, PeerSpec, Relay, RelaySettings
from gtun.core.wg import Peer
from gtun.testing.link import TunWrite

NETWORK = IPv4Network("10.66.0.0/24")
NETWORK6 = IPv6Network("fd66::/64")


class MeshLink:
    """Relays by name, clients by name; `home[client]` is the relay it connects to."""

    def __init__(
        self,
        relays: Mapping[str, tuple[IPv4Network | IPv6Network, ...]],
        now: float = 1000.0,
    ) -> None:
        """`relays`: each relay's name and the routes behind it (its settings.routes,
        which it NATs to and the mesh shares)."""
        self.now = now
        self.relays: dict[str, Relay] = {}
        self.routes = dict(relays)
        for name, routes in relays.items():
            settings = RelaySettings(
                network=NETWORK,
                relay_address=IPv4Address("10.66.0.1"),
                mtu=1420,
                routes=routes,
                network6=NETWORK6,
            )
            relay = Relay(secrets.token_bytes(32), settings)
            self.relays[name] = relay
            self._watch(name, relay)
        self.clients: dict[str, ClientCore] = {}
        self.home: dict[str, str] = {}
        self.keys: dict[str, bytes] = {}  # each client's private key
        self.specs: list[PeerSpec] = []
        self.got: dict[str, list[TunWrite]] = {}  # what each client wrote to its device
        self.tun_in: dict[str, list[TunWrite]] = {name: [] for name in relays}
        self.events: dict[str, list[object]] = {name: [] for name in relays}
        # (relay that took it, relay it came from, plaintext): every mesh arrival.
        self.mesh_log: list[tuple[str, str, bytes]] = []
        self.client_events: dict[str, list[object]] = {}  # each client's events
        self.down: set[str] = set()  # relays whose datagrams (both ways) are lost

    def _watch(self, name: str, relay: Relay) -> None:
        """Log what `relay` takes from a mesh relay, then forward it as it would."""
        fast_lane = relay.forwarder.from_peer

        def from_peer(peer: Peer, plaintext: bytes, now: float) -> None:
            if relay.is_mesh(peer):
                self.mesh_log.append((name, peer.data.name, plaintext))
            fast_lane(peer, plaintext, now)

        relay.wg.on_packet = from_peer

    def mesh(self) -> list[MeshRelay]:
        """Every relay as the store would list it (each relay's list includes itself)."""
        return [
            MeshRelay(name, relay.wg.public_key, name, self.routes[name])
            for name, relay in self.relays.items()
        ]

    def add_client(
        self,
        name: str,
        relay: str,
        address: str,
        address6: str,
        *,
        key: bytes | None = None,
        **options: Any,
    ) -> ClientCore:
        """`options` go to ClientCore (known relays, failover ...)."""
        key = secrets.token_bytes(32) if key is None else key
        client = ClientCore(key, self.relays[relay].wg.public_key, relay, mode="tun", **options)
        self.clients[name] = client
        self.client_events[name] = []
        self.keys[name] = key
        self.home[name] = relay
        self.got[name] = []
        self.specs.append(
            PeerSpec(
                name, client.wg.public_key, IPv4Address(address), address6=IPv6Address(address6)
            )
        )
        return client

    def presence(self) -> dict[bytes, str | None]:
        return {self.clients[name].wg.public_key: relay for name, relay in self.home.items()}

    def configure(self, names: Iterable[str] | None = None) -> None:
        """Give every relay the peers, the mesh and the presence, as the store would."""
        for relay in self.relays.values():
            relay.set_peers(self.specs)
            relay.set_mesh(self.mesh(), self.now)
            relay.set_presence(self.presence())
        self.pump()
        for name in self.clients if names is None else names:
            self.clients[name].start(self.now)
        self.pump()

    def take(self, name: str) -> list[TunWrite]:
        got, self.got[name] = self.got[name], []
        return got

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for name, client in self.clients.items():
                for data, addr in client.datagrams_to_send():
                    assert isinstance(addr, str)
                    if addr not in self.down:
                        self.relays[addr].receive_datagram(data, name, self.now)
                        moved = True
                while (ev := client.next_event()) is not None:
                    self.client_events.setdefault(name, []).append(ev)
                self.got[name].extend(client.tun_writes())
            for rname, relay in self.relays.items():
                for data, addr in relay.datagrams_to_send():
                    if rname in self.down or addr in self.down:
                        continue
                    if addr in self.relays:
                        self.relays[addr].receive_datagram(data, rname, self.now)
                    else:
                        self.clients[addr].receive_datagram(data, rname, self.now)
                    moved = True
                self.tun_in[rname].extend(relay.tun_writes())
                while (ev := relay.next_event()) is not None:
                    self.events[rname].append(ev)
            if not moved:
                return
        raise AssertionError("mesh did not settle")

    def send_as_relay(self, sender: str, to: str, plaintext: bytes) -> None:
        """Relay `sender` sends `plaintext` to relay `to` over their mesh session, as a
        hostile relay (holding its own key) could."""
        relay = self.relays[sender]
        peer = relay.mesh_peer(to)
        assert peer is not None
        relay.wg.send(peer, plaintext, self.now)
        self.pump()
