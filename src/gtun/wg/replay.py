"""The sliding window against replayed transport counters (paper 5.4.6, RFC 6479).

Counters may arrive out of order (UDP reorders), so a counter is accepted when it is
newer than anything seen, or within REPLAY_WINDOW_SIZE of the newest and not yet seen.
The window is a Python int used as a bitmap: bit i set means counter (top - i) seen.
"""

from __future__ import annotations

from gtun.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE


class ReplayWindow:
    __slots__ = ("_top", "_bits", "_mask", "size")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        self._top = -1
        self._bits = 0
        self._mask = (1 << size) - 1
        self.size = size

    def would_accept(self, counter: int) -> bool:
        """True when `counter` is fresh; does not record it (check before decrypting)."""
        if counter > self._top:
            return counter < REJECT_AFTER_MESSAGES
        back = self._top - counter
        return back < self.size and not (self._bits >> back) & 1

    def accept(self, counter: int) -> bool:
        """Record `counter` (after the packet authenticated); False if it is a replay."""
        top = self._top
        if counter > top:  # the common case: the next counter
            if counter >= REJECT_AFTER_MESSAGES:
                return False
            shift = counter - top
            if shift >= self.size:
                self._bits = 1
            else:
                self._bits = ((self._bits << shift) | 1) & self._mask
            self._top = counter
            return True
        back = top - counter
        if back >= self.size:
            return False
        bit = 1 << back
        if self._bits & bit:
            return False
        self._bits |= bit
        return True
