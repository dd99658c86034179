"""What a relay says about its clients' events (joined, refused, unknown keys, unused
sessions), once and in proportion: shared by the relay and its worker processes
(app/workers.py), each of which logs the events of the sessions it holds."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gtun.app.keys import encode_key
from gtun.core.relay import PeerJoined, PeerRefused
from gtun.core.wg import HandshakeCompleted, HandshakeTimedOut, PeerUnknown, SessionUnconfirmed
from gtun.core.wg.events import Event
from gtun.io.transport import endpoint_text

log = logging.getLogger("gtun.app.server")

JOINED_AGAIN_AFTER = 600.0  # seconds before the same client joining from the same place is news
UNCONFIRMED_SAID_EVERY = 60.0  # seconds between warnings of one peer's unused sessions
UNCONFIRMED_KEPT = 4096  # peers remembered for that; past it the memory starts afresh
UNKNOWN_KEYS_INTERVAL = 10.0  # seconds between reports of handshakes from unknown keys


class UnknownKeys:
    """Reports handshakes from keys that are no peer of this relay without a log line
    each: the first after a quiet interval at once (so a user who just tried a key sees
    it), the rest as one summary per `interval`.  note() and flush() return the line to
    log, or None; the caller calls flush() when `due` has passed."""

    def __init__(self, interval: float = UNKNOWN_KEYS_INTERVAL) -> None:
        self.interval = interval
        self.total = 0  # since start
        self.pending = 0  # not yet reported
        self.last: tuple[bytes, str] | None = None  # the latest key and address
        self.logged_at: float | None = None
        self.due: float | None = None  # when the pending ones are to be reported

    def note(self, key: bytes, addr: str, now: float) -> str | None:
        self.total += 1
        self.last = (key, addr)
        if self.logged_at is None or now - self.logged_at >= self.interval:
            self.logged_at = now
            self.due = None
            return (
                f"handshake from unknown key {encode_key(key)} at {addr}: not a peer of this relay"
            )
        self.pending += 1
        if self.due is None:
            self.due = self.logged_at + self.interval
        return None

    def flush(self, now: float) -> str | None:
        if not self.pending or self.last is None:
            self.due = None
            return None
        key, addr = self.last
        line = (
            f"{self.pending} more handshakes from unknown keys in the last "
            f"{now - (self.logged_at or now):.0f} s, the last from {addr} key {encode_key(key)}"
        )
        self.pending = 0
        self.logged_at = now
        self.due = None
        return line


class RelayEvents:
    """Logs the events of client peers (not mesh relays: the daemon's own)."""

    def __init__(self) -> None:
        # Per peer key: where and when "joined" was last said at INFO (bounded by the peers).
        self._joined: dict[bytes, tuple[str | None, float]] = {}
        self._unconfirmed: dict[bytes, float] = {}  # peer key -> when last said
        self.unknown_keys = UnknownKeys()
        self._unknown_timer: asyncio.TimerHandle | None = None

    def on_event(self, event: Event) -> None:
        if isinstance(event, HandshakeCompleted):
            spec = event.peer.data.spec
            log.debug(
                "handshake with %s (%s) from %s",
                spec.name,
                spec.address,
                endpoint_text(event.peer.endpoint),
            )
        elif isinstance(event, PeerJoined):
            # A client asks again after every new session (every two minutes), and a
            # hostile one as often as it likes: said at INFO only when it is news.
            spec = event.peer.data.spec
            where = endpoint_text(event.peer.endpoint)
            now = time.monotonic()
            said = self._joined.get(event.peer.public_key)
            news = said is None or said[0] != where or now - said[1] >= JOINED_AGAIN_AFTER
            if news:
                self._joined[event.peer.public_key] = (where, now)
            log.log(
                logging.INFO if news else logging.DEBUG,
                "client %s joined from %s as %s",
                spec.name,
                where,
                spec.address,
            )
        elif isinstance(event, PeerRefused):
            spec = event.peer.data.spec
            log.warning(
                "refused peer %s (%s) from %s: %s",
                spec.name,
                spec.address,
                endpoint_text(event.peer.endpoint),
                event.reason,
            )
        elif isinstance(event, PeerUnknown):
            self._unknown_key(event)
        elif isinstance(event, HandshakeTimedOut):
            log.debug("peer %s stopped answering", event.peer.data.spec.name)
        elif isinstance(event, SessionUnconfirmed):
            self._session_unconfirmed(event.peer)

    def _session_unconfirmed(self, peer: Any) -> None:
        """A peer that initiates again and again without using our answers: its
        preshared key is likely wrong (or the answers are lost).  Said at most once a
        minute per peer; counted as `unconfirmed` always."""
        now = time.monotonic()
        said = self._unconfirmed.get(peer.public_key)
        if said is not None and now - said < UNCONFIRMED_SAID_EVERY:
            return
        if len(self._unconfirmed) >= UNCONFIRMED_KEPT:
            self._unconfirmed.clear()  # bounded: a flood of keys only repeats lines
        self._unconfirmed[peer.public_key] = now
        log.warning(
            "peer %s (%s) at %s initiated again without using the session answered: a wrong "
            "preshared key (PresharedKey), or the answers are lost on the way",
            peer.data.spec.name,
            peer.data.spec.address,
            endpoint_text(peer.endpoint),
        )

    def _unknown_key(self, event: PeerUnknown) -> None:
        loop = asyncio.get_running_loop()
        unknown = self.unknown_keys
        line = unknown.note(event.public_key, endpoint_text(event.addr) or "?", loop.time())
        if line is not None:
            log.warning("%s", line)
        elif unknown.due is not None and self._unknown_timer is None:
            self._unknown_timer = loop.call_at(unknown.due, self._flush_unknown_keys)

    def _flush_unknown_keys(self) -> None:
        self._unknown_timer = None
        line = self.unknown_keys.flush(asyncio.get_running_loop().time())
        if line is not None:
            log.warning("%s", line)

    def close(self) -> None:
        """Cancel the pending report of unknown keys."""
        if self._unknown_timer is not None:
            self._unknown_timer.cancel()
            self._unknown_timer = None
