"""The sliding window against replayed transport counters (paper 5.4.6, RFC 6479).

Counters may arrive out of order (UDP reorders), so a counter is accepted when it is
newer than anything seen, or within REPLAY_WINDOW_SIZE of the newest and not yet seen.
The window is a Python int used as a bitmap: bit i set means counter (top - i) seen.
"""

from __future__ import annotations

from gtun.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE


class ReplayWindow:
    __slots__ = ("_top", "_bits", "_mask")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        self._top = -1
        self._bits = 0
        self._mask = (1 << size) - 1

    @property
    def size(self) -> int:
        return self._mask.bit_length()

    def would_accept(self, counter: int) -> bool:
        """True when `counter` is fresh; does not record it (check before decrypting)."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        if counter > self._top:
            return True
        back = self._top - counter
        if back > self._mask.bit_length() - 1:
            return False
        return not (self._bits >> back) & 1

    def accept(self, counter: int) -> bool:
        """Record `counter` (after the packet authenticated); False if it is a replay."""
        if not self.would_accept(counter):
            return False
        if counter > self._top:
            shift = min(counter - self._top, self._mask.bit_length())  # bound the big int
            self._bits = ((self._bits << shift) | 1) & self._mask
            self._top = counter
        else:
            self._bits |= 1 << (self._top - counter)
        return True
