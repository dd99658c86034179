"""A WireGuard device: our static key, the peers we know, their sessions and timers.

Theory of operation
-------------------
Each peer has up to three keypairs (paper 5.4.6 and wireguard-go's keypair.go):
`current` (used to send), `previous` (still accepted on receive, for packets in flight
across a rekey) and `next` (a responder's fresh keypair, which becomes `current` when
the first transport message under it arrives: that is the initiator's confirmation).

A handshake is started when there is something to send and no usable keypair, when the
current keypair grows old (REKEY_AFTER_TIME/MESSAGES, initiator side only), when data
was sent but nothing came back for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, or by the edge.
Initiations are retransmitted every REKEY_TIMEOUT (plus jitter) and abandoned after
REKEY_ATTEMPT_TIME, dropping the packets staged for that peer.

Timers are absolute deadlines kept on each peer (None when not armed); handle_timer()
fires the expired ones.  The edge re-arms its single wall-clock timer with get_timer()
after every call, as in aioquic.

Handshake messages cost Diffie-Hellman work, so they pass three gates before any: mac1
(keyed by our public key), mac2 under load (a cookie bound to the source address,
answered with a cookie reply when missing), then a per-source token bucket
(ratelimiter.py: 20 a second, a burst of 5, as wireguard-go).  Cookie replies have a
bucket per source of their own (the same 20 a second, burst 5): the source of a message
without mac2 may be forged, and a flood in one address's name must not become a flood
of replies to it; the rest are dropped unanswered ("cookie_ratelimited").  A client
needs one reply per cookie (two minutes), so its first initiation under load earns it.
An initiation from a key that is no peer of ours costs one DH, leaves no state and is
counted ("unknown_peer"); the PeerUnknown event lets the edge report it.

Remote misbehaviour never raises: every datagram that fails to parse, authenticate or
pass the replay window is dropped and counted in `WireGuard.drops` by reason.  Misuse of
the API by the caller (a wrong-sized key, an unknown peer) raises ValueError;
add_peer() raises LocalProtocolError (a ValueError) for a key whose DH with ours is
degenerate (a low-order point).  A change to the peer set changes nothing when it
raises: add_peer() checks before it adds, and a change of several peers at once is
new_peer() for each (every check, no effect) and then update_peers().
"""

from __future__ import annotations

import random
import secrets
import struct
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gtun.core.drops import WG_DROP_REASONS
from gtun.core.errors import LocalProtocolError
from gtun.core.wg import messages as m
from gtun.core.wg import noise
from gtun.core.wg.constants import (
    AEAD_TAG_SIZE,
    COOKIE_REPLIES_PER_SECOND_PER_SOURCE,
    COOKIE_REPLY_BURST_PER_SOURCE,
    HANDSHAKE_INITIATION_RATE,
    INDEX_SPACE,
    KEEPALIVE_TIMEOUT,
    KEY_SIZE,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    MAX_WORKERS,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    PADDING_MULTIPLE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
    UNDER_LOAD_HOLD,
)
from gtun.core.wg.cookie import CookieChecker, CookieGenerator
from gtun.core.wg.crypto import CryptoError, dh, dh_public, tai64n
from gtun.core.wg.endpoint import cookie_source, mark_authentic, source_key
from gtun.core.wg.events import (
    Event,
    HandshakeCompleted,
    HandshakeTimedOut,
    PacketReceived,
    PeerUnknown,
    SessionConfirmed,
    SessionUnconfirmed,
)
from gtun.core.wg.ratelimiter import RateLimiter
from gtun.core.wg.replay import ReplayWindow

_pack_nonce = struct.Struct("<4xQ").pack  # 32 zero bits, then the counter (paper 5.4.6)
_unpack_transport = struct.Struct("<4xIQ").unpack_from  # receiver index, counter
_pack_header = struct.Struct("<I I Q").pack
_TRANSPORT_TYPE = MESSAGE_TRANSPORT
_PAD = PADDING_MULTIPLE - 1  # a power of two

# Reasons a datagram is dropped, the keys of WireGuard.drops: core/drops.py.
DROP_REASONS = WG_DROP_REASONS


class Keypair:
    """One session's transport keys (paper 5.4.6)."""

    __slots__ = (
        "peer",
        "send",
        "receive",
        "local_index",
        "remote_index",
        "send_counter",
        "replay",
        "created",
        "initiator",
    )

    def __init__(
        self,
        peer: Peer,
        keys: noise.SessionKeys,
        local_index: int,
        remote_index: int,
        created: float,
        initiator: bool,
    ) -> None:
        self.peer = peer
        # The AEAD objects are built once per session, never per packet.
        self.send = ChaCha20Poly1305(keys.send)
        self.receive = ChaCha20Poly1305(keys.receive)
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = created
        self.initiator = initiator


class Handshake:
    """An initiation we sent and whose response we await."""

    __slots__ = ("peer", "local_index", "state", "created")

    def __init__(
        self, peer: Peer, local_index: int, state: noise.InitiatorState, created: float
    ) -> None:
        self.peer = peer
        self.local_index = local_index
        self.state = state
        self.created = created


class Peer:
    """A remote WireGuard peer: its key, endpoint, sessions, timers and counters.

    `data` is free for the edge (gtun stores the peer's name and addresses there)."""

    def __init__(
        self,
        device: WireGuard,
        public_key: bytes,
        *,
        preshared_key: bytes | None,
        endpoint: Hashable | None,
        persistent_keepalive: float,
        data: Any,
    ) -> None:
        self.public_key = public_key
        self.preshared_key = preshared_key or bytes(KEY_SIZE)
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive
        self.data = data
        self.static_static = dh(device._private, public_key)
        self.cookies = CookieGenerator(public_key)

        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake: Handshake | None = None
        self.staged: deque[bytes] = deque()

        self.last_timestamp = b""  # greatest TAI64N accepted from this peer
        self.last_initiation_consumed: float | None = None
        self.last_initiation_sent: float | None = None
        self.handshake_attempts = 0
        self.last_handshake: float | None = None  # device clock (monotonic)
        self.handshakes = 0  # sessions established with this peer
        self.last_received: float | None = None

        # Timer deadlines (device clock) or None.
        self.t_retransmit: float | None = None
        self.t_new_handshake: float | None = None
        self.t_send_keepalive: float | None = None
        self.t_zero_keys: float | None = None
        self.t_persistent_keepalive: float | None = None

        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0

    def __repr__(self) -> str:
        return f"<Peer {self.public_key.hex()[:8]} {self.endpoint}>"

    def timers(self) -> tuple[float | None, ...]:
        return (
            self.t_retransmit,
            self.t_new_handshake,
            self.t_send_keepalive,
            self.t_zero_keys,
            self.t_persistent_keepalive,
        )

    @property
    def has_session(self) -> bool:
        return self.current is not None


class WireGuard:
    """The sans-IO WireGuard device.

    Call receive_datagram() for each datagram, send() for each packet to a peer and
    handle_timer() when get_timer() is due; after each, drain next_event() and
    datagrams_to_send().  `now` is a monotonic clock in seconds; `wall_offset` turns it
    into Unix time for the TAI64N timestamps of initiations.

    `worker` of `workers` (default 0 of 1: any index) makes every local index this
    device allocates name it: index % workers == worker, so that a steering program
    in front of several devices sharing one port (io/steering.py) sends each response,
    cookie reply and transport message to the device that owns its receiver index.
    Within that class an index is still uniformly random (secrets) and unique among
    this device's handshakes and keypairs.  Raises ValueError for a worker outside
    0..workers-1 or workers outside 1..MAX_WORKERS.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        wall_offset: float = 0.0,
        mtu: int = 0,
        rng: random.Random | None = None,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        if len(private_key) != KEY_SIZE:
            raise ValueError("private key must be 32 bytes")
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1 to {MAX_WORKERS}")
        if not 0 <= worker < workers:
            raise ValueError(f"worker must be 0 to {workers - 1}")
        self.worker = worker
        self.workers = workers
        # Say SessionConfirmed when a peer first uses a session we answered (a relay
        # of several workers takes the peer's packets only then: app/workers.py).
        self.report_confirmed = False
        # Indexes naming this worker: worker + workers * k for k below this bound.
        self._index_slots = (INDEX_SPACE - worker + workers - 1) // workers
        self._private = X25519PrivateKey.from_private_bytes(private_key)
        self.public_key = dh_public(self._private)
        self.wall_offset = wall_offset
        self.mtu = mtu
        self._rng = rng or random.Random()
        self._cookie_checker = CookieChecker(self.public_key)
        self.peers: dict[bytes, Peer] = {}
        self._keypairs: dict[int, Keypair] = {}
        self._handshakes: dict[int, Handshake] = {}
        self._datagrams: list[tuple[bytes, Any]] = []
        self._events: deque[Event] = deque()
        self._deadline: float | None = None
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.handshakes_completed = 0
        # The fast lane for data: when set, each decrypted payload is handed to
        # on_packet(peer, payload, now) as it is received instead of becoming a
        # PacketReceived event (saves an object and a queue trip per packet).  The
        # callback may call send().
        self.on_packet: Callable[[Peer, bytes, float], None] | None = None
        # A transport message under a receiver index we do not know (a restarted relay
        # sees every client's old session so): on_unknown_index(addr, now), when set, may
        # start a handshake.  Called per such datagram: it must be cheap and bounded.
        self.on_unknown_index: Callable[[Hashable, float], None] | None = None
        # Under-load detection: handshake messages counted per one-second window.
        self.force_under_load = False
        self._load_window = 0.0
        self._load_count = 0
        self._under_load_until = -1.0
        self.limiter = RateLimiter()  # handshake messages per source, before any DH
        # Cookie replies per source: each answers a datagram whose source may be forged.
        self.cookie_limiter = RateLimiter(
            COOKIE_REPLIES_PER_SECOND_PER_SOURCE, COOKIE_REPLY_BURST_PER_SOURCE
        )

    # --- peers -------------------------------------------------------------------

    def new_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Hashable | None = None,
        persistent_keepalive: float = 0.0,
        data: Any = None,
    ) -> Peer:
        """A peer of this device, checked but not added (update_peers() adds it): every
        check of add_peer() and none of its effect.  Raises what add_peer() raises."""
        if len(public_key) != KEY_SIZE:
            raise ValueError("public key must be 32 bytes")
        if public_key == self.public_key:
            raise ValueError("a peer cannot have our own public key")
        if public_key in self.peers:
            raise ValueError("peer already present")
        if preshared_key is not None and len(preshared_key) != KEY_SIZE:
            raise ValueError("preshared key must be 32 bytes")
        try:
            return Peer(
                self,
                public_key,
                preshared_key=preshared_key,
                endpoint=endpoint,
                persistent_keepalive=persistent_keepalive,
                data=data,
            )
        except CryptoError as exc:
            raise LocalProtocolError("degenerate (low-order) public key") from exc

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Hashable | None = None,
        persistent_keepalive: float = 0.0,
        data: Any = None,
    ) -> Peer:
        """Add a peer.  Raises ValueError for a malformed key or our own key, and
        LocalProtocolError (a ValueError) for a low-order key, whose DH with ours is
        all zeros (the caller should have refused it: crypto.is_degenerate_key); the
        device is unchanged when it raises."""
        peer = self.new_peer(
            public_key,
            preshared_key=preshared_key,
            endpoint=endpoint,
            persistent_keepalive=persistent_keepalive,
            data=data,
        )
        self.peers[public_key] = peer
        return peer

    def set_preshared_key(self, peer: Peer, preshared_key: bytes | None) -> bool:
        """Give `peer` a new preshared key (None: none, all zeros).  When it changes,
        the sessions and any handshake made with the old one end now, so that the old
        key stops working at once; the next packet for the peer starts a handshake with
        the new one.  Returns whether it changed.  Raises ValueError for a key that is
        not 32 bytes, changing nothing."""
        key = preshared_key or bytes(KEY_SIZE)
        if len(key) != KEY_SIZE:
            raise ValueError("preshared key must be 32 bytes")
        if key == peer.preshared_key:
            return False
        peer.preshared_key = key
        self._zero_keys(peer)
        return True

    def remove_peer(self, peer: Peer) -> None:
        self._zero_keys(peer)
        self.peers.pop(peer.public_key, None)

    def update_peers(self, add: Iterable[Peer], remove: Iterable[Peer]) -> None:
        """Remove the peers `remove` and add the peers `add` (made by new_peer()), all
        or nothing: raises ValueError before any change when a peer to remove is not
        ours, or a key to add is given twice or still present once `remove` is gone."""
        add, remove = list(add), list(remove)
        leaving: set[bytes] = set()
        for peer in remove:
            if self.peers.get(peer.public_key) is not peer:
                raise ValueError(f"peer {peer.public_key.hex()[:8]} is not a peer of this device")
            leaving.add(peer.public_key)
        coming: set[bytes] = set()
        for peer in add:
            key = peer.public_key
            if key in coming or (key in self.peers and key not in leaving):
                raise ValueError(f"peer {key.hex()[:8]} already present")
            coming.add(key)
        for peer in remove:
            self.remove_peer(peer)
        for peer in add:
            self.peers[peer.public_key] = peer

    # --- the edge's three calls after each input ---------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def has_events(self) -> bool:
        """Whether next_event() has something (cheaper to ask per datagram)."""
        return bool(self._events)

    def datagrams_to_send(self) -> list[tuple[bytes, Any]]:
        out = self._datagrams
        self._datagrams = []
        return out

    def get_timer(self) -> float | None:
        return self._deadline

    # --- input: datagrams ----------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Hashable, now: float) -> None:
        """Process one datagram from the network.  Never raises for what it contains."""
        # The transport path comes first and inline: it is the per-packet hot path.
        if len(data) >= TRANSPORT_MIN_SIZE and data[0] == _TRANSPORT_TYPE:
            self._receive_transport(data, addr, now)
            return
        kind = m.message_type(data)
        try:
            if kind == MESSAGE_INITIATION:
                self._receive_initiation(data, addr, now)
            elif kind == MESSAGE_RESPONSE:
                self._receive_response(data, addr, now)
            elif kind == MESSAGE_COOKIE_REPLY:
                self._receive_cookie_reply(data, now)
            else:
                self.drops["malformed"] += 1
        except m.MessageError:
            self.drops["malformed"] += 1
        except CryptoError:
            self.drops["handshake"] += 1

    def _receive_transport(self, data: bytes, addr: Hashable, now: float) -> None:
        # The per-packet hot path: locals and inline checks.
        if data[1] or data[2] or data[3]:
            self.drops["malformed"] += 1
            return
        receiver, counter = _unpack_transport(data)
        kp = self._keypairs.get(receiver)
        if kp is None:
            self.drops["unknown_index"] += 1
            if self.on_unknown_index is not None:
                self.on_unknown_index(addr, now)
            return
        replay = kp.replay
        if not replay.would_accept(counter):
            self.drops["replay"] += 1
            return
        if now - kp.created >= REJECT_AFTER_TIME:
            self.drops["expired"] += 1
            return
        try:
            plaintext = kp.receive.decrypt(_pack_nonce(counter), data[TRANSPORT_HEADER_SIZE:], None)
        except InvalidTag:
            self.drops["decrypt"] += 1
            return
        if not replay.accept(counter):
            self.drops["replay"] += 1
            return
        peer = kp.peer
        if addr != peer.endpoint:
            peer.endpoint = addr  # roaming (paper 2.1): follow the latest authentic source
            mark_authentic(addr)
        if kp is peer.next:
            mark_authentic(addr)
            # The initiator used the keypair we offered: it is confirmed.
            self._retire(peer.previous)
            peer.previous = peer.current
            peer.current = kp
            peer.next = None
            # Timers: handshake complete, whichever side started it.
            peer.t_retransmit = None
            peer.handshake_attempts = 0
            if peer.staged:
                self._flush_staged(peer, now)
            if self.report_confirmed:
                self._events.append(SessionConfirmed(peer))
        peer.rx_bytes += len(data)
        peer.last_received = now
        # Timers: any authenticated packet received.
        peer.t_new_handshake = None
        if peer.persistent_keepalive > 0:
            self._persistent_traversal(peer, now)
        # Keep the key fresh (paper 6.2): an initiator whose session nears expiry rekeys.
        if (
            kp is peer.current
            and kp.initiator
            and now - kp.created > REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
            and peer.handshake is None
        ):
            self._initiate(peer, now)
        if plaintext:
            peer.rx_packets += 1
            if peer.t_send_keepalive is None:
                self._arm(peer, "t_send_keepalive", now + KEEPALIVE_TIMEOUT)
            on_packet = self.on_packet
            if on_packet is None:
                self._events.append(PacketReceived(peer, plaintext))
            else:
                on_packet(peer, plaintext, now)

    def _under_load(self, now: float) -> bool:
        if now - self._load_window >= 1.0:
            self._load_window = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_HOLD
        return self.force_under_load or now < self._under_load_until

    def _check_macs(self, data: bytes, sender: int, addr: Hashable, now: float) -> bool:
        """The gates before any DH: mac1 always; mac2 under load, answering a missing
        one with a cookie reply while the source's cookie bucket lasts; then the
        source's handshake bucket."""
        if not self._cookie_checker.check_mac1(data):
            self.drops["mac1"] += 1
            return False
        key = source_key(addr)
        if self._under_load(now):
            source = cookie_source(addr)
            if not self._cookie_checker.check_mac2(data, source, now):
                # The source may be forged: a flood in one address's name must not be
                # turned into a stream of replies to it (reflection), nor cost us an
                # encryption each.
                if not self.cookie_limiter.allow(key, now):
                    self.drops["cookie_ratelimited"] += 1
                    return False
                reply = self._cookie_checker.create_reply(data, sender, source, now)
                self._datagrams.append((m.push_cookie_reply(reply), addr))
                self.drops["cookie"] += 1
                return False
        if not self.limiter.allow(key, now):
            self.drops["handshake_ratelimited"] += 1
            return False
        return True

    def _receive_initiation(self, data: bytes, addr: Hashable, now: float) -> None:
        msg = m.pull_initiation(data)
        if not self._check_macs(data, msg.sender, addr, now):
            return
        remote_static, ck, h = noise.consume_initiation_static(msg, self._private, self.public_key)
        peer = self.peers.get(remote_static)
        if peer is None:
            self.drops["unknown_peer"] += 1
            self._events.append(PeerUnknown(remote_static, addr))
            return
        consumed = noise.consume_initiation_timestamp(msg, remote_static, ck, h, peer.static_static)
        if consumed.timestamp <= peer.last_timestamp:
            self.drops["replayed_handshake"] += 1
            return
        if (
            peer.last_initiation_consumed is not None
            and now - peer.last_initiation_consumed < HANDSHAKE_INITIATION_RATE
        ):
            self.drops["handshake_flood"] += 1
            return
        peer.last_timestamp = consumed.timestamp
        peer.last_initiation_consumed = now

        local_index = self._new_index()
        response, keys = noise.create_response(
            consumed, peer.preshared_key, local_index, msg.sender
        )
        kp = Keypair(peer, keys, local_index, msg.sender, now, initiator=False)
        if peer.next is not None:
            self._events.append(SessionUnconfirmed(peer))
        self._retire(peer.next)
        peer.next = kp
        self._keypairs[local_index] = kp
        peer.endpoint = addr
        packed = peer.cookies.add_macs(m.push_response(response), now)
        self._send_raw(peer, packed, now)
        self._session_derived(peer, now)
        self._events.append(HandshakeCompleted(peer, initiator=False))

    def _receive_response(self, data: bytes, addr: Hashable, now: float) -> None:
        msg = m.pull_response(data)
        if not self._check_macs(data, msg.sender, addr, now):
            return
        hs = self._handshakes.get(msg.receiver)
        if hs is None:
            self.drops["unknown_index"] += 1
            return
        peer = hs.peer
        keys = noise.consume_response(msg, hs.state, self._private, peer.preshared_key)
        # Authenticated: the pending handshake becomes the current keypair.
        del self._handshakes[msg.receiver]
        peer.handshake = None
        kp = Keypair(peer, keys, hs.local_index, msg.sender, now, initiator=True)
        self._keypairs[hs.local_index] = kp
        if peer.next is not None:
            self._retire(peer.previous)
            peer.previous = peer.next
            peer.next = None
            self._retire(peer.current)
        else:
            self._retire(peer.previous)
            peer.previous = peer.current
        peer.current = kp
        peer.endpoint = addr
        mark_authentic(addr)
        peer.last_received = now
        peer.t_retransmit = None
        peer.handshake_attempts = 0
        peer.t_new_handshake = None
        self._session_derived(peer, now)
        self._persistent_traversal(peer, now)
        self._events.append(HandshakeCompleted(peer, initiator=True))
        if peer.staged:
            self._flush_staged(peer, now)
        else:
            self._send_keepalive(peer, now)  # confirms the session to the responder

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        msg = m.pull_cookie_reply(data)
        hs = self._handshakes.get(msg.receiver)
        owner: Peer | None
        if hs is not None:
            owner = hs.peer
        else:
            kp = self._keypairs.get(msg.receiver)
            owner = kp.peer if kp is not None else None
        if owner is None:
            self.drops["unknown_index"] += 1
            return
        if not owner.cookies.consume_reply(msg, now):
            self.drops["handshake"] += 1

    # --- input: packets to send -----------------------------------------------------

    def send(self, peer: Peer, packet: bytes, now: float) -> None:
        """Encrypt `packet` for `peer`, or stage it and start a handshake."""
        self.send_many(peer, [packet], now)

    def send_many(self, peer: Peer, packets: list[bytes], now: float) -> None:
        """send() for each of `packets` (say the segments of one super-packet), with the
        session checks and timers done once for the batch."""
        kp = peer.current
        if (
            kp is None
            or now - kp.created >= REJECT_AFTER_TIME
            or kp.send_counter + len(packets) > REJECT_AFTER_MESSAGES
        ):
            staged = peer.staged
            for packet in packets:
                if len(staged) >= MAX_STAGED_PACKETS:
                    staged.popleft()
                    self.drops["staged_overflow"] += 1
                staged.append(packet)
            self._initiate(peer, now)
            return
        self._encrypt(peer, kp, packets, now)
        # Timers: data sent.
        if peer.t_new_handshake is None:
            self._arm(
                peer,
                "t_new_handshake",
                now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter(),
            )
        if kp.initiator and (
            kp.send_counter > REKEY_AFTER_MESSAGES or now - kp.created > REKEY_AFTER_TIME
        ):
            self._initiate(peer, now)

    def send_keepalive(self, peer: Peer, now: float) -> None:
        """An empty transport message (or a handshake if there is no session)."""
        self._send_keepalive(peer, now)

    def initiate_handshake(self, peer: Peer, now: float) -> None:
        """Start a handshake now unless one was sent less than REKEY_TIMEOUT ago."""
        self._initiate(peer, now)

    def _encrypt(self, peer: Peer, kp: Keypair, packets: list[bytes], now: float) -> None:
        """Transport messages for `packets` (an empty one is a keepalive), in order."""
        endpoint = peer.endpoint
        if endpoint is None:
            self.drops["no_endpoint"] += len(packets)
            return
        encrypt = kp.send.encrypt
        append = self._datagrams.append
        mtu = self.mtu
        counter = kp.send_counter
        remote = kp.remote_index
        sent = 0
        data_packets = 0
        for packet in packets:
            n = len(packet)
            if n:
                data_packets += 1
            padded = (n + _PAD) & ~_PAD
            if mtu and padded > mtu:
                padded = max(mtu, n)
            if padded != n:
                packet = packet + bytes(padded - n)
            datagram = _pack_header(_TRANSPORT_TYPE, remote, counter) + encrypt(
                _pack_nonce(counter), packet, None
            )
            counter += 1
            sent += len(datagram)
            append((datagram, endpoint))
        kp.send_counter = counter
        peer.tx_bytes += sent
        peer.tx_packets += data_packets
        peer.t_send_keepalive = None  # any authenticated packet sent
        self._persistent_traversal(peer, now)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        kp = peer.current
        if kp is None or now - kp.created >= REJECT_AFTER_TIME:
            self._initiate(peer, now)
            return
        self._encrypt(peer, kp, [b""], now)

    def _flush_staged(self, peer: Peer, now: float) -> None:
        staged = peer.staged
        peer.staged = deque()
        self.send_many(peer, list(staged), now)

    def _send_raw(self, peer: Peer, datagram: bytes, now: float) -> None:
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        self._datagrams.append((datagram, peer.endpoint))
        peer.tx_bytes += len(datagram)
        peer.t_send_keepalive = None  # any authenticated packet sent
        self._persistent_traversal(peer, now)

    def _initiate(self, peer: Peer, now: float, *, retry: bool = False) -> None:
        if not retry:
            if (
                peer.last_initiation_sent is not None
                and now - peer.last_initiation_sent < REKEY_TIMEOUT
            ):
                return  # rate limit: one initiation per REKEY_TIMEOUT
            peer.handshake_attempts = 0
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
        local_index = self._new_index()
        timestamp = tai64n(now + self.wall_offset)
        msg, state = noise.create_initiation(
            self.public_key, peer.public_key, peer.static_static, local_index, timestamp
        )
        hs = Handshake(peer, local_index, state, now)
        peer.handshake = hs
        self._handshakes[local_index] = hs
        packed = peer.cookies.add_macs(m.push_initiation(msg), now)
        peer.last_initiation_sent = now
        self._send_raw(peer, packed, now)
        self._arm(peer, "t_retransmit", now + REKEY_TIMEOUT + self._jitter())

    # --- timers ------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Fire every expired timer of every peer."""
        for peer in list(self.peers.values()):
            if peer.t_retransmit is not None and peer.t_retransmit <= now:
                peer.t_retransmit = None
                if peer.handshake_attempts >= MAX_TIMER_HANDSHAKES:
                    peer.staged.clear()
                    if peer.handshake is not None:
                        self._handshakes.pop(peer.handshake.local_index, None)
                        peer.handshake = None
                    if peer.t_zero_keys is None:
                        peer.t_zero_keys = now + 3 * REJECT_AFTER_TIME
                    self._events.append(HandshakeTimedOut(peer))
                else:
                    peer.handshake_attempts += 1
                    self._initiate(peer, now, retry=True)
            if peer.t_new_handshake is not None and peer.t_new_handshake <= now:
                peer.t_new_handshake = None
                self._initiate(peer, now)
            if peer.t_send_keepalive is not None and peer.t_send_keepalive <= now:
                peer.t_send_keepalive = None
                self._send_keepalive(peer, now)
            if peer.t_persistent_keepalive is not None and peer.t_persistent_keepalive <= now:
                peer.t_persistent_keepalive = None
                self._send_keepalive(peer, now)
            if peer.t_zero_keys is not None and peer.t_zero_keys <= now:
                peer.t_zero_keys = None
                self._zero_keys(peer)
        self._recompute_deadline()

    def _arm(self, peer: Peer, name: str, deadline: float) -> None:
        setattr(peer, name, deadline)
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline

    def _recompute_deadline(self) -> None:
        best: float | None = None
        for peer in self.peers.values():
            for t in peer.timers():
                if t is not None and (best is None or t < best):
                    best = t
        self._deadline = best

    def _jitter(self) -> float:
        return self._rng.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)

    def _persistent_traversal(self, peer: Peer, now: float) -> None:
        if peer.persistent_keepalive > 0:
            self._arm(peer, "t_persistent_keepalive", now + peer.persistent_keepalive)

    def _session_derived(self, peer: Peer, now: float) -> None:
        peer.last_handshake = now
        peer.handshakes += 1
        self.handshakes_completed += 1
        self._arm(peer, "t_zero_keys", now + 3 * REJECT_AFTER_TIME)

    def _zero_keys(self, peer: Peer) -> None:
        for kp in (peer.current, peer.previous, peer.next):
            self._retire(kp)
        peer.current = peer.previous = peer.next = None
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
            peer.handshake = None

    def _retire(self, kp: Keypair | None) -> None:
        if kp is not None:
            self._keypairs.pop(kp.local_index, None)

    def _new_index(self) -> int:
        # Uniform over the indexes that name this worker (all of them with one worker):
        # an attacker learns nothing from ours but the worker it already steers to.
        while True:
            index = self.worker + self.workers * secrets.randbelow(self._index_slots)
            if index not in self._keypairs and index not in self._handshakes:
                return index


def overhead(packet_len: int) -> int:
    """Bytes a transport message adds to a packet of `packet_len` (before padding)."""
    return TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE + (-packet_len % PADDING_MULTIPLE)
