"""A gtun client, sans-IO: one WireGuard peer (the relay) plus gtun's config push.

Theory of operation
-------------------
DISCONNECTED --handshake completes--> CONNECTED (asks for its configuration, repeating
the request every CONFIG_RETRY until a CONFIG arrives) --CONFIG--> the edge configures
the device.  While connected the client sends a PING every `ping_interval`; the relay
answers with a PONG.  Because a PING is data, WireGuard's own timer starts a new
handshake when no answer came for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT: that is how a
restarted relay (which has forgotten every session) is noticed and rejoined.  When the
relay has not been heard from for `dead_after`, the client reports it DISCONNECTED and
keeps trying; when WireGuard gives up a round of handshakes (REKEY_ATTEMPT_TIME), the
next round starts after a backoff that doubles up to MAX_BACKOFF.

The device mode is `mode` ("tun" or "tap") when the user chose one, which the
configuration request carries (a relay in the other mode refuses); with mode None the
client follows the relay's mode from the CONFIG.  In TAP mode the device carries
Ethernet frames, which travel wrapped in gtun's frame header (l2frame.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from gtun.core import bulk, l2frame
from gtun.core import tunnel as tm
from gtun.core.offload import OffloadError, VnetHdr
from gtun.core.packet import packet_length
from gtun.core.relay import PushedConfig, parse_pushed_config, tunnel_addresses
from gtun.core.wg import HandshakeCompleted, HandshakeTimedOut, WireGuard
from gtun.core.wg.events import Event

CONFIG_RETRY = 2.0
PING_INTERVAL = 10.0
FIRST_BACKOFF = 2.0
MAX_BACKOFF = 60.0

CLIENT_DROP_REASONS = (
    "not_configured",
    "not_ip",
    "link_scoped",
    "malformed",
    "queue_full",
    "not_frame",  # TAP mode: an IP packet from the relay, where frames are expected
    "runt",  # TAP mode: frame shorter than an Ethernet header
    "oversized",  # TAP mode: frame longer than the MTU allows
    "bad_bulk",  # a bulk frame (bulk.py) whose header does not describe its packet
    "bad_gso",  # a super-packet from the TUN that cannot be cut into packets
)


@dataclass
class RelayPeer:
    """`Peer.data` of the relay, as bulk.send_super() reads it."""

    bulk: bool = False  # the relay takes bulk frames (its configuration said so)
    partial: bool = False  # partial TCP checksums both ways (its configuration said so)


@dataclass(frozen=True, slots=True)
class Connected(Event):
    pass


@dataclass(frozen=True, slots=True)
class Disconnected(Event):
    silent_for: float


@dataclass(frozen=True, slots=True)
class ConfigReceived(Event):
    config: PushedConfig
    changed: bool


@dataclass(frozen=True, slots=True)
class Refused(Event):
    reason: str


@dataclass(frozen=True, slots=True)
class GaveUpRound(Event):
    """A round of handshakes went unanswered; the next starts after `retry_in`."""

    retry_in: float


class ClientCore:
    def __init__(
        self,
        private_key: bytes,
        server_public_key: bytes,
        endpoint: Hashable | None,
        *,
        mode: str | None = "tun",
        wall_offset: float = 0.0,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self.wg = WireGuard(private_key, wall_offset=wall_offset)
        self.wg.on_packet = self._on_packet  # the data fast lane
        self.relay = RelayPeer()
        # Whether this client completes TCP checksums the relay leaves partial (its
        # device does, or the edge finishes them): the edge sets it before start().
        self.accept_partial = False
        self.server = self.wg.add_peer(server_public_key, endpoint=endpoint, data=self.relay)
        self.mode = mode
        self.ping_interval = ping_interval
        self.dead_after = 2 * ping_interval + 5.0
        self.config: PushedConfig | None = None
        self.connected = False
        self.drops: dict[str, int] = dict.fromkeys(CLIENT_DROP_REASONS, 0)
        self._events: deque[Event] = deque()
        self._tun_out: list[bytes | tuple[VnetHdr, bytes]] = []
        self._t_config: float | None = None
        self._t_ping: float | None = None
        self._t_retry: float | None = None
        self._backoff = FIRST_BACKOFF
        self._config_confirmed = False

    # --- outputs -------------------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def tun_writes(self) -> list[bytes | tuple[VnetHdr, bytes]]:
        """Packets for the TUN: plain ones, and (header, super-packet) pairs."""
        out = self._tun_out
        self._tun_out = []
        return out

    def datagrams_to_send(self) -> list[tuple[bytes, object]]:
        return self.wg.datagrams_to_send()

    def get_timer(self) -> float | None:
        times = [
            t
            for t in (self.wg.get_timer(), self._t_config, self._t_ping, self._t_retry)
            if t is not None
        ]
        return min(times) if times else None

    # --- inputs --------------------------------------------------------------------

    @property
    def device_mode(self) -> str | None:
        """The device's mode, "tun" or "tap": the user's choice, else the relay's (None
        until the relay has said)."""
        if self.mode is not None:
            return self.mode
        return self.config.mode if self.config is not None else None

    def set_endpoint(self, endpoint: Hashable) -> None:
        self.server.endpoint = endpoint

    def start(self, now: float) -> None:
        self.wg.initiate_handshake(self.server, now)
        self._drain(now)

    def receive_datagram(self, data: bytes, addr: Hashable, now: float) -> None:
        self.wg.receive_datagram(data, addr, now)
        self._drain(now)

    def tun_packet(self, packet: bytes, now: float) -> None:
        if self.config is None:
            self.drops["not_configured"] += 1
            return
        if self.device_mode == "tap":
            if len(packet) < l2frame.ETH_HEADER_LEN:
                self.drops["runt"] += 1
            elif len(packet) > l2frame.max_frame_for(self.config.mtu):
                self.drops["oversized"] += 1
            else:
                self.wg.send(self.server, l2frame.push_frame(packet), now)
                self._drain(now)
            return
        if tunnel_addresses(packet, self.drops) is None:
            return
        self.wg.send(self.server, packet, now)
        self._drain(now)

    def tun_super(self, hdr: VnetHdr, packet: bytes, now: float) -> None:
        """A TCP super-packet (or a packet whose checksum is ours to finish) from an
        offloading TUN (never a TAP device)."""
        if self.config is None:
            self.drops["not_configured"] += 1
            return
        if tunnel_addresses(packet, self.drops) is None:
            return
        try:
            bulk.send_super(self.wg, self.server, hdr, packet, now)
        except OffloadError:
            self.drops["bad_gso"] += 1
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        self.wg.handle_timer(now)
        if self._t_config is not None and self._t_config <= now:
            self._t_config = None
            if not self._config_confirmed and self.connected:
                self._request_config(now)
        if self._t_ping is not None and self._t_ping <= now:
            self._t_ping = now + self.ping_interval
            last = self.server.last_received
            if self.connected and last is not None and now - last > self.dead_after:
                self.connected = False
                self._config_confirmed = False
                self._events.append(Disconnected(now - last))
            self.wg.send(self.server, tm.push_message(tm.PING), now)
        if self._t_retry is not None and self._t_retry <= now:
            self._t_retry = None
            self.wg.initiate_handshake(self.server, now)
        self._drain(now)

    # --- internals -----------------------------------------------------------------

    def _request_config(self, now: float) -> None:
        request: dict[str, object] = {"bulk": True}  # this client takes bulk frames
        if self.accept_partial:  # and completes TCP checksums the relay leaves partial
            request["csum"] = "partial"
        if self.mode is not None:
            request["mode"] = self.mode
        self.wg.send(self.server, tm.push_message(tm.CONFIG_REQUEST, request), now)
        self._t_config = now + CONFIG_RETRY

    def _drain(self, now: float) -> None:
        while (event := self.wg.next_event()) is not None:
            # Data never comes as an event: the fast lane (on_packet) delivers it.
            if isinstance(event, HandshakeCompleted):
                self._backoff = FIRST_BACKOFF
                self._t_retry = None
                if not self.connected:
                    self.connected = True
                    self._events.append(Connected())
                # Ask after every new session: the relay may have restarted or changed.
                self._config_confirmed = False
                self._request_config(now)
                if self._t_ping is None:
                    self._t_ping = now + self.ping_interval
            elif isinstance(event, HandshakeTimedOut):
                self._t_retry = now + self._backoff
                self._events.append(GaveUpRound(self._backoff))
                self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _on_packet(self, peer: object, plaintext: bytes, now: float) -> None:
        self._from_relay(plaintext, now)

    def _from_relay(self, plaintext: bytes, now: float) -> None:
        # An IP packet first: the per-packet path (padding trimmed).
        version = plaintext[0] >> 4
        if version == 4 or version == 6:
            if self.device_mode == "tap":
                self.drops["not_frame"] += 1
                return
            length = packet_length(plaintext)
            if length is None:
                self.drops["not_ip"] += 1
            else:
                self._tun_out.append(plaintext if length == len(plaintext) else plaintext[:length])
            return
        if l2frame.is_frame(plaintext):
            if self.config is None or self.device_mode != "tap":
                self.drops["malformed"] += 1
                return
            try:
                frame = l2frame.pull_frame(plaintext, l2frame.max_frame_for(self.config.mtu))
            except l2frame.L2FrameError as exc:
                self.drops[exc.reason] += 1
                return
            self._tun_out.append(frame)
            return
        if plaintext[0] == 0:
            if bulk.is_bulk(plaintext):
                self._bulk_from_relay(plaintext)
                return
            try:
                msg = tm.pull_message(plaintext)
            except tm.TunnelMessageError:
                self.drops["malformed"] += 1
                return
            if msg.type == tm.CONFIG:
                try:
                    config = parse_pushed_config(msg.payload)
                except ValueError:
                    self.drops["malformed"] += 1
                    return
                if self.mode is not None and config.mode != self.mode:
                    # A relay that does not check the requested mode.
                    reason = (
                        f"this relay runs in {config.mode} mode; the client asked for {self.mode}"
                    )
                    self._events.append(Refused(reason))
                    return
                self._config_confirmed = True
                self._t_config = None
                changed = config != self.config
                self.config = config
                self.relay.bulk = config.bulk
                # Pad no further than the MTU, as WireGuard does: the relay then gets
                # packets it need not trim.
                self.wg.mtu = config.mtu
                self.relay.partial = config.partial and self.accept_partial
                self._events.append(ConfigReceived(config, changed))
            elif msg.type == tm.REFUSED:
                self._events.append(Refused(str(msg.payload.get("reason", "refused"))))
            elif msg.type != tm.PONG:
                self.drops["malformed"] += 1
            return
        if self.device_mode == "tap":
            self.drops["not_frame"] += 1
            return
        self.drops["not_ip"] += 1  # neither IP nor a gtun message

    def _bulk_from_relay(self, plaintext: bytes) -> None:
        if self.config is None or self.device_mode == "tap":
            self.drops["malformed"] += 1
            return
        try:
            self._tun_out.append(bulk.pull_bulk(plaintext))
        except (bulk.BulkError, OffloadError):
            self.drops["bad_bulk"] += 1
