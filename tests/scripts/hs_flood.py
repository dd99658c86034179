"""A handshake flood against a relay: `hs_flood.py ADDRESS PORT RELAY_KEY SECONDS KEYS`,
run inside a lab namespace.  KEYS keys unknown to the relay send initiations (valid mac1)
from one UDP socket as fast as this process makes them, for SECONDS; every cookie reply
the relay sends back is consumed, so later initiations carry a valid mac2 (a cookie
reused for as long as it lasts).  Prints JSON counts: sent, cookie replies, responses."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time

from gtun.core.wg import WireGuard
from gtun.core.wg.constants import MESSAGE_COOKIE_REPLY, MESSAGE_RESPONSE


def main(address: str, port: int, relay_key: bytes, seconds: float, nkeys: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((address, port))
    sock.setblocking(False)
    attackers = []
    for _ in range(nkeys):
        wg = WireGuard(os.urandom(32), wall_offset=time.time() - time.monotonic())
        attackers.append((wg, wg.add_peer(relay_key, endpoint="relay")))
    counts = {"sent": 0, "cookie_replies": 0, "responses": 0, "with_mac2": 0}
    end = time.monotonic() + seconds
    i = 0
    while (now := time.monotonic()) < end:
        wg, peer = attackers[i % nkeys]
        i += 1
        peer.last_initiation_sent = None  # no pacing: a flood
        wg.initiate_handshake(peer, now)
        for data, _ in wg.datagrams_to_send():
            counts["with_mac2"] += data[-16:] != bytes(16)
            try:
                sock.send(data)
                counts["sent"] += 1
            except BlockingIOError:
                pass
        while True:
            try:
                reply = sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                break
            if reply[0] == MESSAGE_COOKIE_REPLY:
                counts["cookie_replies"] += 1
                for other, _ in attackers:  # the one whose index it names takes it
                    other.receive_datagram(reply, "relay", now)
                    other.datagrams_to_send()
            elif reply[0] == MESSAGE_RESPONSE:
                counts["responses"] += 1
    print(json.dumps(counts))


if __name__ == "__main__":
    main(
        sys.argv[1],
        int(sys.argv[2]),
        base64.b64decode(sys.argv[3]),
        float(sys.argv[4]),
        int(sys.argv[5]),
    )
