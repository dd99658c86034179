"""The relay's forwarding, sans-IO: an IP router (TUN mode) or an Ethernet switch (TAP
mode), two implementations of one Forwarder chosen when the relay is built.

Theory of operation
-------------------
Every peer owns its virtual addresses (a /32 and a /128) and the subnets behind it;
together they form the route table, a longest-prefix match from an inner address to a
peer.  In both modes a peer speaks only for its own addresses: anything it sends from an
address it does not own is a spoof, dropped and counted ("spoofed").

IpForwarder (TUN).  A packet decrypted from peer P must have an inner source that P owns;
its destination is then looked up: another peer Q gets it directly (encrypted to Q,
never through the kernel); anything else (the relay's own address, the pushed routes,
the internet) is written into the relay's TUN, where the kernel routes it and NAT
applies.  A packet read from the TUN goes to the peer owning its destination, or is
dropped ("no_route").  Verdicts are cached per flow (sending peer, address pair) and the
cache is cleared whenever the peers change.  Packets from one peer to another are
gathered per target during a batch and leave together (send_many; bulk frames to a gtun
node over TCP).  What goes to a peer fits the tunnel MTU, which every peer has: a
super-packet is cut into segments no longer than it (unless the peer takes bulk
frames, and so whole super-packets), and a packet without GSO that is longer goes to
no peer ("too_big"); the relay's TUN takes it, and its kernel applies the MTU of the
route it leaves by, as for any packet it receives.

EthernetForwarder (TAP).  The relay is a learning switch (switch.py) whose ports are the
gtun peers and its own TAP device; plaintexts are Ethernet frames behind gtun's frame
header (l2frame.py).  A peer becomes a port when it asks for its configuration (or sends
a frame), and stops being one when it is removed or stops answering handshakes.  An
IPv4 packet's source or an ARP packet's sender must be an address the peer owns; so must
IPv6 sources and neighbour-discovery targets (behind any extension headers), but for the
unspecified address neighbour discovery itself uses and the peer's own link-local
address.  Its key pins its link layer: the MAC derived from it (l2frame.mac_for_key) is
the only source MAC, ARP sender and neighbour-discovery link-layer address it may use,
and its link-local address is that MAC's EUI-64 one; router advertisements and redirects
are the relay's to send, not a peer's.  An IP packet from a stock WireGuard peer,
which cannot take part in a layer-2 network, is dropped ("not_frame") and reported once.
Frames switched between two peers never enter the kernel.

The relay mesh (TUN mode only).  The relays of one network are WireGuard peers of each
other (`mesh`, peers with no configuration, lease or route of a client) and each knows
where every client's session is (`where`: a client whose session is at another relay ->
that relay's mesh peer; a client not in it is ours).  The route table also holds the
routes behind the other relays, owned by their mesh peers; the relay's own addresses and
routes are `own`.  Forwarding is one hop:

- from a client (or the TUN), a destination owned by a client held elsewhere, or by a
  route behind another relay, goes to that relay;
- from a mesh relay R, the inner source must be a client whose session is at R or an
  address of a route R owns ("mesh_spoofed"), and the destination a client held here,
  or the relay's own address or route (its TUN); anything this relay would send on (to
  a third relay, a client held elsewhere, or out of its TUN to an address it does not
  own) is dropped ("mesh_hop"): a packet crosses the mesh once.

A change of the mesh or of where a client is clears the flow cache, so no cached verdict
outlives it.

Both hand gtun messages (the 00 'g' 't' 01 plaintexts, tunnel.py) back to the relay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from gtun.core import bulk, l2frame
from gtun.core import tunnel as tm
from gtun.core.offload import Gso, OffloadError, coalesce, finish_tcp_checksum
from gtun.core.packet import (
    IPV6_EXTENSIONS,
    ipv6_upper,
    is_link_scoped,
    packet_length,
    parse_addresses,
    tunnel_addresses,
)
from gtun.core.routing import RouteTable
from gtun.core.switch import Switch, is_group
from gtun.core.wg import Peer, WireGuard

# Tuning knob: routing verdicts kept per sending peer (IpForwarder._route): a peer that
# opens flow after flow clears its own verdicts, never another peer's.
FLOW_CACHE_SIZE = 4096

# The switch port of the relay's own TAP device (the other ports are Peers).
LOCAL_PORT = "relay"
# TAP mode with relay workers: addresses remembered as another worker's.
MAX_REMOTE_MACS = 4096

STOCK_PEER_IN_TAP_MODE = (
    "it sent an IP packet: this relay runs in tap mode, and stock WireGuard peers carry "
    "only IP packets, so they cannot join; use a gtun client"
)

_UNKNOWN = object()
_UNSPECIFIED_IPV6 = bytes(16)
_ETH_IPV4 = l2frame.ETHERTYPE_IPV4.to_bytes(2, "big")
_ETH_ARP = l2frame.ETHERTYPE_ARP.to_bytes(2, "big")
_ETH_IPV6 = l2frame.ETHERTYPE_IPV6.to_bytes(2, "big")
# ICMPv6 only a router sends on a link (RFC 4861 sections 4.2, 4.5).
_ROUTER_ONLY = frozenset({l2frame.ICMPV6_ROUTER_ADVERTISEMENT, l2frame.ICMPV6_REDIRECT})
_Verdict = Peer | str | None  # where a packet goes: a peer, the TUN (None), or a drop

TunWrite = bytes | tuple[Gso, bytes]
# count(peer, reason): a drop charged to a peer (and to the relay's total).
CountFn = Callable[[Peer, str], None]
# on_message(peer, plaintext, now): a gtun message for the relay.
MessageFn = Callable[[Peer, bytes, float], None]
# refuse(peer, reason): a peer that cannot take part, said once.
RefuseFn = Callable[[Peer, str], None]


def receive_all(
    wg: WireGuard,
    fwd: Forwarder,
    batch: list[tuple[bytes, Any]],
    now: float,
    drain: Callable[[float], None],
) -> None:
    """The relay's datagrams of one wake-up, in order: each to `wg` (whose data fast
    lane is `fwd`), and `drain(now)` after each that left the relay something to do
    (WireGuard events, sessions claimed or learned by the forwarder).  Here rather than
    in the relay so that the per-datagram loop is compiled (gtun/native.py)."""
    receive = wg.receive_datagram
    for data, addr in batch:
        receive(data, addr, now)
        if wg.has_events() or fwd.claims or fwd.learned:
            drain(now)


class Forwarder:
    """What both modes share: the route table, the TUN output and the relay's hooks.

    The relay calls `from_peer` (as the WireGuard core's data fast lane), `tun_packet`,
    `tun_super`, `peer_added`/`peer_removed`/`peers_changed`, `joined` when a gtun peer
    asked for its configuration, `gone` when a peer stopped answering, and `flush` before
    the datagrams are collected."""

    tap = False

    def __init__(
        self,
        wg: WireGuard,
        drops: dict[str, int],
        count: CountFn,
        on_message: MessageFn,
        refuse: RefuseFn,
    ) -> None:
        self.wg = wg
        self.drops = drops
        self.count = count
        self.on_message = on_message
        self.refuse = refuse
        self.table: RouteTable[Peer] = RouteTable()
        self.tun_out: list[TunWrite] = []
        # The relay mesh (TUN mode): the other relays' peers, the relay holding each
        # client whose session is not here, and what this relay's own TUN takes from a
        # mesh relay (its addresses and routes).  Empty without a mesh.
        self.mesh: frozenset[Peer] = frozenset()
        self.where: dict[Peer, Peer] = {}
        self.own: RouteTable[bool] = RouteTable()
        # Clients whose data claims their session here (a stock peer, or a client the
        # map holds nowhere else), for the relay to take after the datagram.
        self.claims: list[Peer] = []
        # Clients a mesh relay spoke for first (client, relay): held there from now on.
        self.learned: list[tuple[Peer, Peer]] = []
        # Relay workers (app/workers.py): this forwarder is worker `worker` of `workers`
        # processes of one relay.  `away` holds the peers whose session another worker
        # has (peer -> worker); what goes to them is gathered in `handoff` for the edge
        # to hand over, as (worker, peer, packet or (header, super-packet)); in TAP mode
        # (worker, None, frame) for the other workers' switches.
        self.worker = 0
        self.workers = 1
        self.away: dict[Peer, int] = {}
        self.handoff: list[tuple[int, Peer | None, TunWrite]] = []

    def peers_changed(self) -> None:
        """The table was rebuilt: anything derived from it is stale."""

    def peer_removed(self, peer: Peer) -> None:
        self.table.remove_value(peer)
        self.away.pop(peer, None)

    def joined(self, peer: Peer) -> None:
        """A gtun peer asked for its configuration."""

    def gone(self, peer: Peer) -> None:
        """A peer stopped answering handshakes."""

    def flush(self) -> None:
        """Send what was gathered during a batch."""

    def deliver(self, peer: Peer | None, item: TunWrite, now: float) -> None:
        """What another worker handed over: sent here, never handed on (so nothing can
        go round between workers), by this worker's session, or after a handshake when
        it has none."""
        raise NotImplementedError

    def from_peer(self, peer: Peer, plaintext: bytes, now: float) -> None:
        raise NotImplementedError

    def tun_packet(self, packet: bytes, now: float) -> None:
        raise NotImplementedError

    def tun_super(self, hdr: Gso, packet: bytes, now: float) -> None:
        raise NotImplementedError


class IpForwarder(Forwarder):
    """TUN mode: a router between the peers and the relay's TUN."""

    def __init__(
        self,
        wg: WireGuard,
        drops: dict[str, int],
        count: CountFn,
        on_message: MessageFn,
        refuse: RefuseFn,
    ) -> None:
        # Named, not *args: compiled (mypyc), a call through *args passes one tuple.
        super().__init__(wg, drops, count, on_message, refuse)
        # Routing verdicts of the flows seen, per sending peer by source + destination:
        # the next packet of a flow skips the checks and lookups.
        self._flows: dict[Peer, dict[bytes, _Verdict]] = {}
        # Packets from one peer to another, gathered per target while a batch of
        # datagrams is read, and encrypted together (send_many) at flush().
        self._forward: dict[Peer, list[bytes]] = {}
        self._forward_now = 0.0

    def peers_changed(self) -> None:
        self._flows.clear()

    def peer_removed(self, peer: Peer) -> None:
        super().peer_removed(peer)
        self._flows.pop(peer, None)

    def flush(self) -> None:
        if not self._forward:
            return
        forward, self._forward = self._forward, {}
        now = self._forward_now
        away = self.away
        for peer, packets in forward.items():
            if away and peer in away:
                worker = away[peer]
                self.handoff.extend([(worker, peer, p) for p in packets])
            else:
                self.send_batch(peer, packets, now)

    def send_batch(self, peer: Peer, packets: list[bytes], now: float) -> None:
        """Packets for one peer, gathered during a batch (or handed over by another
        worker, never to be handed on): to a gtun node over TCP the segments of a flow
        travel as one bulk frame (coalesced as a TUN write would be; send_super splits
        one larger than a bulk frame holds), to anyone else encrypted together."""
        if len(packets) > 1 and bulk.takes_bulk(peer):
            for hdr, packet in coalesce(packets):
                self._send_super(peer, hdr, packet, now, handed=True)
        else:
            self.wg.send_many(peer, packets, now)

    def tun_packet(self, packet: bytes, now: float) -> None:
        peer = self._tun_target(packet)
        if peer is not None:
            if self.away and peer in self.away:
                self.handoff.append((self.away[peer], peer, packet))
            else:
                self.wg.send(peer, packet, now)

    def deliver(self, peer: Peer | None, item: TunWrite, now: float) -> None:
        if peer is None:
            self.drops["handoff_unknown"] += 1  # a frame: only TAP mode hands those
        elif isinstance(item, bytes):
            self.wg.send(peer, item, now)
        else:
            hdr, packet = item
            self._send_super(peer, hdr, packet, now, handed=True)

    def tun_super(self, hdr: Gso, packet: bytes, now: float) -> None:
        """A TCP super-packet (or a packet whose checksum is ours to finish) from an
        offloading TUN: every segment has the same addresses, so it is routed once."""
        peer = self._tun_target(packet)
        if peer is not None:
            self._send_super(peer, hdr, packet, now)

    def _tun_target(self, packet: bytes) -> Peer | None:
        """The peer a packet from the TUN goes to (the relay holding the destination's
        session, when another does), or None after counting the drop."""
        addrs = tunnel_addresses(packet, self.drops)
        if addrs is None:
            return None
        peer = self.table.lookup(addrs[1])
        if peer is None:
            self.drops["no_route"] += 1
            return None
        return self.where.get(peer, peer)

    def _send_super(
        self,
        peer: Peer,
        hdr: Gso,
        packet: bytes,
        now: float,
        sender: Peer | None = None,
        handed: bool = False,
    ) -> None:
        """bulk.send_super(), its drop counted: against `sender`, the peer the
        super-packet came from (a bulk frame's fault: "bad_bulk"), else the relay's own
        (its TUN's: "bad_gso"); "too_big" either way for a packet no peer can take.
        To a peer another worker holds: handed over whole (unless it was `handed`)."""
        if not handed and self.away and peer in self.away:
            self.handoff.append((self.away[peer], peer, (hdr, packet)))
            return
        try:
            bulk.send_super(self.wg, peer, hdr, packet, now)
        except OffloadError as exc:
            reason = exc.reason
            if reason != "too_big":
                reason = "bad_gso" if sender is None else "bad_bulk"
            if sender is None:
                self.drops[reason] += 1
            else:
                self.count(sender, reason)

    def from_peer(self, peer: Peer, plaintext: bytes, now: float) -> None:
        if plaintext[0] == 0:
            if tm.classify(plaintext) == tm.BULK:
                self._bulk_from_peer(peer, plaintext, now)
            else:
                self.on_message(peer, plaintext, now)
            return
        length = packet_length(plaintext)
        if length is None:
            self.drops["not_ip"] += 1
            return
        if length < len(plaintext):
            plaintext = plaintext[:length]  # WireGuard's zero padding
        if plaintext[0] >> 4 == 6 and plaintext[6] in IPV6_EXTENSIONS:
            reason = _extension_drop(plaintext)
            if reason is not None:
                self.count(peer, reason)
                return
        # Source and destination, as they follow each other in the header: the flow key.
        pair = plaintext[12:20] if plaintext[0] >> 4 == 4 else plaintext[8:40]
        target = self._route(peer, pair)
        if target is None:
            self.tun_out.append(plaintext)
        elif target.__class__ is str:
            self.count(peer, target)
        else:
            assert isinstance(target, Peer)
            mtu = self.wg.mtu
            if mtu and length > mtu:  # no peer takes it, and nothing can cut it
                self.count(peer, "too_big")
                return
            if peer.data.caps.partial and not target.data.caps.partial:
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
        for the TUN, or the reason to drop it (a drop counter).  Cached per flow."""
        flows = self._flows.get(peer)
        if flows is None:
            flows = self._flows[peer] = {}
        verdict = flows.get(pair, _UNKNOWN)
        if verdict is _UNKNOWN:  # a new flow
            half = len(pair) // 2
            src, dst = pair[:half], pair[half:]
            if is_link_scoped(src, dst):
                verdict = "link_scoped"
            elif peer in self.mesh:
                verdict = self._route_from_mesh(peer, src, dst)
            elif self.table.lookup(src) is not peer:
                verdict = "spoofed"
            else:
                state = peer.data
                if not state.here and (not state.is_gtun or peer not in self.where):
                    self.claims.append(peer)
                verdict = self.table.lookup(dst)
                if verdict is peer:
                    verdict = "loop"
                elif verdict is not None:
                    verdict = self.where.get(verdict, verdict)
            if len(flows) >= FLOW_CACHE_SIZE:
                flows.clear()
            flows[pair] = verdict
        return cast(_Verdict, verdict)

    def _route_from_mesh(self, relay: Peer, src: bytes, dst: bytes) -> _Verdict:
        """Where a packet from mesh relay `relay` goes: only to a client held here, or
        into the TUN for the relay's own addresses and routes; never on (one hop)."""
        owner = self.table.lookup(src)
        if owner is None:
            return "mesh_spoofed"
        if owner is not relay and self.where.get(owner) is not relay:
            if owner in self.mesh or owner in self.where or owner.data.here:
                return "mesh_spoofed"  # another relay's route, or a client held elsewhere
            # A client held nowhere else in this relay's map, with no session claimed
            # here: it claimed one at `relay` a moment ago and the store's word is on
            # its way.  Learnt from the packet (the relay could write the store anyway).
            self.learned.append((owner, relay))
        target = self.table.lookup(dst)
        if target is None:
            return None if self.own.lookup(dst) else "mesh_hop"
        if target in self.mesh or target in self.where:
            return "mesh_hop"
        return target

    def _bulk_from_peer(self, peer: Peer, plaintext: bytes, now: float) -> None:
        """A super-packet from a gtun peer: checked and routed as a packet is, then
        written to the TUN whole, or sent on to another peer (whole, or cut into packets
        when that peer does not take bulk frames).  Only from a peer that negotiated
        them: anyone else's are dropped unread ("not_negotiated")."""
        if not peer.data.caps.bulk:
            self.count(peer, "not_negotiated")
            return
        try:
            hdr, packet = bulk.pull_bulk(plaintext)
        except (bulk.BulkError, OffloadError):
            self.count(peer, "bad_bulk")
            return
        addrs = parse_addresses(packet)
        if addrs is None:
            self.count(peer, "bad_bulk")
            return
        if packet[0] >> 4 == 6 and packet[6] in IPV6_EXTENSIONS:
            reason = _extension_drop(packet)
            if reason is not None:
                self.count(peer, reason)
                return
        target = self._route(peer, addrs[0] + addrs[1])
        if target is None:
            self.tun_out.append((hdr, packet))
        elif target.__class__ is str:
            self.count(peer, target)
        else:
            self._send_super(target, hdr, packet, now, peer)  # type: ignore[arg-type]


def _extension_drop(packet: bytes) -> str | None:
    """Why an IPv6 packet with extension headers from a peer is dropped, or None: the
    source check reads the fixed header, so nothing behind it may name another source or
    send the packet on to another destination (a routing header with segments left, a
    home address option: "source_routed"), and a chain that cannot be walked is
    "malformed"."""
    upper = ipv6_upper(packet)
    if upper is None:
        return "malformed"
    return "source_routed" if upper.redirected else None


class EthernetForwarder(Forwarder):
    """TAP mode: a learning switch between the gtun peers and the relay's TAP device."""

    tap = True

    def __init__(
        self,
        wg: WireGuard,
        drops: dict[str, int],
        count: CountFn,
        on_message: MessageFn,
        refuse: RefuseFn,
        *,
        mtu: int,
    ) -> None:
        super().__init__(wg, drops, count, on_message, refuse)
        self.switch: Switch[Peer | str] = Switch(l2frame.max_frame_for(mtu))
        self.switch.add_port(LOCAL_PORT)
        # What each peer's key derives (l2frame.mac_for_key): the one MAC it may use and
        # the link-local address its device forms from it; one entry per peer.
        self._pins: dict[Peer, tuple[bytes, bytes]] = {}
        # With relay workers: addresses another worker's switch owns (MAC -> (worker,
        # when seen)), learned from the frames it hands over (bounded, oldest out), and
        # the worker whose frame deliver() is handling (set by the relay).
        self._remote: dict[bytes, tuple[int, float]] = {}
        self._handed_from = 0

    def peer_removed(self, peer: Peer) -> None:
        super().peer_removed(peer)
        self.switch.remove_port(peer)
        self._pins.pop(peer, None)

    def deliver(self, peer: Peer | None, item: TunWrite, now: float) -> None:
        """A frame another worker's switch flooded or sent here: to the port of this
        worker's switch that owns its destination (one of its peers, or the TAP), else
        to every peer of this worker; never back to another worker.  Its source is
        remembered as that worker's (`_remote`) unless a port here owns it."""
        if peer is not None or not isinstance(item, bytes) or len(item) < 14:
            self.drops["handoff_unknown"] += 1
            return
        frame = item
        switch = self.switch
        dst, src = frame[:6], frame[6:12]
        if switch.lookup(src, now) is None and not is_group(src):
            remote = self._remote
            remote.pop(src, None)
            if len(remote) >= MAX_REMOTE_MACS:
                del remote[next(iter(remote))]
            remote[src] = (self._handed_from, now)
        port = None if is_group(dst) else switch.lookup(dst, now)
        if port is None:
            outs: list[Peer | str] = [p for p in switch.ports if isinstance(p, Peer)]
        else:
            outs = [port]
        self._send_frame(frame, outs, now)

    def gone_elsewhere(self, peer: Peer) -> None:
        """Another worker holds `peer`'s session now: its port (and the addresses
        learned on it) leave this worker's switch; it asks that worker's again."""
        self.switch.remove_port(peer)

    def _pin(self, peer: Peer) -> tuple[bytes, bytes]:
        pin = self._pins.get(peer)
        if pin is None:
            mac = l2frame.mac_bytes_for_key(peer.public_key)
            pin = self._pins[peer] = (mac, l2frame.link_local_for_mac(mac))
        return pin

    def joined(self, peer: Peer) -> None:
        self.switch.add_port(peer)

    def gone(self, peer: Peer) -> None:
        self.switch.remove_port(peer)  # it asks again when it is back

    def tun_packet(self, packet: bytes, now: float) -> None:
        self._switch_frame(LOCAL_PORT, packet, now)

    def tun_super(self, hdr: Gso, packet: bytes, now: float) -> None:
        # A TAP device is opened without offloads: anything else is a kernel's bug.
        self.drops["bad_gso"] += 1

    def from_peer(self, peer: Peer, plaintext: bytes, now: float) -> None:
        kind = tm.classify(plaintext)
        if kind == tm.FRAME:
            self._frame_from_peer(peer, plaintext, now)
        elif kind == tm.BULK:  # never granted in TAP mode (tunnel.relay_caps)
            self.count(peer, "not_negotiated")
        elif plaintext[0] == 0:
            self.on_message(peer, plaintext, now)
        else:
            self.count(peer, "not_frame")
            if peer.data.drops["not_frame"] == 1:  # say so once, not per packet
                self.refuse(peer, STOCK_PEER_IN_TAP_MODE)

    def _frame_from_peer(self, peer: Peer, plaintext: bytes, now: float) -> None:
        switch = self.switch
        try:
            frame = l2frame.pull_frame(plaintext, switch.max_frame)
        except l2frame.L2FrameError as exc:
            self.count(peer, exc.reason)
            return
        reason = self._spoofed(peer, frame)
        if reason is not None:
            self.count(peer, reason)
            return
        if not switch.has_port(peer):  # only a gtun node sends frames
            peer.data.is_gtun = True
            switch.add_port(peer)
        self._switch_frame(peer, frame, now)

    def _spoofed(self, peer: Peer, frame: bytes) -> str | None:
        """ "spoofed" when the frame speaks for an address `peer` does not own,
        "malformed" when its claims cannot be read, "source_routed" for an IPv6 packet
        that names another source or destination behind its header, else None.

        A peer owns its virtual addresses and subnets (the route table), and what its
        key derives: its MAC (the only Ethernet source, ARP sender hardware address and
        neighbour-discovery link-layer address it may use; so never the relay's nor
        another peer's, even once the switch has forgotten them) and the EUI-64
        link-local address of that MAC."""
        mac, link_local = self._pin(peer)
        if frame[6:12] != mac:
            return "spoofed"
        ethertype = frame[12:14]  # untagged IPv4, ARP and IPv6 skip the other parsers
        if ethertype != _ETH_IPV6:
            sender = l2frame.ipv4_sender(frame)
            if sender is not None and sender != l2frame.UNSPECIFIED_IPV4:
                # No answering ARP for the relay's or another peer's address.
                if not sender:
                    return "malformed"
                if self.table.lookup(sender) is not peer:
                    return "spoofed"
            if ethertype == _ETH_IPV4:
                return None
            sha = l2frame.arp_sender_mac(frame)
            if sha is not None and sha != mac:
                return "malformed" if not sha else "spoofed"
            if ethertype == _ETH_ARP:
                return None
        facts = l2frame.ipv6_facts(frame)
        if facts is None:
            return None
        if isinstance(facts, str):
            return facts
        if facts.redirected:
            return "source_routed"
        icmp = facts.icmp
        if icmp in _ROUTER_ONLY:
            return "spoofed"  # the relay routes this link, no peer
        if facts.fragment and icmp in l2frame.ND_FIXED_LEN:
            return "malformed"  # RFC 6980: neighbour discovery is never fragmented
        # Duplicate address detection and MLD speak from :: (RFC 4862 section 5.4).
        if not (facts.source == _UNSPECIFIED_IPV6 and icmp >= 0) and not self._owns6(
            peer, facts.source, link_local
        ):
            return "spoofed"
        if facts.target and not self._owns6(peer, facts.target, link_local):
            return "spoofed"
        for lladdr in facts.lladdrs:
            if lladdr != mac:
                return "spoofed"
        return None

    def _owns6(self, peer: Peer, address: bytes, link_local: bytes) -> bool:
        if address[0] == 0xFE and address[1] & 0xC0 == 0x80:
            return address == link_local
        return self.table.lookup(address) is peer

    def _send_frame(self, frame: bytes, ports: Iterable[Peer | str], now: float) -> None:
        """`frame` out of each of `ports`: to a peer wrapped (once), into the TAP plain."""
        wrapped: bytes | None = None
        for out in ports:
            if isinstance(out, Peer):
                if wrapped is None:
                    wrapped = l2frame.push_frame(frame)
                self.wg.send(out, wrapped, now)
            else:
                self.tun_out.append(frame)

    def _switch_frame(self, port: Peer | str, frame: bytes, now: float) -> None:
        decision = self.switch.receive(port, frame, now)
        if decision.drop is not None:
            if isinstance(port, Peer):
                self.count(port, decision.drop)
            else:
                self.drops[decision.drop] += 1
            return
        self._send_frame(frame, decision.ports, now)
        if decision.flooded and self.workers > 1:
            # Not a port here: another worker's peer, the other workers' to deliver
            # (the one that owns the address, when it is known, else all of them).
            remote = self._remote.get(frame[:6])
            if remote is not None and now - remote[1] < self.switch.aging:
                self.handoff.append((remote[0], None, frame))
            else:
                for worker in range(self.workers):
                    if worker != self.worker:
                        self.handoff.append((worker, None, frame))
