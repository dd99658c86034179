"""The sliding window against replayed transport counters (paper 5.4.6, RFC 6479).

Counters may arrive out of order (UDP reorders), so a counter is accepted when it is
newer than anything seen, or within REPLAY_WINDOW_SIZE of the newest and not yet seen.
The window is a ring of 64-bit blocks, as in RFC 6479 and wireguard-go.
"""

from __future__ import annotations

from gtun.core.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE


class ReplayWindow:
    """A ring of 64-bit blocks (RFC 6479): a new highest counter clears only the blocks
    it moves past, so the common case (the next counter) is a few small-int operations
    rather than shifting a window-sized bitmap."""

    __slots__ = ("_top", "_ring", "_mask", "size")

    def __init__(self, size: int = REPLAY_WINDOW_SIZE) -> None:
        blocks = 1
        while blocks < -(-size // 64) + 1:  # the window plus the block being filled
            blocks <<= 1
        self._ring = [0] * blocks
        self._mask = blocks - 1
        self._top = -1
        self.size = size

    def would_accept(self, counter: int) -> bool:
        """True when `counter` is fresh; does not record it (check before decrypting)."""
        top = self._top
        if counter > top:
            return counter < REJECT_AFTER_MESSAGES
        if top - counter >= self.size:
            return False
        return not (self._ring[(counter >> 6) & self._mask] >> (counter & 63)) & 1

    def accept(self, counter: int) -> bool:
        """Record `counter` (after the packet authenticated); False if it is a replay."""
        top = self._top
        ring = self._ring
        mask = self._mask
        if counter > top:  # the common case: the next counter
            if counter >= REJECT_AFTER_MESSAGES:
                return False
            block = counter >> 6
            old = top >> 6
            if block != old:
                if block - old > mask:
                    for i in range(mask + 1):
                        ring[i] = 0
                else:
                    for b in range(old + 1, block + 1):
                        ring[b & mask] = 0
            ring[block & mask] |= 1 << (counter & 63)
            self._top = counter
            return True
        if top - counter >= self.size:
            return False
        i = (counter >> 6) & mask
        bit = 1 << (counter & 63)
        if ring[i] & bit:
            return False
        ring[i] |= bit
        return True
