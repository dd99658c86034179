"""The relay's forwarding logic, sans-IO: WireGuard device + cryptokey routing.

Theory of operation
-------------------
Every peer owns its virtual address (a /32) and the subnets behind it; together they form
the routing table, a longest-prefix match from an inner address to a peer.  The same
table serves both directions:

- A packet decrypted from peer P must have an inner source that P owns (its address or
  one of its subnets), else it is a spoof and is dropped and counted.  Its inner
  destination is then looked up: another peer Q gets it directly (encrypted to Q, never
  through the kernel); anything else (the relay's own address, the pushed routes, the
  internet) is written into the relay's TUN, where the kernel routes it and NAT applies.
- A packet read from the TUN goes to the peer owning its destination, or is dropped
  ("no_route") when none does.

Plaintexts that start with 0x00 are gtun's own messages (tunnelmsg.py): a gtun client
asks for its configuration and pings; stock WireGuard peers never send them and so never
get any.

In TAP mode (settings.mode == "tap") the relay is a learning Ethernet switch instead
(switch.py): its ports are the gtun peers and its own TAP device, and the plaintexts are
Ethernet frames behind gtun's frame header (l2frame.py).  A peer becomes a port when it
asks for its configuration (or sends a frame), and stops being one when it is removed or
stops answering handshakes.  As in TUN mode, a peer speaks only for its own addresses:
an IPv4 packet's source, or an ARP packet's sender, must be one it owns ("spoofed");
IPv6 inside frames is not checked.  Anything else a peer sends (an IP packet from a
stock WireGuard peer, which cannot take part in a layer-2 network) is dropped and
counted ("not_frame").  Frames switched between two peers never enter the kernel.

The caller drains datagrams (self.wg.datagrams_to_send()), TUN writes
(self.tun_writes()) and events after each call, as with the core itself.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, cast

from gtun.core import bulk, l2frame
from gtun.core import tunnel as tm
from gtun.core.offload import GSO_NONE, OffloadError, VnetHdr, coalesce, finish_tcp_checksum
from gtun.core.packet import is_link_scoped, packet_length, parse_addresses
from gtun.core.routing import RouteTable
from gtun.core.switch import Switch
from gtun.core.wg import HandshakeCompleted, Peer, PeerUnknown, WireGuard
from gtun.core.wg.events import Event, HandshakeTimedOut

Network = IPv4Network | IPv6Network

RELAY_DROP_REASONS = (
    "spoofed",  # inner source not owned by the sending peer
    "no_route",  # from the TUN, to an address no peer owns
    "loop",  # a peer sent a packet addressed to itself
    "not_ip",  # plaintext that is neither IP nor a gtun message
    "link_scoped",  # link-local source or multicast/broadcast destination: never routed
    "malformed",  # gtun message that does not parse
    "queue_full",  # the edge could not queue the datagram or TUN write
    "bad_bulk",  # a bulk frame (bulk.py) whose header does not describe its packet
    "bad_gso",  # a super-packet from the TUN that cannot be cut into packets
    # TAP mode (switch.py has the details)
    "not_frame",  # TAP mode: a plaintext that is no gtun frame (a stock peer's IP packet)
    "runt",  # TAP mode: frame shorter than an Ethernet header
    "oversized",  # TAP mode: frame longer than the MTU allows
    "bad_mac",  # TAP mode: multicast, broadcast or zero source MAC
    "mac_stolen",  # TAP mode: source MAC owned (live in the table) by another port
    "mac_limit",  # TAP mode: the port's or the table's MAC limit reached
)

FLOW_CACHE_SIZE = 4096  # tuning knob: routing verdicts kept (relay._route)
_UNKNOWN = object()
_Verdict = Peer | str | None  # where a packet goes: a peer, the TUN (None), or a drop

# The switch port of the relay's own TAP device (the other ports are Peers).
LOCAL_PORT = "relay"

STOCK_PEER_IN_TAP_MODE = (
    "it sent an IP packet: this relay runs in tap mode, and stock WireGuard peers carry "
    "only IP packets, so they cannot join; use a gtun client"
)


@dataclass
class PeerSpec:
    """What the relay knows of a peer from its configuration and leases."""

    name: str
    public_key: bytes
    address: IPv4Address
    subnets: tuple[Network, ...] = ()
    address6: IPv6Address | None = None

    def owned(self) -> list[Network]:
        nets: list[Network] = [IPv4Network(f"{self.address}/32")]
        if self.address6 is not None:
            nets.append(IPv6Network(f"{self.address6}/128"))
        nets.extend(self.subnets)
        return nets


@dataclass
class PeerState:
    """The relay's per-peer state, kept in `Peer.data`."""

    spec: PeerSpec
    is_gtun: bool = False  # asked for its configuration: a gtun client
    bulk: bool = False  # takes bulk frames (bulk.py) over a stream endpoint
    partial: bool = False  # completes TCP checksums itself: sends and takes them partial
    drops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerJoined(Event):
    """A gtun client asked for (and got) its configuration."""

    peer: Peer


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

    @property
    def relay_address6(self) -> IPv6Address | None:
        return None if self.network6 is None else self.network6.network_address + 1


class Relay:
    def __init__(
        self, private_key: bytes, settings: RelaySettings, *, wall_offset: float = 0.0
    ) -> None:
        self.settings = settings
        self.wg = WireGuard(private_key, wall_offset=wall_offset, mtu=settings.mtu)
        self.wg.on_packet = self._from_peer  # the data fast lane
        self.table: RouteTable[Peer] = RouteTable()
        self.drops: dict[str, int] = dict.fromkeys(RELAY_DROP_REASONS, 0)
        self._tun_out: list[bytes | tuple[VnetHdr, bytes]] = []
        # Routing verdicts of the flows seen, by (sending peer, source + destination):
        # the next packet of a flow skips the checks and lookups.  Cleared whenever the
        # peers (and so the table) change, and when full.
        self._flows: dict[tuple[Peer, bytes], _Verdict] = {}
        # Packets from one peer to another, gathered per target while a batch of
        # datagrams is read and encrypted together (send_many) when the edge collects
        # the datagrams to send.
        self._forward: dict[Peer, list[bytes]] = {}
        self._forward_now = 0.0
        self._events: deque[Event] = deque()
        self.switch: Switch[Peer | str] | None = None
        # The relay's TUN completes TCP checksums (offloads granted, tun.py): then gtun
        # clients may send TCP segments with only the pseudo-header sum (offload.py).
        self.tun_offload = False
        if settings.mode == "tap":
            self.switch = Switch(l2frame.max_frame_for(settings.mtu))
            self.switch.add_port(LOCAL_PORT)

    # --- peers ---------------------------------------------------------------------

    def set_peers(self, specs: Iterable[PeerSpec]) -> tuple[list[str], list[str]]:
        """Make the peer set equal to `specs`, keeping the sessions of unchanged keys.

        Returns (added names, removed names)."""
        wanted = {s.public_key: s for s in specs}
        self._flows.clear()
        added: list[str] = []
        removed: list[str] = []
        for key, peer in list(self.wg.peers.items()):
            if key not in wanted:
                self.table.remove_value(peer)
                self.wg.remove_peer(peer)
                if self.switch is not None:
                    self.switch.remove_port(peer)
                removed.append(peer.data.spec.name)
        for key, spec in wanted.items():
            existing = self.wg.peers.get(key)
            if existing is None:
                peer = self.wg.add_peer(key, data=PeerState(spec))
                added.append(spec.name)
            else:
                peer = existing
                peer.data.spec = spec
            self.table.remove_value(peer)
            for net in spec.owned():
                self.table.insert(net, peer)
        return added, removed

    def peer_by_name(self, name: str) -> Peer | None:
        for peer in self.wg.peers.values():
            if peer.data.spec.name == name:
                return peer
        return None

    def routes_for(self, peer: Peer) -> list[Network]:
        """The networks a client reaches through the relay: pushed routes and the
        subnets behind the other peers."""
        routes = list(self.settings.routes)
        for other in self.wg.peers.values():
            if other is not peer:
                routes.extend(other.data.spec.subnets)
        return routes

    # --- outputs -------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Any]]:
        if self._forward:
            forward, self._forward = self._forward, {}
            now = self._forward_now
            for peer, packets in forward.items():
                if len(packets) > 1 and bulk.takes_bulk(peer):
                    # To a gtun node over TCP: the segments of a flow travel as one bulk
                    # frame (coalesced here as a TUN write would be).
                    for hdr, packet in coalesce(packets):
                        if hdr.gso_type == GSO_NONE:
                            self.wg.send(peer, packet, now)
                        else:
                            self.wg.send(peer, bulk.push_bulk(hdr, packet), now)
                else:
                    self.wg.send_many(peer, packets, now)
        return self.wg.datagrams_to_send()

    def tun_writes(self) -> list[bytes | tuple[VnetHdr, bytes]]:
        """Packets for the TUN: plain ones, and (header, super-packet) pairs."""
        out = self._tun_out
        self._tun_out = []
        return out

    def next_event(self) -> Event | None:
        """Events of the relay and of the WireGuard core, in order."""
        return self._events.popleft() if self._events else None

    # --- inputs --------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Hashable, now: float) -> None:
        self.wg.receive_datagram(data, addr, now)
        self._drain_core(now)

    def tun_packet(self, packet: bytes, now: float) -> None:
        if self.switch is not None:
            self._switch_frame(LOCAL_PORT, packet, now)
            return
        peer = self._tun_target(packet)
        if peer is not None:
            self.wg.send(peer, packet, now)

    def tun_super(self, hdr: VnetHdr, packet: bytes, now: float) -> None:
        """A TCP super-packet (or a packet whose checksum is ours to finish) from an
        offloading TUN: every segment has the same addresses, so it is routed once."""
        peer = self._tun_target(packet)
        if peer is not None:
            self._send_super(peer, hdr, packet, now)

    def _tun_target(self, packet: bytes) -> Peer | None:
        """The peer a packet from the TUN goes to, or None after counting the drop."""
        addrs = tunnel_addresses(packet, self.drops)
        if addrs is None:
            return None
        peer = self.table.lookup(addrs[1])
        if peer is None:
            self.drops["no_route"] += 1
        return peer

    def _send_super(self, peer: Peer, hdr: VnetHdr, packet: bytes, now: float) -> None:
        try:
            bulk.send_super(self.wg, peer, hdr, packet, now)
        except OffloadError:
            self.drops["bad_gso"] += 1

    def handle_timer(self, now: float) -> None:
        self.wg.handle_timer(now)
        self._drain_core(now)

    def get_timer(self) -> float | None:
        return self.wg.get_timer()

    # --- internals -----------------------------------------------------------------

    def _drain_core(self, now: float) -> None:
        wg = self.wg
        while True:
            event = wg.next_event()
            if event is None:
                return
            # Data never comes as an event: the fast lane (on_packet) delivers it.
            if isinstance(event, HandshakeCompleted | HandshakeTimedOut | PeerUnknown):
                if isinstance(event, HandshakeTimedOut) and self.switch is not None:
                    self.switch.remove_port(event.peer)  # it asks again when it is back
                self._events.append(event)

    def _from_peer(self, peer: Peer, plaintext: bytes, now: float) -> None:
        if self.switch is not None:
            self._from_peer_l2(peer, plaintext, now)
            return
        if plaintext[0] == 0:
            if bulk.is_bulk(plaintext):
                self._bulk_from_peer(peer, plaintext, now)
            else:
                self._tunnel_message(peer, plaintext, now)
            return
        length = packet_length(plaintext)
        if length is None:
            self.drops["not_ip"] += 1
            return
        if length < len(plaintext):
            plaintext = plaintext[:length]  # WireGuard's zero padding
        # Source and destination, as they follow each other in the header: the flow key.
        pair = plaintext[12:20] if plaintext[0] >> 4 == 4 else plaintext[8:40]
        target = self._route(peer, pair)
        if target is None:
            self._tun_out.append(plaintext)
        elif target.__class__ is str:
            self._count(peer, target)
        else:
            assert isinstance(target, Peer)
            if peer.data.partial and not target.data.partial:
                plaintext = finish_tcp_checksum(plaintext)  # e.g. to a stock peer
            batch = self._forward.get(target)
            if batch is None:
                self._forward[target] = [plaintext]
                self._forward_now = now
            else:
                batch.append(plaintext)

    def _route(self, peer: Peer, pair: bytes) -> _Verdict:
        """Where a packet from `peer` with source and destination `pair` (the two
        addresses, as they follow each other in the IP header) goes: another peer, None
        for the TUN, or the reason to drop it (a key of self.drops).  Cached per flow."""
        key = (peer, pair)
        flows = self._flows
        verdict = flows.get(key, _UNKNOWN)
        if verdict is _UNKNOWN:  # a new flow
            half = len(pair) // 2
            src, dst = pair[:half], pair[half:]
            if is_link_scoped(src, dst):
                verdict = "link_scoped"
            elif self.table.lookup(src) is not peer:
                verdict = "spoofed"
            else:
                verdict = self.table.lookup(dst)
                if verdict is peer:
                    verdict = "loop"
            if len(flows) >= FLOW_CACHE_SIZE:
                flows.clear()
            flows[key] = verdict
        return cast(_Verdict, verdict)

    def _bulk_from_peer(self, peer: Peer, plaintext: bytes, now: float) -> None:
        """A super-packet from a gtun peer: checked and routed as a packet is, then
        written to the TUN whole, or sent on to another peer (whole, or cut into packets
        when that peer does not take bulk frames)."""
        try:
            hdr, packet = bulk.pull_bulk(plaintext)
        except (bulk.BulkError, OffloadError):
            self._count(peer, "bad_bulk")
            return
        addrs = parse_addresses(packet)
        if addrs is None:
            self._count(peer, "bad_bulk")
            return
        target = self._route(peer, addrs[0] + addrs[1])
        if target is None:
            self._tun_out.append((hdr, packet))
        elif target.__class__ is str:
            self._count(peer, target)
        else:
            self._send_super(target, hdr, packet, now)  # type: ignore[arg-type]

    def _from_peer_l2(self, peer: Peer, plaintext: bytes, now: float) -> None:
        if l2frame.is_frame(plaintext):
            assert self.switch is not None
            try:
                frame = l2frame.pull_frame(plaintext, self.switch.max_frame)
            except l2frame.L2FrameError as exc:
                self._count(peer, exc.reason)
                return
            sender = l2frame.ipv4_sender(frame)
            if sender is not None and sender != l2frame.UNSPECIFIED_IPV4:
                # As in TUN mode, an IPv4 source (or ARP sender) must be the peer's own:
                # no answering ARP for the relay's or another peer's address.
                if not sender:
                    self._count(peer, "malformed")
                    return
                if self.table.lookup(sender) is not peer:
                    self._count(peer, "spoofed")
                    return
            claims = l2frame.ipv6_claims(frame)
            if claims is not None:
                # IPv6 likewise, but for the link-local and unspecified addresses that
                # neighbour discovery itself uses (fe80::/10, ::).
                if b"" in claims:
                    self._count(peer, "malformed")
                    return
                for claim in claims:
                    if claim[0] == 0xFE and claim[1] & 0xC0 == 0x80 or claim == bytes(16):
                        continue
                    if self.table.lookup(claim) is not peer:
                        self._count(peer, "spoofed")
                        return
            if not self.switch.has_port(peer):  # only a gtun node sends frames
                peer.data.is_gtun = True
                self.switch.add_port(peer)
            self._switch_frame(peer, frame, now)
        elif plaintext[0] == 0:
            self._tunnel_message(peer, plaintext, now)
        else:
            self._count(peer, "not_frame")
            if peer.data.drops["not_frame"] == 1:  # say so once, not per packet
                self._events.append(PeerRefused(peer, STOCK_PEER_IN_TAP_MODE))

    def _switch_frame(self, port: Peer | str, frame: bytes, now: float) -> None:
        assert self.switch is not None
        decision = self.switch.receive(port, frame, now)
        if decision.drop is not None:
            if isinstance(port, Peer):
                self._count(port, decision.drop)
            else:
                self.drops[decision.drop] += 1
            return
        wrapped: bytes | None = None
        for out in decision.ports:
            if isinstance(out, Peer):
                if wrapped is None:
                    wrapped = l2frame.push_frame(frame)
                self.wg.send(out, wrapped, now)
            else:
                self._tun_out.append(frame)

    def _count(self, peer: Peer, reason: str) -> None:
        self.drops[reason] += 1
        per_peer = peer.data.drops
        per_peer[reason] = per_peer.get(reason, 0) + 1

    def _tunnel_message(self, peer: Peer, plaintext: bytes, now: float) -> None:
        try:
            msg = tm.pull_message(plaintext)
        except tm.TunnelMessageError:
            self._count(peer, "malformed")
            return
        state: PeerState = peer.data
        if msg.type == tm.CONFIG_REQUEST:
            mode = msg.payload.get("mode")
            if mode is not None and mode != self.settings.mode:
                reason = (
                    f"this relay runs in {self.settings.mode} mode; the client asked for {mode}"
                )
                self.wg.send(peer, tm.push_message(tm.REFUSED, {"reason": reason}), now)
                self._events.append(PeerRefused(peer, reason))
                return
            state.is_gtun = True
            state.bulk = self.switch is None and msg.payload.get("bulk") is True
            state.partial = (
                self.switch is None and self.tun_offload and msg.payload.get("csum") == "partial"
            )
            if self.switch is not None:
                self.switch.add_port(peer)
            try:
                answer = tm.push_message(tm.CONFIG, self.config_for(peer))
            except ValueError as exc:  # hundreds of routes: more than a message holds
                answer = tm.push_message(tm.REFUSED, {"reason": f"configuration: {exc}"})
            self.wg.send(peer, answer, now)
            self._events.append(PeerJoined(peer))
        elif msg.type == tm.PING:
            state.is_gtun = True
            self.wg.send(peer, tm.push_message(tm.PONG, {}), now)
        else:
            self._count(peer, "malformed")

    def config_for(self, peer: Peer) -> dict[str, Any]:
        s = self.settings
        spec: PeerSpec = peer.data.spec
        ipv6: dict[str, Any] = {}
        if s.network6 is not None and spec.address6 is not None:
            # Absent keys mean "no IPv6": older clients ignore these, newer ones
            # talking to an older relay find none.
            ipv6 = {
                "address6": str(spec.address6),
                "prefix6": s.network6.prefixlen,
                "gateway6": str(s.relay_address6),
            }
        return {
            "name": spec.name,
            "address": str(spec.address),
            "prefix": s.network.prefixlen,
            "network": str(s.network),
            "gateway": str(s.relay_address),
            "routes": [str(r) for r in self.routes_for(peer)],
            "mtu": s.mtu,
            "dns": [str(d) for d in s.dns],
            "mode": s.mode,
            "bulk": s.mode == "tun",  # takes bulk frames (bulk.py); none in TAP mode
            # Takes (and sends) TCP segments whose checksum the receiver completes.
            "csum": "partial" if peer.data.partial else "full",
            **ipv6,
        }


def tunnel_addresses(packet: bytes, drops: dict[str, int]) -> tuple[bytes, bytes] | None:
    """(source, destination) of a packet read from a TUN that may enter the tunnel, or
    None after counting it in `drops` as "not_ip" or "link_scoped".  Shared by the
    relay's and the client's TUN paths."""
    addrs = parse_addresses(packet)
    if addrs is None:
        drops["not_ip"] += 1
        return None
    if is_link_scoped(*addrs):
        drops["link_scoped"] += 1
        return None
    return addrs


def parse_pushed_config(payload: dict[str, Any]) -> PushedConfig:
    """Validate a CONFIG payload from the relay.  Raises ValueError."""
    try:
        address = IPv4Address(payload["address"])
        prefix = int(payload["prefix"])
        if not 0 < prefix <= 32:
            raise ValueError(f"bad prefix {prefix}")
        routes = tuple(ipaddress.ip_network(_text(r)) for r in payload.get("routes", []))
        dns = tuple(ipaddress.ip_address(_text(d)) for d in payload.get("dns", []))
        mtu = int(payload["mtu"])
        if not 576 <= mtu <= 9000:
            raise ValueError(f"bad mtu {mtu}")
        gateway = IPv4Address(payload["gateway"])
        name = str(payload.get("name", ""))
        mode = str(payload.get("mode", "tun"))
        if mode not in ("tun", "tap"):
            raise ValueError(f"bad mode {mode!r}")
        takes_bulk = payload.get("bulk") is True
        partial = payload.get("csum") == "partial"
        address6: IPv6Address | None = None
        prefix6: int | None = None
        gateway6: IPv6Address | None = None
        if "address6" in payload:
            address6 = IPv6Address(_text(payload["address6"]))
            prefix6 = int(payload["prefix6"])
            if not 0 < prefix6 <= 128:
                raise ValueError(f"bad prefix6 {prefix6}")
            gateway6 = IPv6Address(_text(payload["gateway6"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"incomplete configuration: {exc}") from exc
    return PushedConfig(
        name,
        address,
        prefix,
        gateway,
        routes,
        mtu,
        dns,
        mode,
        address6,
        prefix6,
        gateway6,
        takes_bulk,
        partial,
    )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class PushedConfig:
    name: str
    address: IPv4Address
    prefix: int
    gateway: IPv4Address
    routes: tuple[Network, ...]
    mtu: int
    dns: tuple[IPv4Address | IPv6Address, ...]
    mode: str
    # IPv6 inside the tunnel: all three or none (the relay has no network6).
    address6: IPv6Address | None = None
    prefix6: int | None = None
    gateway6: IPv6Address | None = None
    bulk: bool = False  # the relay takes bulk frames (bulk.py) over TCP
    partial: bool = False  # the relay takes TCP segments with partial checksums
