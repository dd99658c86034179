"""Events the core hands to its edge, drained with WireGuard.next_event()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gtun.core.wg.device import Peer


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(Event):
    """A handshake with `peer` completed.  As initiator the session is usable at once;
    as responder (initiator=False) it becomes usable for sending when the initiator's
    first transport message confirms it (packets sent before are staged)."""

    peer: Peer
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeTimedOut(Event):
    """No handshake answer from `peer` for REKEY_ATTEMPT_TIME; staged packets dropped."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class SessionUnconfirmed(Event):
    """`peer` initiated again before using the session we answered its last initiation
    with: our response was lost, or the peer could not authenticate it (with psk2, a
    wrong preshared key shows only so, on the responder's side)."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class SessionConfirmed(Event):
    """The session we answered `peer`'s initiation with was used by it: the first
    transport message under it arrived (so the initiation was not a replay).  Only
    from a device with `report_confirmed` set (a relay of several workers)."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class PacketReceived(Event):
    """A decrypted, authenticated, non-empty payload from `peer` (zero padding kept)."""

    peer: Peer
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerUnknown(Event):
    """A well-formed initiation from a key we do not know (after mac1 was valid)."""

    public_key: bytes
    addr: Any
