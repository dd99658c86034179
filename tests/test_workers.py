"""Tier 1: a relay of several workers (core/relay.py's handoff, io/handoff.py's
messages, app/workers.py's parts that need no process), and the `workers` key."""

from __future__ import annotations

import asyncio
import secrets
import socket
from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path
from typing import Any

import pytest

from gtun.app.config import load_server_config
from gtun.app.keys import encode_key, generate_private_key
from gtun.app.workers import (
    default_workers,
    effective_workers,
    settings_from_json,
    settings_to_json,
    specs_from_json,
    specs_to_json,
)
from gtun.core.client import ClientCore
from gtun.core.offload import Gso
from gtun.core.packet import build_icmp_echo
from gtun.core.relay import PeerSpec
from gtun.errors import ConfigError
from gtun.io.handoff import (
    MAX_PARTS,
    MESSAGE_BYTES,
    SOCKET_BUFFER,
    Handoff,
    channel_pair,
    decode,
    encode_items,
    encode_parts,
)
from gtun.testing.link import relay_settings
from gtun.testing.workers import WorkersLink

C1, C2, C3 = IPv4Address("10.66.0.2"), IPv4Address("10.66.0.3"), IPv4Address("10.66.0.4")


def two_workers(placement: dict[str, int]) -> WorkersLink:
    """A relay of two workers, a client per entry of `placement` (name -> the worker
    the kernel's hash gives it), started and configured."""
    key = secrets.token_bytes(32)
    link = WorkersLink(key, relay_settings(), 2, now=1000.0)
    relay_public = link.workers[0].wg.public_key
    specs = []
    for i, (name, worker) in enumerate(placement.items()):
        client = ClientCore(secrets.token_bytes(32), relay_public, "R", mode="tun")
        specs.append(PeerSpec(name, client.wg.public_key, IPv4Address(f"10.66.0.{i + 2}")))
        link.add_client(name, client, worker)
    for relay in link.workers:
        relay.set_peers(specs)
    for client in link.clients.values():
        client.start(link.now)
    link.pump()
    for name, client in link.clients.items():
        assert client.config is not None, name
    return link


def ping(src: IPv4Address, dst: IPv4Address) -> bytes:
    return build_icmp_echo(src, dst, 7, 1, b"gtun")


def test_each_client_is_held_by_the_worker_its_handshake_reached() -> None:
    link = two_workers({"c1": 0, "c2": 1})
    r0, r1 = link.workers
    c1 = r0.wg.peers[link.clients["c1"].wg.public_key]
    c2 = r1.wg.peers[link.clients["c2"].wg.public_key]
    assert c1.has_session and c2.has_session
    # Each worker knows where the other's client is; neither holds a session for it.
    assert r0.held_elsewhere(r0.wg.peers[c2.public_key]) == 1
    assert r1.held_elsewhere(r1.wg.peers[c1.public_key]) == 0
    assert not r0.wg.peers[c2.public_key].has_session


def test_clients_on_different_workers_reach_each_other() -> None:
    link = two_workers({"c1": 0, "c2": 1})
    link.got = {n: [] for n in link.got}
    received = list(link.received)
    link.clients["c1"].tun_packet(ping(C1, C2), link.now)
    link.pump()
    assert link.got["c2"] == [ping(C1, C2)]
    assert link.handed == [0, 1]  # worker 0 routed it, worker 1 sent it
    # c1's datagram went to worker 0 by its receiver index, not by the hash.
    assert link.received[0] == received[0] + 1
    link.clients["c2"].tun_packet(ping(C2, C1), link.now)
    link.pump()
    assert link.got["c1"] == [ping(C2, C1)]
    assert link.handed == [1, 1]


def test_steering_follows_the_session_not_the_hash() -> None:
    """A client whose hash names worker 1 after its session was made at worker 0 (its
    address is the same, the hash's key is not) still reaches worker 0: its transport
    messages carry worker 0's index."""
    link = two_workers({"c1": 0, "c2": 1})
    link.placement["c1"] = 1
    link.clients["c1"].tun_packet(ping(C1, C2), link.now)
    received = list(link.received)
    link.pump()
    assert link.received == [received[0] + 1, received[1]]
    assert link.got["c2"][-1] == ping(C1, C2)


def test_a_packet_from_any_queue_reaches_the_holder() -> None:
    link = two_workers({"c1": 0, "c2": 1})
    for w in (0, 1):  # the kernel may give it to either queue
        packet = build_icmp_echo(IPv4Address("10.66.0.1"), C2, w, 1, b"gtun")
        link.workers[w].tun_packet(packet, link.now)
        link.pump()
        assert link.got["c2"][-1] == packet


def test_a_client_that_moves_to_another_worker_takes_its_packets() -> None:
    link = two_workers({"c1": 0, "c2": 1})
    c1 = link.clients["c1"]
    # A new session made at worker 1 (a new source port hashes there).
    link.placement["c1"] = 1
    link.now += 200.0  # past REKEY_AFTER_TIME: c1 initiates again when it sends
    c1.tun_packet(ping(C1, C2), link.now)
    link.pump()
    r0, r1 = link.workers
    key = c1.wg.public_key
    assert r0.held_elsewhere(r0.wg.peers[key]) == 1
    assert r1.held_elsewhere(r1.wg.peers[key]) is None
    link.got["c1"] = []
    link.workers[0].tun_packet(ping(IPv4Address("10.66.0.1"), C1), link.now)
    link.pump()
    assert link.got["c1"] == [ping(IPv4Address("10.66.0.1"), C1)]


def test_an_older_session_notice_does_not_take_the_peer_away() -> None:
    link = two_workers({"c1": 0, "c2": 1})
    r0 = link.workers[0]
    key = link.clients["c1"].wg.public_key
    last = r0.wg.peers[key].last_handshake
    assert last is not None
    assert not r0.held_by(key, 1, last - 1.0)
    assert r0.held_elsewhere(r0.wg.peers[key]) is None
    assert r0.held_by(key, 1, last + 1.0)
    assert r0.held_elsewhere(r0.wg.peers[key]) == 1


def test_a_handed_packet_for_an_unknown_peer_is_counted() -> None:
    link = two_workers({"c1": 0})
    r0 = link.workers[0]
    r0.handed(1, secrets.token_bytes(32), [ping(C2, C1), ping(C2, C1)], link.now)
    assert r0.drops["handoff_unknown"] == 2
    # A frame (no key) in TUN mode is no one's.
    r0.handed(1, None, [b"\x00" * 60], link.now)
    assert r0.drops["handoff_unknown"] == 3


def test_handoff_messages_round_trip_and_malformed_ones_are_refused() -> None:
    key = secrets.token_bytes(32)
    hdr = Gso(1, 1, 40, 1400, 20, 16)
    items: list[bytes | tuple[Gso, bytes]] = [b"a" * 100, (hdr, b"b" * 3000), b"c"]
    (message,) = encode_items(b"P" + key, items)
    assert decode(message) == ("packets", key, items)
    many = encode_items(b"F", [b"x" * 40000] * 5)
    assert len(many) == 5 and all(len(m) <= MESSAGE_BYTES for m in many)  # one each
    assert [i for m in many for i in decode(m)[2]] == [b"x" * 40000] * 5
    tiny = [bytes([i % 256]) * 40 for i in range(600)]  # ACKs: many to a message
    parts = encode_parts(b"P" + key, tiny)
    assert len(parts) == 3 and all(len(p) <= MAX_PARTS for p in parts)  # 255 a message
    assert [i for p in parts for i in decode(b"".join(p))[2]] == tiny
    for bad in (b"", b"Z", b"P" + key[:5], b"P" + key + b"\x00\x10\x00\x00\x00ab", b"O" + key):
        with pytest.raises(ValueError):
            decode(bad)
    with pytest.raises(ValueError):
        decode(b"F\x07\x01\x00\x00\x00z")  # an unknown item kind


def test_a_channel_counts_what_it_hands_over_and_refuses() -> None:
    """Over a real channel pair: packet messages are counted out and in, a notice is
    neither, and a malformed message is counted and dropped (nothing delivered)."""

    async def run() -> tuple[dict[str, int], dict[str, int], list[Any], list[Any]]:
        loop = asyncio.get_running_loop()
        a, b = channel_pair()
        for sock in (a, b):  # the kernel doubles what it is given (its bookkeeping)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= SOCKET_BUFFER
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= SOCKET_BUFFER
        got: list[Any] = []
        notices: list[Any] = []
        arrived = asyncio.Event()

        def on_packets(worker: int, key: bytes | None, items: list[Any]) -> None:
            got.append((worker, key, items))

        def on_notice(worker: int, kind: str, key: bytes, value: Any) -> None:
            notices.append((worker, kind, key))

        h0 = Handoff(0, {1: a}, loop, on_packets, on_notice, lambda: None)
        h1 = Handoff(1, {0: b}, loop, on_packets, on_notice, arrived.set)
        try:
            key = secrets.token_bytes(32)
            assert h0.send([(1, None, b"p" * 100)]) == 0  # a frame (no peer)
            h0.announce(key, 1000.0)
            a.send(b"P" + key[:5])  # only a bug could send this
            assert h0.send([(2, None, b"q")]) == 1  # no such worker: dropped
            while len(got) + len(notices) < 2 or h1.counts["handoff_malformed"] < 1:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 5)
            return h0.counts, h1.counts, got, notices
        finally:
            h0.close()
            h1.close()

    out, into, got, notices = asyncio.run(run())
    assert got == [(0, None, [b"p" * 100])]
    assert [n[:2] for n in notices] == [(0, "held")]
    assert out["handed_out"] == 1 and into["handed_in"] == 1
    assert into["handoff_malformed"] == 1 and out["handoff_malformed"] == 0


def test_specs_and_settings_cross_to_a_worker_unchanged() -> None:
    specs = [
        PeerSpec(
            "a",
            secrets.token_bytes(32),
            C1,
            (ip_network("192.168.9.0/24"),),
            IPv6Address("fd66::2"),
            secrets.token_bytes(32),
        ),
        PeerSpec("b", secrets.token_bytes(32), C2),
    ]
    assert specs_from_json(specs_to_json(specs)) == specs
    settings = relay_settings(routes=(ip_network("192.168.77.0/24"),), mode="tap")
    assert settings_from_json(settings_to_json(settings)) == settings


def _config(tmp_path: Path, line: str) -> Path:
    (tmp_path / "k").write_text(encode_key(generate_private_key()) + "\n")
    (tmp_path / "k").chmod(0o600)
    path = tmp_path / "r.toml"
    path.write_text(
        f'[server]\nprivate_key_file = "k"\nnetwork = "10.66.0.0/24"\n{line}\n'
        f'state_dir = "{tmp_path}"\n'
    )
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("workers = 0", "out of range"),
        ("workers = 65", "out of range"),
        ('workers = "2"', "expected an integer"),
        ("workers = true", "expected an integer"),
    ],
)
def test_a_bad_workers_key_is_refused(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_server_config(_config(tmp_path, line))
    assert "workers" in str(info.value)


def test_workers_default_to_the_cores_and_one_where_several_cannot_run(tmp_path: Path) -> None:
    cfg = load_server_config(_config(tmp_path, ""))
    assert cfg.workers is None
    assert effective_workers(cfg, real_platform=True) == (default_workers(), None)
    two = load_server_config(_config(tmp_path, "workers = 2"))
    assert effective_workers(two, real_platform=True) == (2, None)
    n, why = effective_workers(two, real_platform=False)
    assert n == 1 and why is not None
    from dataclasses import replace

    n, why = effective_workers(replace(two, store="postgresql://x@y/z"), real_platform=True)
    assert n == 1 and why is not None and "store" in why


def _fresh_initiation(link: WorkersLink) -> bytes:
    c1 = link.clients["c1"]
    link.now += 10.0
    c1.wg.initiate_handshake(c1.server, link.now)
    ((initiation, _),) = c1.wg.datagrams_to_send()
    return initiation


def test_a_replayed_initiation_is_refused_by_every_worker() -> None:
    """Each worker checks a peer's initiation timestamps, and tells the others the one
    it accepted: the initiation replayed from another source (hashed to another
    worker) is refused there too."""
    link = two_workers({"c1": 0, "c2": 1})
    initiation = _fresh_initiation(link)
    link.workers[0].receive_datagram(initiation, "c1", link.now)  # the real one
    link.pump()
    r1 = link.workers[1]
    replayed = r1.wg.drops["replayed_handshake"]
    r1.receive_datagram(initiation, "attacker", link.now + 1.0)
    link.pump()
    assert r1.wg.drops["replayed_handshake"] == replayed + 1


def test_a_replay_that_outruns_the_notice_takes_nothing() -> None:
    """A replay that reaches another worker before the notice does is answered there;
    but the peer never uses that answer, so its packets stay where they were."""
    link = two_workers({"c1": 0, "c2": 1})
    initiation = _fresh_initiation(link)
    r0, r1 = link.workers
    r0.receive_datagram(initiation, "c1", link.now)  # the notice not yet delivered
    r1.receive_datagram(initiation, "attacker", link.now)
    assert r1.wg.drops["replayed_handshake"] == 0  # it could not tell
    link.pump()
    key = link.clients["c1"].wg.public_key
    assert r0.held_elsewhere(r0.wg.peers[key]) is None
    assert r1.held_elsewhere(r1.wg.peers[key]) == 0
    packet = build_icmp_echo(IPv4Address("10.66.0.1"), C1, 9, 1, b"gtun")
    r1.tun_packet(packet, link.now)
    link.pump()
    assert link.got["c1"][-1] == packet


def test_a_handshake_a_worker_starts_is_answered_to_that_worker() -> None:
    """A relay's own initiation (a rejoin after a restart, a peer enabled again): the
    peer's response carries the peer's index first and the worker's second, and goes
    to the worker that sent it, which then holds the session."""
    link = two_workers({"c1": 0, "c2": 1})
    r0, r1 = link.workers
    key = link.clients["c1"].wg.public_key
    link.now += 10.0
    assert r1.rejoin({key: "c1"}, link.now) == 1  # its last endpoint, as the store has it
    r1.handle_timer(link.now)
    for attempt in range(8):  # the peer's own index is random: half name the other
        if attempt:
            link.now += 10.0
            r1.wg.initiate_handshake(r1.wg.peers[key], link.now)
        handshakes = r1.wg.peers[key].handshakes
        link.pump()
        assert r1.wg.peers[key].handshakes == handshakes + 1, attempt
        assert r1.held_elsewhere(r1.wg.peers[key]) is None
        assert r0.held_elsewhere(r0.wg.peers[key]) == 1


def test_what_a_client_negotiated_is_known_to_every_worker() -> None:
    """A client's capabilities (partial checksums, bulk frames...) are negotiated with
    the worker it asks for its configuration; the others forward to it too, and must
    not, say, complete every TCP checksum for a client that takes them partial."""
    key = secrets.token_bytes(32)
    link = WorkersLink(key, relay_settings(partial_ok=True), 2, now=1000.0)
    relay_public = link.workers[0].wg.public_key
    client = ClientCore(secrets.token_bytes(32), relay_public, "R", mode="tun", accept_partial=True)
    link.add_client("c1", client, 0)
    spec = PeerSpec("c1", client.wg.public_key, C1)
    for relay in link.workers:
        relay.set_peers([spec])
    client.start(link.now)
    link.pump()
    r0, r1 = link.workers
    caps = r0.wg.peers[spec.public_key].data.caps
    assert caps.partial  # negotiated at worker 0 ...
    assert r1.wg.peers[spec.public_key].data.caps == caps  # ... and known at worker 1
    assert r1.wg.peers[spec.public_key].data.is_gtun
