"""Every reason gtun drops something, in one registry: its name (the key of the drop
counters in `gtun status` and the metrics), what it means, and which counters count it.

The counters: "wireguard" (the WireGuard core, WireGuard.drops), "relay" (Relay.drops),
"client" (ClientCore.drops), "switch" (the TAP-mode switch's verdicts, counted by the
relay), "tcp" (the TCP transport's connections) and "peer" (the relay's per-peer
counters, whose series the metrics endpoint lists from the start).  A name may be
counted by several: status and metrics add them up (merge_counts).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reason:
    name: str
    meaning: str
    counters: tuple[str, ...]


REASONS: tuple[Reason, ...] = (
    # The WireGuard core (wg/device.py).
    Reason(
        "malformed",
        "wrong size, type or reserved bytes; a gtun message that does not parse",
        ("wireguard", "relay", "client", "peer"),
    ),
    Reason("mac1", "mac1 does not verify: not for us, or garbage", ("wireguard",)),
    Reason("cookie", "under load and no valid mac2: answered with a cookie reply", ("wireguard",)),
    Reason("unknown_peer", "a valid initiation from a key we do not know", ("wireguard",)),
    Reason("handshake", "a handshake message that does not authenticate", ("wireguard",)),
    Reason("replayed_handshake", "an initiation whose timestamp is not newer", ("wireguard",)),
    Reason(
        "handshake_flood", "initiations from one peer faster than the allowed rate", ("wireguard",)
    ),
    Reason("unknown_index", "transport or response for an index we do not have", ("wireguard",)),
    Reason("decrypt", "transport message that does not authenticate", ("wireguard",)),
    Reason("replay", "transport counter seen before or too old", ("wireguard",)),
    Reason("expired", "transport message under a keypair past REJECT_AFTER_TIME", ("wireguard",)),
    Reason("no_endpoint", "something to send, but the peer's endpoint is unknown", ("wireguard",)),
    Reason(
        "staged_overflow",
        "per-peer queue while handshaking was full; oldest dropped",
        ("wireguard",),
    ),
    # Forwarding (relay.py, forward.py) and the client (client.py).
    Reason(
        "not_configured", "a packet from the TUN before the relay sent a configuration", ("client",)
    ),
    Reason("spoofed", "inner source not owned by the sending peer", ("relay", "peer")),
    Reason("no_route", "from the TUN, to an address no peer owns", ("relay",)),
    Reason("loop", "a packet or frame addressed back to its sender", ("relay", "peer", "switch")),
    Reason("not_ip", "plaintext that is neither IP nor a gtun message", ("relay", "client")),
    Reason(
        "link_scoped",
        "link-local source or multicast/broadcast destination: never routed",
        ("relay", "client", "peer"),
    ),
    Reason("queue_full", "the edge could not queue the datagram or TUN write", ("relay", "client")),
    Reason(
        "bad_bulk",
        "a bulk frame (bulk.py) whose header does not describe its packet",
        ("relay", "client"),
    ),
    Reason(
        "bad_gso",
        "a super-packet from the TUN that cannot be cut into packets",
        ("relay", "client"),
    ),
    # TAP mode (switch.py, l2frame.py).
    Reason(
        "not_frame",
        "TAP mode: a plaintext that is no gtun frame (a stock peer's IP packet)",
        ("relay", "client", "peer"),
    ),
    Reason(
        "runt",
        "TAP mode: frame shorter than an Ethernet header",
        ("relay", "client", "peer", "switch"),
    ),
    Reason(
        "oversized",
        "TAP mode: frame longer than the MTU allows",
        ("relay", "client", "peer", "switch"),
    ),
    Reason(
        "bad_mac", "TAP mode: multicast, broadcast or zero source MAC", ("relay", "peer", "switch")
    ),
    Reason(
        "mac_stolen",
        "TAP mode: source MAC owned (live in the table) by another port",
        ("relay", "peer", "switch"),
    ),
    Reason(
        "mac_limit",
        "TAP mode: the port's or the table's MAC limit reached",
        ("relay", "peer", "switch"),
    ),
    # The TCP transport (io/tcp.py): connections closed, not datagrams.
    Reason("tcp_bad_frame", "a frame of impossible size, cut off, or not WireGuard", ("tcp",)),
    Reason("tcp_timeout", "no valid frame within the time allowed", ("tcp",)),
    Reason("tcp_stalled", "the other end stopped reading", ("tcp",)),
    Reason("tcp_refused", "the connection limit was reached", ("tcp",)),
    Reason(
        "handshake_ratelimited",
        "handshake messages from one source address faster than 20/s (burst 5)",
        ("wireguard",),
    ),
    Reason(
        "cookie_ratelimited",
        "under load, no valid mac2, and the source was sent its cookie replies (20/s, "
        "burst 5): dropped unanswered",
        ("wireguard",),
    ),
    Reason(
        "tcp_source_limit",
        "too many connections from one address not yet authenticated",
        ("tcp",),
    ),
    # Appended by the hostile-peer work (forward.py, relay.py).
    Reason(
        "source_routed",
        "IPv6 routing header with segments left, or a home address option: a destination "
        "or source other than the header's",
        ("relay", "peer"),
    ),
    Reason(
        "not_negotiated",
        "a bulk frame (bulk.py) from a peer that did not negotiate them (tunnel.Caps: a "
        "stock peer, a client whose configuration request did not offer them, TAP mode), "
        "or a health request from a client that did not ask for the capability",
        ("relay", "client", "peer"),
    ),
    Reason(
        "too_big",
        "a packet without GSO larger than the tunnel MTU, for a peer (nothing can cut it "
        "to fit), or a segment larger than a split allows",
        ("relay", "client", "peer"),
    ),
    Reason(
        "events_full",
        "the core's event queue was full (its caller did not drain it); event dropped",
        ("relay", "client"),
    ),
    # A reason of OffloadError (offload.py) that no counter keeps by that name: the edge
    # and the cores count it as "bad_gso" or "bad_bulk" ("too_big", above, is kept).
    Reason(
        "bad_vnet_hdr",
        "a super-packet header shorter than its encoding, or a checksum "
        "offset outside the packet (counted as bad_gso or bad_bulk)",
        (),
    ),
    # The edge's fairness (io/driver.py).
    Reason(
        "fair_queue_full",
        "a source's own queue (or all sources' together) was full while the edge served "
        "others fairly: dropped from that source's tail",
        ("relay", "client"),
    ),
    # The edge's bound on delay (io/driver.py, core/codel.py).
    Reason(
        "codel",
        "a large transport datagram dropped because what waited before the core (the "
        "socket's buffer and the per-source queues) stood above CoDel's target: the "
        "sender is told to slow down",
        ("relay", "client"),
    ),
    # Failover (client.py): the other relays of the network, pushed in the configuration.
    Reason(
        "bad_relay",
        "a pushed relay entry that is not valid (name, endpoint, a key that is not 32 "
        "bytes or is of low order, given twice) or past the 16 kept; ignored",
        ("client",),
    ),
    Reason(
        "not_current",
        "a gtun message from a known relay that is not the client's relay now; ignored",
        ("client",),
    ),
    # Path MTU probes (relay.py, client.py).
    Reason(
        "probe_ratelimited",
        "path MTU probes from one peer faster than the relay answers (20/s, burst 64)",
        ("relay", "peer"),
    ),
    # The relay's health (relay.py): what its edge saw of its machine, for doctor.
    Reason(
        "health_ratelimited",
        "health requests from one peer faster than the relay answers (1/s, burst 4)",
        ("relay", "peer"),
    ),
    # The relay mesh (relay.py, forward.py): relays of one network forward one hop.
    Reason(
        "mesh_hop",
        "from a mesh relay, for an address this relay would send on (to another relay, "
        "to a client whose session is elsewhere, or out of its TUN without owning it): "
        "a second hop, never taken",
        ("relay", "peer"),
    ),
    Reason(
        "mesh_spoofed",
        "from a mesh relay, an inner source that is neither a client whose session is "
        "at that relay nor a route that relay owns",
        ("relay", "peer"),
    ),
    Reason(
        "mesh_message",
        "a gtun message (configuration request, ping, probe) from a mesh relay: relays "
        "push nothing to each other",
        ("relay", "peer"),
    ),
    # Relay workers (relay.py, forward.py, app/workers.py): one relay in several processes.
    Reason(
        "handoff_full",
        "for a peer whose session another worker of the relay holds, and the channel to "
        "that worker was full (or the worker was restarting)",
        ("relay",),
    ),
    Reason(
        "handoff_unknown",
        "handed over by another worker for a peer this worker does not have (removed "
        "meanwhile), or malformed",
        ("relay",),
    ),
    # Preshared keys (wg/device.py, relay.py): psk2 mixes the key into the response, so
    # a responder never sees a wrong one; it sees sessions that are never used.
    Reason(
        "unconfirmed",
        "a session the relay answered that the peer never used before initiating again: "
        "the response was lost, or the peer could not authenticate it (a wrong preshared "
        "key)",
        ("relay", "peer"),
    ),
)

MEANING = {r.name: r.meaning for r in REASONS}


def reasons(counter: str) -> tuple[str, ...]:
    """The names a counter counts, in registry order."""
    return tuple(r.name for r in REASONS if counter in r.counters)


WG_DROP_REASONS = reasons("wireguard")
RELAY_DROP_REASONS = reasons("relay")
CLIENT_DROP_REASONS = reasons("client")
SWITCH_DROP_REASONS = reasons("switch")
TCP_DROP_REASONS = reasons("tcp")
PEER_DROP_REASONS = reasons("peer")


def merge_counts(*counters: dict[str, int]) -> dict[str, int]:
    """Sum drop counters that share reasons (a core's and its edge's)."""
    total: dict[str, int] = {}
    for counter in counters:
        for key, value in counter.items():
            total[key] = total.get(key, 0) + value
    return total
