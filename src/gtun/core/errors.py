"""The two kinds of protocol error (as h11's `_util.py`).

- `RemoteProtocolError`: the other end (a peer, a host on the network, the kernel handing
  us a header) sent something no correct implementation sends.  The receive paths catch
  it, drop the input and count it under `reason`: it never escapes a core.
- `LocalProtocolError`: our own code misused an API (a message too large to encode, a
  packet too large for a frame).  It is a bug of the caller, not of the peer.

Both are ValueErrors, so callers that only care that input was bad can catch that.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base of the protocol errors; `reason` is a drop counter's name (core/drops.py)."""

    reason = "malformed"

    def __init__(self, message: str = "", reason: str | None = None) -> None:
        super().__init__(message or (reason or self.reason))
        if reason is not None:
            self.reason = reason


class RemoteProtocolError(ProtocolError):
    """Remote input that no correct sender produces: drop it and count `reason`."""


class LocalProtocolError(ProtocolError):
    """The caller misused an API (a bug here, not the peer's fault)."""
