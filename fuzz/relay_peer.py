#!/usr/bin/env python3
"""Fuzz what an authenticated peer sends into the relay, and what the relay sends into a
client core, in TUN and TAP mode.

Each input gets a fresh in-memory network (gtun.testing.link.CoreLink): a relay and two
gtun clients, c1 and c2, both connected.  The input chooses the relay's mode and a few
operations: a plaintext c1 sends through the real WireGuard encryption (raw, or behind
an IPv4/IPv6 header with c1's source, a gtun message, frame or bulk magic, so that the
fuzzer starts past the first checks); a plaintext the relay sends to c1; one of c1's
recorded datagrams replayed, flipped or cut, from c1's address or an unknown one; a
packet from the host into the relay's device.

Oracle, after every operation: nothing escapes the cores; every packet (TUN) or frame
(TAP) the relay wrote to its device or forwarded to c2 speaks only for addresses c1
owns; the relay's tables stay bounded and its counters are registered reasons; no
datagram moved c1's endpoint.  At the end, unless c1 itself sent or was sent a gtun
message (which may rightly refuse or reconfigure it), c1 and c2 still exchange a packet
both ways."""

from __future__ import annotations

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from ipaddress import IPv4Address, IPv6Network, ip_network

    from gtun.core import l2frame
    from gtun.core import tunnel as tm
    from gtun.core.client import ClientCore
    from gtun.core.packet import build_udp4
    from gtun.core.relay import PeerSpec, Relay
    from gtun.testing.link import CoreLink, relay_settings

import oracles
from common import datagram, main

RELAY_KEY = bytes(range(1, 33))
C1_KEY = bytes(range(41, 73))
C2_KEY = bytes(range(81, 113))
NET6 = IPv6Network("fd66::/64")
C1_OWNS = (ip_network("10.66.0.2/32"), ip_network("fd66::2/128"), ip_network("192.168.88.0/24"))
BROADCAST = b"\xff" * 6
# Addresses a fuzzed packet's header may name (as the fuzzer rarely guesses them).
V4 = [bytes([10, 66, 0, i]) for i in (1, 2, 3)] + [bytes([192, 168, 88, 7])]
V6 = [bytes.fromhex("fd66" + "00" * 13 + f"{i:02x}") for i in (1, 2, 3)]


class Net(CoreLink):
    def __init__(self, mode: str) -> None:
        super().__init__(
            Relay(
                RELAY_KEY,
                relay_settings(mode=mode, network6=NET6, routes=(ip_network("192.168.77.0/24"),)),
            ),
            now=1000.0,
        )
        self.mode = mode
        pub = self.relay.wg.public_key
        c1 = self.add_client("c1", ClientCore(C1_KEY, pub, "R", mode=mode))
        c2 = self.add_client("c2", ClientCore(C2_KEY, pub, "R", mode=mode))
        self.relay.set_peers(
            [
                PeerSpec(
                    "c1",
                    c1.wg.public_key,
                    IPv4Address("10.66.0.2"),
                    (ip_network("192.168.88.0/24"),),
                    address6=NET6[2],
                ),
                PeerSpec("c2", c2.wg.public_key, IPv4Address("10.66.0.3"), address6=NET6[3]),
            ]
        )
        self.recorded: list[bytes] = []
        send = c1.datagrams_to_send

        def recording() -> list[tuple[bytes, object]]:
            out = send()
            self.recorded.extend(d for d, _ in out)
            return out

        c1.datagrams_to_send = recording  # type: ignore[method-assign]
        self.start()
        oracles.check(c1.connected and c2.connected, "clients did not connect")
        if mode == "tap":  # each client's MAC learned on its port
            self.exchange(b"hello")
        self.tun_in.clear()

    def frame(self, src: bytes, tag: bytes) -> bytes:
        return BROADCAST + src + b"\x88\xb5" + tag.ljust(46, b".")

    def exchange(self, tag: bytes) -> None:
        """A packet c1 -> c2 and one c2 -> c1; both must arrive."""
        c1, c2 = self.clients["c1"], self.clients["c2"]
        if self.mode == "tap":  # from the MAC each client's key pins
            there = self.frame(l2frame.mac_bytes_for_key(c1.wg.public_key), tag)
            back = self.frame(l2frame.mac_bytes_for_key(c2.wg.public_key), tag)
        else:
            there = build_udp4("10.66.0.2", "10.66.0.3", 1000, 2000, tag)
            back = build_udp4("10.66.0.3", "10.66.0.2", 2000, 1000, tag)
        self.take("c2")
        c1.tun_packet(there, self.now)
        self.pump()
        oracles.assert_delivered(self.take("c2"), there, "c1 -> c2")
        self.take("c1")
        c2.tun_packet(back, self.now)
        self.pump()
        oracles.assert_delivered(self.take("c1"), back, "c2 -> c1")

    def check_delivered(self) -> None:
        """What reached the relay's device and c2 came from c1: it must be c1's."""
        check = oracles.assert_frames_owned if self.mode == "tap" else oracles.assert_sources_owned
        check(self.tun_in, C1_OWNS, "relay device")
        check(self.take("c2"), C1_OWNS, "forwarded to c2")
        self.tun_in.clear()
        oracles.assert_relay_bounded(self.relay)
        for client in self.clients.values():
            oracles.assert_device_bounded(client.wg)
            oracles.counters_known(client.drops)
        peer = self.relay.peer_by_name("c1")
        oracles.check(peer is not None and peer.endpoint == "c1", "c1's endpoint moved")


def plaintext(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A plaintext, behind a header the fuzzer chooses."""
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind == 1:  # IPv4: version/IHL, ..., protocol, source, destination
        head = bytes([0x45]) + fdp.ConsumeBytes(11)
        return head.ljust(12, b"\0") + fdp.PickValueInList(V4) + fdp.PickValueInList(V4)
    if kind == 2:
        head = bytes([0x60]) + fdp.ConsumeBytes(7)
        return head.ljust(8, b"\0") + fdp.PickValueInList(V6) + fdp.PickValueInList(V6)
    prefix = {0: b"", 3: tm.MAGIC, 4: tm.FRAME_MAGIC, 5: tm.BULK_MAGIC}[kind]
    return prefix + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1500))


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    net = Net("tap" if fdp.ConsumeBool() else "tun")
    c1 = net.clients["c1"]
    c1_peer = net.relay.peer_by_name("c1")
    assert c1_peer is not None
    disturbed = False
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        op = fdp.ConsumeIntInRange(0, 4)
        if op <= 1:  # from c1, encrypted as c1 would
            body = plaintext(fdp) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
            if not body:
                continue
            disturbed |= tm.classify(body) == tm.MESSAGE
            c1.wg.send(c1.server, body, net.now)
            net.pump()
        elif op == 2:  # from the relay to c1
            body = plaintext(fdp)
            if not body:
                continue
            disturbed |= body[0] == 0
            net.relay.wg.send(c1_peer, body, net.now)
            net.pump()
        elif op == 3:  # a datagram of c1's, replayed or mutated, from c1 or elsewhere
            addr = "c1" if fdp.ConsumeBool() else "X"
            net.relay.receive_datagram(datagram(fdp, net.recorded), addr, net.now)
            for out, to in net.relay.datagrams_to_send():
                if to in net.clients:
                    net.clients[to].receive_datagram(out, "R", net.now)
            net.pump()
        else:  # from the host into the relay's device: to any client, not c1's doing
            net.check_delivered()
            net.relay.tun_packet(plaintext(fdp), net.now)
            net.pump()
            net.take("c2")
        net.check_delivered()
        net.now += fdp.ConsumeIntInRange(0, 1000) / 1000
    if not disturbed:
        net.exchange(b"after the fuzzed input")


if __name__ == "__main__":
    main(test_one)
