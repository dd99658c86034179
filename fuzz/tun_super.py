#!/usr/bin/env python3
"""Fuzz the super-packet path from an offloading TUN: what a device read gives (a
virtio-net header and a packet) into `Relay.tun_super` / `ClientCore.tun_super`, through
the cores' segmentation, splitting, bulk frames and forwarding to the far devices.

Each input gets a fresh in-memory network (gtun.testing.link.CoreLink): a relay in TUN
mode and two gtun clients, c1 and c2, each reaching it over a stream (TCP: bulk frames
negotiated) or datagram (UDP) endpoint, each completing partial checksums or not (chosen
by the input), both connected.  Then a few operations: a header and packet read from the
relay's device (to c1, c2, the relay itself or nowhere), or from c1's device (from c1's
addresses or another's, to c2, the relay's side or c1 itself).  The header is fuzzed
whole or is the one a TCP super-packet comes with; the packet is raw bytes, a TCP packet
of up to 64 KB whose lengths agree, or such a packet of another protocol.  The read is
dispatched as io/driver.py does: a plain packet to tun_packet, the rest to tun_super.

Oracle, after every operation: nothing escapes the cores; every packet a device got is
IP, says its own length and is for an address its owner owns, and what the relay wrote
to its device or forwarded from c1 has a source c1 owns (read here, independently of
the forwarder); the segments of a TCP super-packet carry a correct IPv4 header checksum
and, for a receiver that did not ask for partial checksums, a correct TCP checksum;
every packet delivered and every datagram sent over UDP fits the MTU (whatever the
read's gso_size; a read without GSO when it fits itself), and only a stream endpoint
carries anything larger (bulk frames, at most a TCP frame); a
super-packet segment() accepts with a header a kernel writes makes no receiver count a
bad bulk frame; tables stay bounded and counters registered."""

from __future__ import annotations

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from ipaddress import IPv4Address, IPv6Network, ip_network
    from typing import Any

    from gtun.core import offload
    from gtun.core.client import ClientCore
    from gtun.core.offload import F_NEEDS_CSUM, GSO_NONE, Gso, OffloadError
    from gtun.core.relay import PeerSpec, Relay
    from gtun.io.framing import MAX_FRAME
    from gtun.testing.link import CoreLink, relay_settings

import oracles
from common import gso_header, main, tcp_packet

MTU = 1420  # relay_settings' MTU, pushed to the clients
OVERHEAD = 32  # a transport message's header and tag (WireGuard whitepaper 5.4.6)
# The largest TCP payload tcp_packet() builds: an IPv4 total length of 65535 (RFC 791)
# with 8 bytes of TCP options; past bulk.MAX_PACKET, so that bulk frames are split.
MAX_PAYLOAD = 0xFFFF - 20 - 20 - 8
KEYS = {"relay": bytes(range(1, 33)), "c1": bytes(range(41, 73)), "c2": bytes(range(81, 113))}
NET6 = IPv6Network("fd66::/64")
OWNS = {
    "c1": (ip_network("10.66.0.2/32"), ip_network("fd66::2/128"), ip_network("192.168.88.0/24")),
    "c2": (ip_network("10.66.0.3/32"), ip_network("fd66::3/128")),
}
ANYWHERE = (ip_network("0.0.0.0/0"), ip_network("::/0"))
# Addresses a fuzzed packet's header may name: the relay, c1, c2, c1's subnet, a pushed
# route, the internet.
V4 = [bytes([10, 66, 0, i]) for i in (1, 2, 3)] + [
    bytes([192, 168, 88, 7]),
    bytes([192, 168, 77, 9]),
    bytes([8, 8, 8, 8]),
]
V6 = [bytes.fromhex("fd66" + "00" * 13 + f"{i:02x}") for i in (1, 2, 3)] + [
    bytes.fromhex("2001db8" + "0" * 24 + "1")
]
# The flags a kernel's TUN read sets: none, a checksum to finish, or a checksum checked.
KERNEL_FLAGS = (0, F_NEEDS_CSUM, offload.F_DATA_VALID)


class Stream(str):
    """A stream (TCP) endpoint's name: bulk frames may go there (bulk.takes_bulk)."""

    stream = True


class Net(CoreLink):
    def __init__(self, fdp: atheris.FuzzedDataProvider) -> None:
        settings = relay_settings(
            network6=NET6, routes=(ip_network("192.168.77.0/24"),), partial_ok=fdp.ConsumeBool()
        )
        super().__init__(Relay(KEYS["relay"], settings), now=1000.0)
        # Every datagram sent: (whether its endpoint is a stream, its size).
        self.sent: list[tuple[bool, int]] = []
        specs = []
        for name, last in (("c1", 2), ("c2", 3)):
            stream = fdp.ConsumeBool()
            relay_ep = Stream("R") if stream else "R"
            client = ClientCore(
                KEYS[name], self.relay.wg.public_key, relay_ep, accept_partial=fdp.ConsumeBool()
            )
            self.add_client(Stream(name) if stream else name, client)
            self.relay_addr[name] = relay_ep
            self._record(client)
            specs.append(
                PeerSpec(
                    name,
                    client.wg.public_key,
                    IPv4Address(f"10.66.0.{last}"),
                    OWNS[name][2:],
                    address6=NET6[last],
                )
            )
        self.relay.set_peers(specs)
        self._record(self.relay)
        self.start()
        for client in self.clients.values():
            oracles.check(client.connected and client.config is not None, "not configured")
        self.sent.clear()

    def _record(self, core: Any) -> None:
        send = core.datagrams_to_send

        def recording() -> list[tuple[bytes, object]]:
            out: list[tuple[bytes, object]] = send()
            self.sent.extend((getattr(to, "stream", False), len(d)) for d, to in out)
            return out

        core.datagrams_to_send = recording

    def bad_bulk(self) -> int:
        """Bulk frames refused anywhere."""
        refused = sum(c.drops["bad_bulk"] for c in self.clients.values())
        for peer in self.relay.wg.peers.values():
            refused += int(peer.data.drops.get("bad_bulk", 0))
        return refused

    def partial_to(self, name: str) -> bool:
        """Whether what reaches `name` ("relay" for the relay's device) may carry a TCP
        checksum left partial."""
        if name == "relay":
            return self.clients["c1"].relay.caps.partial
        peer = self.relay.peer_by_name(name)
        assert peer is not None
        return bool(peer.data.caps.partial)


def read(fdp: atheris.FuzzedDataProvider, sources: list[bytes]) -> tuple[Gso, bytes]:
    """A header and packet as a device read gives them."""
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        packet = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3000))
    else:
        v6 = fdp.ConsumeBool()
        src = fdp.PickValueInList([s for s in sources if (len(s) == 16) == v6])
        dst = fdp.PickValueInList(V6 if v6 else V4)
        size = fdp.PickValueInList([None, 0, 1380, fdp.ConsumeIntInRange(0, MAX_PAYLOAD)])
        packet = bytearray(tcp_packet(fdp, size=size, addrs=(src, dst)))
        if kind == 3:  # another protocol
            packet[6 if v6 else 9] = fdp.ConsumeIntInRange(0, 255)
        packet = bytes(packet)
    if fdp.ConsumeBool():
        return offload.pull_gso(fdp.ConsumeBytes(offload.GSO_HDR_LEN).ljust(10, b"\0")), packet
    return gso_header(fdp, packet), packet


def from_device(core: Any, hdr: Gso, packet: bytes, now: float) -> None:
    """What io/driver.py does with a read."""
    if hdr.gso_type == GSO_NONE and not hdr.flags & F_NEEDS_CSUM:
        core.tun_packet(packet, now)
    else:
        core.tun_super(hdr, packet, now)


def fits(hdr: Gso, packet: bytes) -> bool:
    """Whether what the cores send for a read must fit the MTU: always for a GSO read
    (its segments are cut to the MTU, whatever its gso_size says), and for a read
    without GSO when it does itself (a kernel reads none longer from its device)."""
    return hdr.gso_type != GSO_NONE or len(packet) <= MTU


def kernel_like(hdr: Gso, packet: bytes) -> bool:
    """A header a kernel writes (flags, checksum start: virtio_net_hdr_from_skb()), for a
    super-packet segment() accepts."""
    if hdr.flags not in KERNEL_FLAGS or (hdr.gso_type != GSO_NONE and hdr.flags != F_NEEDS_CSUM):
        return False
    # A checksum to finish starts at the transport header (the skb's csum_start).
    l3 = 40 if packet[:1] == b"\x60" else (packet[0] & 0x0F) * 4 if packet else 0
    if hdr.flags & F_NEEDS_CSUM and hdr.csum_start < max(l3, 20):
        return False
    if hdr.gso_type == GSO_NONE and hdr.gso_size:  # set only for a GSO packet
        return False
    if packet[:1] == b"\x60":  # one whole IP packet: its length is the read's
        length = 40 + int.from_bytes(packet[4:6], "big")
    else:
        length = int.from_bytes(packet[2:4], "big")
    if length != len(packet):
        return False
    try:
        offload.segment(hdr, packet)
    except OffloadError:
        return False
    return True


def check_super(hdr: Gso, packet: bytes, where: str) -> None:
    """A super-packet written to a device is one a kernel takes: its header describes a
    TCP packet of its IP version with the checksum where TCP keeps it (read here)."""
    if hdr.gso_type == GSO_NONE:
        return
    v6 = packet[0] >> 4 == 6
    l3 = 40 if v6 else (packet[0] & 0x0F) * 4
    oracles.check(
        hdr.gso_type & ~offload.GSO_ECN == (offload.GSO_TCPV6 if v6 else offload.GSO_TCPV4)
        and packet[6 if v6 else 9] == offload.IPPROTO_TCP
        and hdr.flags == F_NEEDS_CSUM
        and (hdr.csum_start, hdr.csum_offset) == (l3, 16)
        and hdr.gso_size > 0,
        f"{where}: super-packet header {hdr} does not describe its packet",
    )


def check_writes(
    net: Net, name: str, writes: list[Any], hdr: Gso, packet: bytes, sender: str | None
) -> None:
    """What device `name` got after the read (hdr, packet) from `sender`'s device (None:
    the relay's)."""
    # The relay's device gets what no peer owns (its own address, routes, the internet).
    owned = ANYWHERE if name == "relay" else OWNS[name]
    peers = [n for nets in OWNS.values() for n in nets]
    must_fit = fits(hdr, packet)
    tcp_gso = hdr.gso_type != GSO_NONE
    for w in writes:
        dst = oracles.ip_destination(w[1] if isinstance(w, tuple) else w)
        if name == "relay" and dst is not None:
            oracles.check(not oracles.owns(peers, dst), "relay: a peer's packet to its device")
        if isinstance(w, tuple):
            oracles.assert_ip_write(w[1], owned, name)
            check_super(w[0], w[1], name)
            continue
        oracles.assert_ip_write(w, owned, name)
        if must_fit:
            oracles.check(len(w) <= MTU, f"{name}: a packet of {len(w)} bytes over the MTU")
        if tcp_gso:
            sums_ok = oracles.segment_checksums_ok(w, tcp=not net.partial_to(name))
            oracles.check(sums_ok, f"{name}: a segment with a wrong checksum")
    if sender is not None:
        oracles.assert_sources_owned(writes, OWNS[sender], f"{name} from {sender}")


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    net = Net(fdp)
    c1 = net.clients["c1"]
    c1_sources = [V4[1], V4[2], V4[3], V6[1], V6[2]]  # its own, c2's, its subnet's
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        from_relay = fdp.ConsumeBool()
        hdr, packet = read(fdp, V4 + V6 if from_relay else c1_sources)
        bad_bulk = net.bad_bulk()
        if from_relay:
            from_device(net.relay, hdr, packet, net.now)
        else:
            from_device(c1, hdr, packet, net.now)
        net.pump()
        sender = None if from_relay else "c1"
        for name in ("c1", "c2"):
            check_writes(net, name, net.take(name), hdr, packet, sender)
        if from_relay:
            oracles.check(not net.tun_in, "the relay's own read came back to its device")
        check_writes(net, "relay", net.tun_in, hdr, packet, sender)
        net.tun_in.clear()
        # (A read without GSO larger than any TUN MTU goes out as it came, and the TCP
        # transport refuses a frame over MAX_FRAME: no bound on what such a read makes.)
        if fits(hdr, packet):
            for stream, size in net.sent:
                limit = MAX_FRAME if stream else MTU + OVERHEAD
                oracles.check(size <= limit, f"a datagram of {size} bytes (stream: {stream})")
        net.sent.clear()
        if kernel_like(hdr, packet):
            oracles.check(net.bad_bulk() == bad_bulk, f"a bulk frame of {hdr} was refused")
        oracles.assert_relay_bounded(net.relay)
        for client in net.clients.values():
            oracles.assert_device_bounded(client.wg)
            oracles.counters_known(client.drops)
        net.now += fdp.ConsumeIntInRange(0, 1000) / 1000


if __name__ == "__main__":
    main(test_one)
