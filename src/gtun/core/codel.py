"""CoDel: a drop controller for a queue whose packets' waiting time is known.

Theory of operation (RFC 8289, "Controlled Delay Active Queue Management").  A queue that
absorbs a burst and drains is good; a queue that stands -- every packet waits, for as
long as a whole interval -- is only delay, built by a sender (TCP cubic, say) that keeps
sending until it sees a loss.  CoDel watches the sojourn time of the packets as they
leave the queue:
- while the sojourn stays under `target`, or went over it less than `interval` ago,
  nothing happens (bursts pass untouched);
- once it has stayed over `target` for a whole `interval`, one packet is dropped and the
  controller enters the dropping state, where it drops again every
  interval / sqrt(count): a sender that does not slow down meets losses that come faster
  and faster, one that does sees the sojourn fall under target, which ends the state;
- entering the state again soon after leaving it (within 16 intervals) resumes from
  about the count it left with, so the rate that was needed is found again at once.

The class does no I/O and never reads a clock: the caller passes the sojourn of the
packet at the head of its queue and the time now (seconds, any monotonic clock), and
drops the packet when told to (or marks it Congestion Experienced).
"""

from __future__ import annotations

from math import sqrt

# -- tuning knobs (RFC 8289 section 4.2-4.3 suggests 5 ms and 100 ms for the Internet) ---
# A gtun edge's own queue drains in well under a millisecond when nothing stands in it,
# so a lower target than the RFC's keeps a standing queue short without cutting bursts.
TARGET = 0.002  # seconds of sojourn that are fine
INTERVAL = 0.100  # seconds the sojourn must stay above target before a drop (a worst RTT)


class CoDel:
    """One queue's CoDel state.  `target` and `interval` in seconds; raises ValueError
    (local) unless 0 < target < interval."""

    __slots__ = (
        "target",
        "interval",
        "first_above",
        "dropping",
        "drop_next",
        "count",
        "last_count",
        "drops",
    )

    def __init__(self, target: float = TARGET, interval: float = INTERVAL) -> None:
        if not 0 < target < interval:
            raise ValueError(f"CoDel needs 0 < target < interval, not {target} and {interval}")
        self.target = target
        self.interval = interval
        self.first_above = 0.0  # when the sojourn will have been above target an interval
        self.dropping = False
        self.drop_next = 0.0  # in the dropping state: when the next drop is due
        self.count = 0  # drops since entering the dropping state (with the carry-over)
        self.last_count = 0  # count when the dropping state was last entered
        self.drops = 0  # every drop this controller asked for

    def _control_law(self, t: float) -> float:
        return t + self.interval / sqrt(self.count)

    def should_drop(self, sojourn: float, now: float) -> bool:
        """Whether to drop (or mark) the packet leaving the queue now, which waited
        `sojourn` seconds.  Call it for packets as they leave, in order; the caller may
        call it for some packets only (one per batch), the law is in time, not packets."""
        # Above target for a whole interval (RFC 8289 dodequeue's ok_to_drop).
        if sojourn < self.target:
            self.first_above = 0.0
            ok_to_drop = False
        elif self.first_above == 0.0:
            self.first_above = now + self.interval
            ok_to_drop = False
        else:
            ok_to_drop = now >= self.first_above
        if self.dropping:
            if not ok_to_drop:
                self.dropping = False  # the queue is short again
                return False
            if now >= self.drop_next:
                self.count += 1
                self.drop_next = self._control_law(self.drop_next)
                self.drops += 1
                return True
            return False
        if not ok_to_drop:
            return False
        # Enter the dropping state with one drop.  Resume near the last rate if the state
        # was left only recently (RFC 8289 section 5.5's count carry-over).
        self.dropping = True
        delta = self.count - self.last_count
        if delta > 1 and now - self.drop_next < 16 * self.interval:
            self.count = delta
        else:
            self.count = 1
        self.last_count = self.count
        self.drop_next = self._control_law(now)
        self.drops += 1
        return True
