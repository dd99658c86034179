"""The relay, sans-IO: a WireGuard device, its peers, gtun's configuration push, and a
forwarder (forward.py) that moves the data: an IP router in TUN mode, an Ethernet switch
in TAP mode, chosen once when the relay is built.

Theory of operation
-------------------
Every peer owns its virtual addresses and the subnets behind it (PeerSpec); the
forwarder's route table maps them back to the peer.  Data plaintexts go from the
WireGuard core straight to the forwarder (the data fast lane); gtun's own messages
(tunnel.py) come back here: a gtun client asks for its configuration and pings; stock
WireGuard peers never send them and so never get any.  A configuration request decides,
once, what the relay and that client do beyond plain WireGuard (tunnel.Caps), kept in
the peer's state.

The caller drains datagrams (datagrams_to_send()), TUN writes (tun_writes()) and events
(next_event()) after each call, as with the WireGuard core itself.

Rejoining after a restart
-------------------------
A relay that restarts has forgotten every session; left alone, a UDP client notices
only when WireGuard's own timer fires (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, about 15 s).
Either side of WireGuard may initiate, so the relay does it: rejoin() is given the
endpoint each peer last used (the edge keeps them in its state store), and the relay
initiates a handshake to each, REJOIN_PER_TICK every REJOIN_TICK so that ten thousand
peers do not burst.  And while a peer has no session, a transport message under an
unknown receiver index (a client still sending under its old session) from that peer's
stored endpoint starts a handshake at once (WireGuard allows one initiation per peer per
REKEY_TIMEOUT, so a flood in that address's name costs at most that).  Stock WireGuard
peers answer as gtun clients do.

A relay mesh, one hop
---------------------
The relays of one network share their peers (set_peers() is given the whole network's)
and are WireGuard peers of each other (set_mesh(): each other relay's name, key,
endpoint and the routes behind it).  A mesh peer is no client: it gets no configuration
(its gtun messages are dropped, "mesh_message"), no lease and no client route; its
state is a MeshState, not a PeerState.  The presence map (set_presence(), or
update_presence() for a few changes) says which relay holds each client's session; the
forwarder sends a packet for a client held elsewhere, or for a route behind another
relay, to that relay, and delivers what a mesh relay sends only to a client held here or
to its own TUN, never on to a third relay (forward.py).  A client claims its session
here (SessionHere: the edge writes the presence) when it asks for its configuration or
PINGs, and a stock peer when its data comes: a handshake alone claims nothing, since a
failover client measures the RTT of relays it does not use.  Data from a gtun client the
map holds elsewhere claims nothing either (packets still in flight after a move).  It
is held here from then on, until the presence map names another relay.  A mesh relay
speaking for a client that the map holds nowhere and that claimed nothing here teaches
that the client is held there (its claim reached that relay before the store's word
reached this one).  The
mesh forwards IP packets: a relay in TAP mode refuses one.  A gtun client that asks
(tunnel.Caps.relays) is pushed the other relays (name, key, endpoint: mesh_relays()) in its
configuration, to fail over to (client.py).  The core reads no store: the
edge feeds it the mesh and the presence, and writes the presence its events imply.

Health
------
`gtun doctor` on a client asks the relay what is wrong on the relay's side: the edge
looks at its machine every few seconds (forwarding, its NAT table, its device and
routes, the store) and gives set_health() the snapshot; a client that negotiated
tunnel.Caps.health asks with HEALTH_REQUEST and is answered from that snapshot, with its
age, within a token bucket per peer (HEALTH_RATE, HEALTH_BURST).  A mesh relay, a stock
peer and a client that did not negotiate it are answered nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from gtun.core import tunnel as tm
from gtun.core.drops import RELAY_DROP_REASONS
from gtun.core.errors import LocalProtocolError
from gtun.core.forward import EthernetForwarder, Forwarder, IpForwarder, TunWrite, receive_all
from gtun.core.routing import RouteTable
from gtun.core.switch import Switch
from gtun.core.tunnel import NO_CAPS, Caps, PushedConfig
from gtun.core.wg import (
    HandshakeCompleted,
    Peer,
    PeerUnknown,
    SessionConfirmed,
    SessionUnconfirmed,
    WireGuard,
)
from gtun.core.wg.events import Event, HandshakeTimedOut

Network = IPv4Network | IPv6Network

# Tuning knobs.  Events kept for a caller that does not drain them (the driver drains
# after every call, so only a caller's bug or a flood between two drains reaches it).
MAX_EVENTS = 1024
# Handshakes initiated to stored endpoints after a restart: at most REJOIN_PER_TICK every
# REJOIN_TICK seconds (500 a second: 10,000 peers within 20 s, a few ms of CPU a tick).
REJOIN_PER_TICK = 10
REJOIN_TICK = 0.02
# A mesh peer (another relay) is sent a keepalive after this long without traffic, so
# that the session between two relays stays up and a NAT between them keeps its state.
MESH_KEEPALIVE = 25.0
# Path MTU probes answered per peer: a token bucket.  A client's black-hole search sends
# client.PROBES_PER_ROUND at once in about five rounds of a quarter of a second, then
# one probe a second at most; a probe costs the relay one encryption of up to its MTU.
PROBE_RATE = 20.0  # per second
PROBE_BURST = 64
# Health requests answered per peer: a token bucket too.  `gtun doctor` asks once a run;
# an answer is a few hundred bytes, for a request of a few dozen.
HEALTH_RATE = 1.0  # per second
HEALTH_BURST = 4


@dataclass
class PeerSpec:
    """What the relay knows of a peer from its configuration and leases."""

    name: str
    public_key: bytes
    address: IPv4Address
    subnets: tuple[Network, ...] = ()
    address6: IPv6Address | None = None
    preshared_key: bytes | None = None  # WireGuard's optional PSK (32 bytes), per peer

    def owned(self) -> list[Network]:
        # (address, prefix) tuples, not text: no parsing, for 10,000 peers a reload.
        nets: list[Network] = [IPv4Network((self.address, 32))]
        if self.address6 is not None:
            nets.append(IPv6Network((self.address6, 128)))
        nets.extend(self.subnets)
        return nets


class PeerSetError(LocalProtocolError):
    """A peer set Relay.set_peers() refused, changing nothing; `peer` names the peer at
    fault (the configuration's mistake, which the edge reports with its file)."""

    def __init__(self, peer: str, message: str) -> None:
        super().__init__(f"peer {peer}: {message}")
        self.peer = peer


@dataclass
class PeerState:
    """The relay's per-peer state, kept in `Peer.data`."""

    spec: PeerSpec
    is_gtun: bool = False  # asked for its configuration: a gtun client
    here: bool = False  # claimed its session here (SessionHere), until the map moves it
    caps: Caps = NO_CAPS  # negotiated at its configuration request
    drops: dict[str, int] = field(default_factory=dict)
    path_mtu: int | None = None  # what the client's probes found (it says, in each probe)
    probes: int = 0  # probes answered
    probe_tokens: float = PROBE_BURST
    probe_refill: float | None = None  # when the tokens were last counted
    health_tokens: float = HEALTH_BURST
    health_refill: float | None = None


@dataclass(frozen=True, slots=True)
class MeshRelay:
    """Another relay of the network, as the shared store describes it: its name, public
    key, endpoint (what the edge's transport sends to) and the routes behind it (the
    LANs it NATs to, pushed to every relay's clients)."""

    name: str
    public_key: bytes
    endpoint: Hashable | None = None
    routes: tuple[Network, ...] = ()


class MeshError(LocalProtocolError):
    """A mesh or presence map the relay refused, changing nothing."""


@dataclass
class MeshState:
    """The relay's state of a mesh peer (another relay), kept in `Peer.data`: the
    counters a forwarder charges any sender, and no capability beyond plain WireGuard."""

    relay: MeshRelay
    is_gtun: bool = False  # never: it asks for no configuration
    caps: Caps = NO_CAPS  # plain packets each way, full checksums
    drops: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.relay.name


@dataclass(frozen=True, slots=True)
class PeerJoined(Event):
    """A gtun client asked for (and got) its configuration."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class SessionHere(Event):
    """A client claimed its session here (a configuration request, a PING, or a stock
    peer's data): with a shared store, the edge writes the presence."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class SessionHeld(Event):
    """A relay of several workers: this worker made a session with `peer` that the peer
    uses (it initiated and we answered, and its data came; or we initiated and it
    answered).  The edge tells the other workers, which hand it the peer's packets;
    `since` is the session's handshake time."""

    peer: Peer
    since: float


@dataclass(frozen=True, slots=True)
class InitiationSeen(Event):
    """A relay of several workers: this worker accepted an initiation from `peer` with
    TAI64N `timestamp`.  The edge tells the other workers (`seen_initiation()`), so that
    the same initiation replayed to them is refused as it is here."""

    peer: Peer
    timestamp: bytes


@dataclass(frozen=True, slots=True)
class CapsLearned(Event):
    """A relay of several workers: `peer` negotiated `caps` with this worker (its
    configuration request).  The edge tells the other workers (`learned_caps()`): how
    they forward to the peer (partial checksums, bulk frames) depends on them."""

    peer: Peer
    caps: Caps


@dataclass(frozen=True, slots=True)
class PeerRefused(Event):
    """A peer was refused: a gtun client whose mode does not match the relay's, or a
    stock WireGuard peer of a relay in TAP mode (said once, at its first packet)."""

    peer: Peer
    reason: str


@dataclass
class RelaySettings:
    network: IPv4Network
    relay_address: IPv4Address
    mtu: int
    routes: tuple[Network, ...] = ()
    dns: tuple[IPv4Address | IPv6Address, ...] = ()
    mode: str = "tun"
    network6: IPv6Network | None = None  # IPv6 inside the tunnel; the relay is its ::1
    # The relay's TUN completes TCP checksums (offloads granted): then gtun clients may
    # send TCP segments with only the pseudo-header sum (offload.py).
    partial_ok: bool = False

    @property
    def relay_address6(self) -> IPv6Address | None:
        return None if self.network6 is None else self.network6.network_address + 1


class Relay:
    def __init__(
        self,
        private_key: bytes,
        settings: RelaySettings,
        *,
        wall_offset: float = 0.0,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        """`worker` of `workers`: this core is one of several processes of one relay
        (app/workers.py), each with the same peers, the sessions it made itself, and
        local indexes that name it (see io/steering.py).  Raises ValueError for a
        worker outside 0..workers-1."""
        self.settings = settings
        self.wg = WireGuard(
            private_key, wall_offset=wall_offset, mtu=settings.mtu, worker=worker, workers=workers
        )
        self.drops: dict[str, int] = dict.fromkeys(RELAY_DROP_REASONS, 0)
        self._events: deque[Event] = deque()
        self._subnets: list[tuple[Peer, Network]] = []  # (owner, LAN behind it), of set_peers
        hooks = (self.wg, self.drops, self._count, self._tunnel_message, self._refuse)
        self.forwarder: Forwarder = (
            EthernetForwarder(*hooks, mtu=settings.mtu)
            if settings.mode == "tap"
            else IpForwarder(*hooks)
        )
        self.wg.on_packet = self.forwarder.from_peer  # the data fast lane
        self.forwarder.worker = worker
        self.forwarder.workers = workers
        self.wg.report_confirmed = workers > 1
        # With workers: when this worker last took each peer (SessionHeld's `since`),
        # so that an older notice from another worker does not take it away.
        self._held_at: dict[Peer, float] = {}
        self.wg.on_unknown_index = self._unknown_index
        # rejoin(): peers still to be sent an initiation, and the stored endpoints of
        # peers without a session yet (both bounded by the peers).
        self._rejoin: deque[Peer] = deque()
        self._t_rejoin: float | None = None
        self._stored_at: dict[Hashable, Peer] = {}
        # The mesh: the other relays' peers by name, the routes behind them, this
        # relay's name (when set_mesh() was given it), and the presence map as given.
        self._mesh: dict[str, Peer] = {}
        self._mesh_routes: list[tuple[Network, Peer]] = []
        self.name: str | None = None
        self._presence: dict[bytes, str] = {}
        self.forwarder.own = self._own_table()
        # What the edge last saw of the relay's machine (set_health()) and when.
        self._health = tm.RelayHealth()
        self._health_at: float | None = None

    @property
    def table(self) -> RouteTable[Peer]:
        return self.forwarder.table

    @property
    def switch(self) -> Switch[Peer | str] | None:
        """The learning switch in TAP mode, else None."""
        fwd = self.forwarder
        return fwd.switch if isinstance(fwd, EthernetForwarder) else None

    # --- peers ---------------------------------------------------------------------

    def set_peers(self, specs: Iterable[PeerSpec]) -> tuple[list[str], list[str]]:
        """Make the peer set equal to `specs`, keeping the sessions of unchanged keys.

        All or nothing: every spec is checked (and the new route table built aside)
        before anything changes, so when it raises the peers, their routes and every
        session are as they were.  Returns (added names, removed names).  Raises
        PeerSetError naming the first peer at fault: a malformed or low-order key, our
        own key, a name or key given twice, an address or subnet given to two peers, the
        relay's own address, or a subnet overlapping the virtual network."""
        wanted: dict[bytes, tuple[PeerSpec, Peer]] = {}
        fresh: list[Peer] = []
        names: set[str] = set()
        table: RouteTable[Peer] = RouteTable()
        owners: dict[Network, str] = {}
        s = self.settings
        virtual: list[Network] = [s.network]
        owners[IPv4Network(f"{s.relay_address}/32")] = "the relay"
        if s.network6 is not None:
            virtual.append(s.network6)
            owners[IPv6Network(f"{s.relay_address6}/128")] = "the relay"
        for net, relay in self._mesh_routes:
            owners[net] = f"relay {relay.data.name}"
            table.insert(net, relay)
        for spec in specs:
            name = spec.name
            if name in names:
                raise PeerSetError(name, "name given to two peers")
            names.add(name)
            key = spec.public_key
            if key in wanted:
                raise PeerSetError(name, f"public key also given to {wanted[key][0].name}")
            peer = self.wg.peers.get(key)
            if peer is not None and isinstance(peer.data, MeshState):
                raise PeerSetError(name, f"public key is relay {peer.data.name}'s")
            psk = spec.preshared_key
            if psk is not None and len(psk) != 32:
                raise PeerSetError(name, "preshared key must be 32 bytes")
            if peer is None:
                try:
                    peer = self.wg.new_peer(key, preshared_key=psk, data=PeerState(spec))
                except ValueError as exc:
                    raise PeerSetError(name, str(exc)) from exc
                fresh.append(peer)
            wanted[key] = (spec, peer)
            for net in spec.owned():
                other = owners.get(net)
                if other is not None:
                    raise PeerSetError(name, f"{net} is also {other}'s")
                inside = [v for v in virtual if net in spec.subnets and _overlaps(net, v)]
                if inside:
                    raise PeerSetError(
                        name, f"subnet {net} overlaps the virtual network {inside[0]}"
                    )
                owners[net] = name
                table.insert(net, peer)
        gone = [
            p
            for key, p in self.wg.peers.items()
            if key not in wanted and isinstance(p.data, PeerState)
        ]
        # Checked: from here on nothing raises (update_peers checks again, first).
        self.wg.update_peers(add=fresh, remove=gone)
        fwd = self.forwarder
        fwd.peers_changed()
        for peer in gone:
            fwd.peer_removed(peer)
            self._held_at.pop(peer, None)
        for spec, peer in wanted.values():
            peer.data.spec = spec
            # A new preshared key ends the sessions made with the old one (a key
            # revoked stops working now, not at the next rekey).
            self.wg.set_preshared_key(peer, spec.preshared_key)
        fwd.table = table
        self._subnets = [(peer, net) for spec, peer in wanted.values() for net in spec.subnets]
        fwd.own = self._own_table()
        self._apply_presence()
        return [p.data.spec.name for p in fresh], [p.data.spec.name for p in gone]

    # --- the mesh ------------------------------------------------------------------

    def set_mesh(
        self, relays: Iterable[MeshRelay], now: float | None = None
    ) -> tuple[list[str], list[str]]:
        """Make the other relays of the network this relay's mesh, keeping the sessions
        of unchanged keys; with `now`, initiate a handshake to each new relay that has
        an endpoint (else the first packet for it does).  `relays` may include this
        relay (its key is ours): that only names it.

        All or nothing, as set_peers(): raises MeshError, changing nothing, for a mesh
        in TAP mode, a name or key given twice, a malformed or low-order key, a client's
        key, or a route given to two relays, owned by a client, or overlapping the
        virtual network.  A route this relay also has (settings.routes) stays its own.
        Returns (added names, removed names)."""
        relays = list(relays)
        s = self.settings
        others = [r for r in relays if r.public_key != self.wg.public_key]
        if others and self.forwarder.tap:
            raise MeshError(
                "a relay mesh needs tun mode: this relay runs in tap mode, and the mesh "
                "forwards IP packets, not Ethernet frames"
            )
        names: set[str] = set()
        wanted: dict[bytes, tuple[MeshRelay, Peer]] = {}
        fresh: list[Peer] = []
        ours = set(s.routes)
        virtual: list[Network] = [s.network] + ([s.network6] if s.network6 else [])
        old = set(self._mesh.values())
        clients = [(net, p) for net, p in self.table.routes() if p not in old]
        owners: dict[Network, str] = {net: p.data.spec.name for net, p in clients}
        routes: list[tuple[Network, Peer]] = []
        me: str | None = None
        for relay in relays:
            name = relay.name
            if name in names:
                raise MeshError(f"relay {name}: name given to two relays")
            names.add(name)
            key = relay.public_key
            if key == self.wg.public_key:
                me = name
                continue
            if key in wanted:
                raise MeshError(f"relay {name}: public key also given to {wanted[key][0].name}")
            peer = self.wg.peers.get(key)
            if peer is not None and not isinstance(peer.data, MeshState):
                raise MeshError(f"relay {name}: public key is peer {peer.data.spec.name}'s")
            if peer is None:
                try:
                    peer = self.wg.new_peer(
                        key,
                        endpoint=relay.endpoint,
                        persistent_keepalive=MESH_KEEPALIVE,
                        data=MeshState(relay),
                    )
                except ValueError as exc:
                    raise MeshError(f"relay {name}: {exc}") from exc
                fresh.append(peer)
            wanted[key] = (relay, peer)
            for net in relay.routes:
                if net in ours:
                    continue  # served here, NAT here
                inside = [v for v in virtual if _overlaps(net, v)]
                if inside:
                    raise MeshError(
                        f"relay {name}: route {net} overlaps the virtual network {inside[0]}"
                    )
                other = owners.get(net)
                if other is not None:
                    raise MeshError(f"relay {name}: route {net} is also {other}'s")
                owners[net] = f"relay {name}"
                routes.append((net, peer))
        gone = [p for p in old if p.public_key not in wanted]
        # Checked: from here on nothing raises.
        fwd = self.forwarder
        fwd.flush()  # what was routed under the old mesh leaves by it
        self.wg.update_peers(add=fresh, remove=gone)
        for relay, peer in wanted.values():
            state: MeshState = peer.data
            if relay.endpoint is not None and relay.endpoint != state.relay.endpoint:
                peer.endpoint = relay.endpoint  # moved in the store; else keep roaming's
            state.relay = relay
        table: RouteTable[Peer] = RouteTable()
        for net, peer in clients:
            table.insert(net, peer)
        for net, peer in routes:
            table.insert(net, peer)
        fwd.table = table
        for peer in gone:
            fwd.peer_removed(peer)
            self._held_at.pop(peer, None)
        fwd.peers_changed()
        self._mesh = {peer.data.name: peer for _, peer in wanted.values()}
        self._mesh_routes = routes
        self.name = me
        fwd.mesh = frozenset(self._mesh.values())
        fwd.own = self._own_table()
        self._apply_presence()
        if now is not None:
            for peer in fresh:
                if peer.endpoint is not None:
                    self.wg.initiate_handshake(peer, now)
        return [p.data.name for p in fresh], [p.data.name for p in gone]

    def set_presence(self, presence: Mapping[bytes, str | None]) -> None:
        """Replace the presence map: a client's public key -> the name of the relay
        holding its session (None, or this relay's name: here).  A key of no peer is
        kept for when it becomes one; a relay not in the mesh (yet, or any more) holds
        nothing reachable: its clients are treated as held here, where they have no
        session, so nothing is sent to them and nothing is taken in their name from a
        mesh relay.  What was routed before the call leaves first (it was gathered
        under the old map); every cached verdict is cleared.  Raises MeshError,
        changing nothing, for a key that is not 32 bytes or a name that is no string."""
        checked = self._check_presence(presence)
        self.forwarder.flush()
        self._presence = {k: v for k, v in checked.items() if v is not None}
        self._apply_presence()

    def update_presence(self, changes: Mapping[bytes, str | None]) -> None:
        """Change the presence of a few clients (as set_presence() for the rest of the
        map: unchanged), without walking every peer.  Raises as set_presence()."""
        checked = self._check_presence(changes)
        fwd = self.forwarder
        fwd.flush()
        for key, name in checked.items():
            if name is None:
                self._presence.pop(key, None)
            else:
                self._presence[key] = name
            peer = self.wg.peers.get(key)
            if peer is None or not isinstance(peer.data, PeerState):
                continue
            relay = None if name is None else self._mesh.get(name)
            if relay is None:
                fwd.where.pop(peer, None)
            else:
                fwd.where[peer] = relay
                peer.data.here = False
        fwd.peers_changed()

    def presence_of(self, peer: Peer) -> str | None:
        """The name of the mesh relay holding `peer`'s session, or None: here."""
        relay = self.forwarder.where.get(peer)
        return None if relay is None else relay.data.name

    def mesh_peer(self, name: str) -> Peer | None:
        """The WireGuard peer of mesh relay `name`, or None."""
        return self._mesh.get(name)

    def is_mesh(self, peer: Peer) -> bool:
        """Whether `peer` is another relay (its data a MeshState), not a client."""
        return isinstance(peer.data, MeshState)

    def _check_presence(self, presence: Mapping[bytes, str | None]) -> dict[bytes, str | None]:
        checked: dict[bytes, str | None] = {}
        for key, name in presence.items():
            if not isinstance(key, bytes) or len(key) != 32:
                raise MeshError(f"presence: {key!r} is no public key")
            if name is not None and not isinstance(name, str):
                raise MeshError(f"presence of {key.hex()[:8]}: {name!r} is no relay name")
            checked[key] = name
        return checked

    def _apply_presence(self) -> None:
        """Rebuild the forwarder's `where` from the presence map, the peers and the
        mesh, and clear the verdicts derived from the old one."""
        mesh, peers = self._mesh, self.wg.peers
        where: dict[Peer, Peer] = {}
        if mesh:
            for key, name in self._presence.items():
                relay = mesh.get(name)
                peer = peers.get(key)
                if relay is not None and peer is not None and isinstance(peer.data, PeerState):
                    where[peer] = relay
                    peer.data.here = False
        fwd = self.forwarder
        fwd.where = where
        fwd.peers_changed()

    def _own_table(self) -> RouteTable[bool]:
        """What this relay's TUN takes from a mesh relay: its addresses and routes."""
        s = self.settings
        own: RouteTable[bool] = RouteTable()
        own.insert(IPv4Network((s.relay_address, 32)), True)
        if s.relay_address6 is not None:
            own.insert(IPv6Network((s.relay_address6, 128)), True)
        for net in s.routes:
            own.insert(net, True)
        return own

    # --- health --------------------------------------------------------------------

    def set_health(self, health: tm.RelayHealth, now: float) -> None:
        """What the edge saw of the relay's machine at `now` (forwarding, NAT, device,
        routes, store), for the answers to HEALTH_REQUEST; the answers carry its age.
        Until the first call, the answer says nothing is known."""
        self._health = health
        self._health_at = now

    def health(self, now: float) -> tm.RelayHealth:
        """The health a HEALTH answer at `now` carries."""
        if self._health_at is None:
            return tm.RelayHealth()
        return replace(self._health, age=max(0.0, now - self._health_at))

    def rejoin(self, endpoints: Mapping[bytes, Hashable], now: float) -> int:
        """Initiate handshakes to peers at the endpoints they last used (public key ->
        endpoint), spread over time; a peer that already has an endpoint (it reached us
        first) or is unknown is skipped.  Returns how many were queued."""
        queued = 0
        for key, endpoint in endpoints.items():
            peer = self.wg.peers.get(key)
            if peer is None or peer.endpoint is not None:
                continue
            peer.endpoint = endpoint
            self._stored_at[endpoint] = peer
            self._rejoin.append(peer)
            queued += 1
        if queued and self._t_rejoin is None:
            self._t_rejoin = now
        return queued

    def peer_by_name(self, name: str) -> Peer | None:
        """The client peer `name` (never a mesh relay: mesh_peer()), or None."""
        for peer in self.wg.peers.values():
            data = peer.data
            if isinstance(data, PeerState) and data.spec.name == name:
                return peer
        return None

    def routes_for(self, peer: Peer) -> list[Network]:
        """The networks a client reaches through the relay: pushed routes (this
        relay's, then the other relays' of the mesh) and the subnets behind the other
        peers."""
        # From the list set_peers() keeps: a walk over every peer for each of 10,000
        # configuration requests would make joining quadratic.
        routes = list(self.settings.routes)
        routes.extend(net for net, _ in self._mesh_routes)
        routes.extend(net for owner, net in self._subnets if owner is not peer)
        return routes

    # --- outputs -------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Any]]:
        self.forwarder.flush()
        return self.wg.datagrams_to_send()

    def tun_writes(self) -> list[TunWrite]:
        """Packets for the TUN: plain ones, and (header, super-packet) pairs."""
        fwd = self.forwarder
        out = fwd.tun_out
        fwd.tun_out = []
        return out

    def handoffs(self) -> list[tuple[int, Peer | None, TunWrite]]:
        """What goes to peers whose sessions other workers hold (and, in TAP mode,
        frames for the other workers' switches): (worker, peer, packet), for the edge
        to hand over.  Empty with one worker."""
        fwd = self.forwarder
        fwd.flush()
        out = fwd.handoff
        if out:
            fwd.handoff = []
        return out

    def handed(self, worker: int, key: bytes | None, items: list[TunWrite], now: float) -> None:
        """What worker `worker` handed over: packets for the peer with public key `key`
        (sent by this worker's session with it, or after a handshake when it has
        none), or frames (key None) for this worker's switch.  Never handed on.  An
        unknown key is counted ("handoff_unknown")."""
        fwd = self.forwarder
        peer = None
        if key is not None:
            peer = self.wg.peers.get(key)
            if peer is None:
                self.drops["handoff_unknown"] += len(items)
                return
        if isinstance(fwd, EthernetForwarder):
            fwd._handed_from = worker
        if peer is not None and isinstance(fwd, IpForwarder):
            run: list[bytes] = []  # packets in a row, sent as one batch, in order
            for item in items:
                if isinstance(item, bytes):
                    run.append(item)
                    continue
                if run:
                    fwd.send_batch(peer, run, now)
                    run = []
                fwd.deliver(peer, item, now)
            if run:
                fwd.send_batch(peer, run, now)
        else:
            for item in items:
                fwd.deliver(peer, item, now)
        self._drain_core(now)

    def held_by(self, key: bytes, worker: int, since: float) -> bool:
        """Worker `worker` made a session with the peer of key `key` at `since` (the
        monotonic time of its handshake): packets to the peer go there from now on,
        unless this worker's own session is newer.  Whether anything changed."""
        peer = self.wg.peers.get(key)
        if peer is None:
            return False
        fwd = self.forwarder
        if worker == fwd.worker:
            return fwd.away.pop(peer, None) is not None
        taken = self._held_at.get(peer)
        if taken is not None and taken > since:
            return False  # ours is newer: that worker will hear of it
        if fwd.away.get(peer) == worker:
            return False
        fwd.flush()
        fwd.away[peer] = worker
        if isinstance(fwd, EthernetForwarder):
            fwd.gone_elsewhere(peer)
        return True

    def learned_caps(self, key: bytes, caps: Caps) -> None:
        """Another worker negotiated `caps` with the peer of `key` (a gtun client)."""
        peer = self.wg.peers.get(key)
        if peer is not None and isinstance(peer.data, PeerState):
            peer.data.caps = caps
            peer.data.is_gtun = True

    def seen_initiation(self, key: bytes, timestamp: bytes) -> None:
        """Another worker accepted an initiation from the peer of `key` with TAI64N
        `timestamp`: one not newer is a replay here too (WireGuard's replay check)."""
        peer = self.wg.peers.get(key)
        if peer is not None and len(timestamp) == 12 and timestamp > peer.last_timestamp:
            peer.last_timestamp = timestamp

    def held_elsewhere(self, peer: Peer) -> int | None:
        """The worker holding `peer`'s session when it is another one, else None."""
        return self.forwarder.away.get(peer)

    def next_event(self) -> Event | None:
        """Events of the relay and of the WireGuard core, in order."""
        return self._events.popleft() if self._events else None

    # --- inputs --------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Hashable, now: float) -> None:
        self.wg.receive_datagram(data, addr, now)
        self._drain_core(now)

    def receive_datagrams(self, batch: list[tuple[bytes, Any]], now: float) -> None:
        """receive_datagram() for each of `batch`, in order (the edge's per-wake-up
        call: the loop runs compiled, and the relay is asked only when it has work)."""
        receive_all(self.wg, self.forwarder, batch, now, self._drain_core)

    def tun_packet(self, packet: bytes, now: float) -> None:
        self.forwarder.tun_packet(packet, now)

    def tun_super(self, hdr: Any, packet: bytes, now: float) -> None:
        self.forwarder.tun_super(hdr, packet, now)

    def handle_timer(self, now: float) -> None:
        self.wg.handle_timer(now)
        if self._t_rejoin is not None and self._t_rejoin <= now:
            self._rejoin_some(now)
        self._drain_core(now)

    def get_timer(self) -> float | None:
        wg_timer = self.wg.get_timer()
        if self._t_rejoin is None:
            return wg_timer
        return self._t_rejoin if wg_timer is None else min(wg_timer, self._t_rejoin)

    # --- internals -----------------------------------------------------------------

    def _rejoin_some(self, now: float) -> None:
        queue = self._rejoin
        wg = self.wg
        for _ in range(min(REJOIN_PER_TICK, len(queue))):
            peer = queue.popleft()
            # Skipped: a peer removed since, or one that reached us on its own.
            if wg.peers.get(peer.public_key) is peer and not peer.has_session:
                wg.initiate_handshake(peer, now)
        self._t_rejoin = now + REJOIN_TICK if queue else None

    def _unknown_index(self, addr: Hashable, now: float) -> None:
        peer = self._stored_at.get(addr)
        if peer is None:
            return
        if self.wg.peers.get(peer.public_key) is not peer or peer.has_session:
            del self._stored_at[addr]  # removed, or rejoined: nothing left to do here
            return
        if peer.endpoint == addr:
            self.wg.initiate_handshake(peer, now)  # one per REKEY_TIMEOUT at most

    def _drain_core(self, now: float) -> None:
        wg = self.wg
        while True:
            event = wg.next_event()
            if event is None:
                break
            # Data never comes as an event: the fast lane (on_packet) delivers it.
            if isinstance(event, HandshakeCompleted | HandshakeTimedOut | PeerUnknown):
                if isinstance(event, HandshakeTimedOut):
                    self.forwarder.gone(event.peer)
                elif isinstance(event, HandshakeCompleted):
                    if event.initiator:
                        self._held_here(event.peer)  # it answered us: it uses the session
                    elif self.forwarder.workers > 1:
                        self._emit(InitiationSeen(event.peer, event.peer.last_timestamp))
                self._emit(event)
            elif isinstance(event, SessionConfirmed):
                self._held_here(event.peer)  # our answer used: not a replayed initiation
            elif isinstance(event, SessionUnconfirmed):
                self._count(event.peer, "unconfirmed")
                self._emit(event)
        fwd = self.forwarder
        if fwd.claims:
            claims, fwd.claims = fwd.claims, []
            for peer in claims:
                self._claim(peer)
        if fwd.learned:
            learned, fwd.learned = fwd.learned, []
            for peer, relay in learned:
                if peer not in fwd.where and not peer.data.here:
                    fwd.flush()
                    fwd.where[peer] = relay
                    self._presence[peer.public_key] = relay.data.name
                    fwd.peers_changed()

    def _held_here(self, peer: Peer) -> None:
        """With several workers: `peer` uses a session of this worker's; its packets
        come here now, and the edge tells the other workers (SessionHeld)."""
        if self.forwarder.workers <= 1 or peer.last_handshake is None:
            return
        fwd = self.forwarder
        if peer in fwd.away:
            fwd.flush()
            del fwd.away[peer]
        self._held_at[peer] = peer.last_handshake
        self._emit(SessionHeld(peer, peer.last_handshake))

    def _claim(self, peer: Peer) -> None:
        """A client claimed its session here: held here now, whatever the presence map
        said, and said once (SessionHere) so that the edge writes it to the store."""
        state = peer.data
        if not isinstance(state, PeerState) or state.here:
            return
        if self.wg.peers.get(peer.public_key) is not peer:
            return  # removed meanwhile
        state.here = True
        fwd = self.forwarder
        if peer in fwd.where:
            fwd.flush()
            del fwd.where[peer]
            self._presence.pop(peer.public_key, None)
            fwd.peers_changed()
        self._emit(SessionHere(peer))

    def _count(self, peer: Peer, reason: str) -> None:
        self.drops[reason] += 1
        per_peer = peer.data.drops
        per_peer[reason] = per_peer.get(reason, 0) + 1

    def _refuse(self, peer: Peer, reason: str) -> None:
        self._emit(PeerRefused(peer, reason))

    def _emit(self, event: Event) -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append(event)
        else:
            self.drops["events_full"] += 1

    def _tunnel_message(self, peer: Peer, plaintext: bytes, now: float) -> None:
        try:
            msg = tm.pull_message(plaintext)
        except tm.TunnelMessageError:
            self._count(peer, "malformed")
            return
        if isinstance(peer.data, MeshState):
            self._count(peer, "mesh_message")  # relays push nothing to each other
            return
        state: PeerState = peer.data
        if msg.type == tm.CONFIG_REQUEST:
            request = tm.parse_config_request(msg.payload)
            mode = self.settings.mode
            if request.mode is not None and request.mode != mode:
                reason = f"this relay runs in {mode} mode; the client asked for {request.mode}"
                self.wg.send(peer, tm.push_message(tm.REFUSED, {"reason": reason}), now)
                self._refuse(peer, reason)
                return
            state.is_gtun = True
            state.caps = tm.relay_caps(
                request, tap=self.forwarder.tap, partial_ok=self.settings.partial_ok
            )
            if self.forwarder.workers > 1:
                self._emit(CapsLearned(peer, state.caps))
            self.forwarder.joined(peer)
            try:
                answer = tm.push_config(self.config_for(peer))
            except LocalProtocolError as exc:  # hundreds of routes: more than a message holds
                answer = tm.push_message(tm.REFUSED, {"reason": f"configuration: {exc}"})
            self.wg.send(peer, answer, now)
            self._emit(PeerJoined(peer))
            self._claim(peer)
        elif msg.type == tm.PING:
            state.is_gtun = True
            self.wg.send(peer, tm.push_message(tm.PONG, {}), now)
            self._claim(peer)
        elif msg.type == tm.PROBE:
            self._answer_probe(peer, state, msg, len(plaintext), now)
        elif msg.type == tm.HEALTH_REQUEST:
            self._answer_health(peer, state, msg, now)
        else:
            self._count(peer, "malformed")

    def _answer_probe(
        self, peer: Peer, state: PeerState, msg: tm.TunnelMessage, size: int, now: float
    ) -> None:
        """Answer a path MTU probe with an acknowledgement of the probe's own length
        (so the answer tests the way back, and is never larger than what came), within
        the peer's token bucket."""
        try:
            probe = tm.parse_probe(msg, size)
        except tm.TunnelMessageError:
            self._count(peer, "malformed")
            return
        last = state.probe_refill
        if last is not None:
            state.probe_tokens = min(PROBE_BURST, state.probe_tokens + (now - last) * PROBE_RATE)
        state.probe_refill = now
        if state.probe_tokens < 1.0:
            self._count(peer, "probe_ratelimited")
            return
        state.probe_tokens -= 1.0
        state.probes += 1
        if probe.mtu is not None:
            state.path_mtu = probe.mtu
        self.wg.send(peer, tm.push_probe(tm.PROBE_ACK, probe.id, size), now)

    def _answer_health(
        self, peer: Peer, state: PeerState, msg: tm.TunnelMessage, now: float
    ) -> None:
        """Answer a client that negotiated health requests (Caps.health) with what the
        edge last saw, within the peer's token bucket; a stock peer never asks, and a
        client that did not ask for the capability gets nothing."""
        if not state.caps.health:
            self._count(peer, "not_negotiated")
            return
        try:
            request_id = tm.health_id(msg)
        except tm.TunnelMessageError:
            self._count(peer, "malformed")
            return
        last = state.health_refill
        if last is not None:
            state.health_tokens = min(
                HEALTH_BURST, state.health_tokens + (now - last) * HEALTH_RATE
            )
        state.health_refill = now
        if state.health_tokens < 1.0:
            self._count(peer, "health_ratelimited")
            return
        state.health_tokens -= 1.0
        self.wg.send(peer, tm.push_health(request_id, self.health(now)), now)

    def config_for(self, peer: Peer) -> PushedConfig:
        """What the relay pushes to `peer` (tunnel.push_config encodes it).  Raises
        LocalProtocolError for a mesh relay, which is pushed nothing."""
        if isinstance(peer.data, MeshState):
            raise LocalProtocolError(f"relay {peer.data.name} is a mesh peer: no configuration")
        s = self.settings
        spec: PeerSpec = peer.data.spec
        ipv6 = s.network6 is not None and spec.address6 is not None
        return PushedConfig(
            name=spec.name,
            address=spec.address,
            prefix=s.network.prefixlen,
            gateway=s.relay_address,
            routes=tuple(self.routes_for(peer)),
            mtu=s.mtu,
            dns=s.dns,
            mode=s.mode,
            address6=spec.address6 if ipv6 else None,
            prefix6=s.network6.prefixlen if ipv6 and s.network6 is not None else None,
            gateway6=s.relay_address6 if ipv6 else None,
            bulk=s.mode == "tun",  # takes bulk frames (bulk.py); none in TAP mode
            # Takes (and sends) TCP segments whose checksum the receiver completes.
            partial=peer.data.caps.partial,
            network=s.network,
            pmtu=peer.data.caps.pmtu,  # answers its probes: it asked
            health=peer.data.caps.health,  # answers its health requests: it asked
            # The other relays of the mesh, to fail over to: only to a client that asked.
            relays=self.mesh_relays() if peer.data.caps.relays else (),
            relays_pushed=peer.data.caps.relays,
        )

    def mesh_relays(self) -> tuple[tm.RelayInfo, ...]:
        """The other relays of the mesh as a client is told of them: those with an
        endpoint the push can carry (the store's, not where they roamed), by name, at
        most tunnel.MAX_RELAYS."""
        out: list[tm.RelayInfo] = []
        for name in sorted(self._mesh):
            peer = self._mesh[name]
            endpoint = tm.endpoint_str(peer.data.relay.endpoint)
            if endpoint is not None and len(endpoint) <= tm.MAX_RELAY_ENDPOINT:
                out.append(tm.RelayInfo(name[: tm.MAX_RELAY_NAME], peer.public_key, endpoint))
        return tuple(out[: tm.MAX_RELAYS])


def _overlaps(a: Network, b: Network) -> bool:
    """Whether two networks share an address (never across IPv4 and IPv6)."""
    if isinstance(a, IPv4Network):
        return isinstance(b, IPv4Network) and a.overlaps(b)
    return isinstance(b, IPv6Network) and a.overlaps(b)
