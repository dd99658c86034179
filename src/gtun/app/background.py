"""Heavy work beside the event loop: parsing a config of 10,000 peers, reading their
leases, encoding a status or a metrics scrape.

A worker thread keeps such work off the event loop, but not off the GIL: by default a
thread that computes holds it for 5 ms at a time, and the loop, which gives the GIL up
at every system call (several per forwarded packet), waits up to that long each time it
wants it back, so its packets queue up.  While work runs here the switch interval is
shorter, so the loop gets the GIL back within WORK_SWITCH_INTERVAL instead.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Tuning knob: how long a worker may hold the GIL while the loop waits (seconds).
WORK_SWITCH_INTERVAL = 0.0005

_lock = threading.Lock()
_running = 0
_saved = 0.0


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a worker thread, with the short switch interval while any runs.
    Raises what fn raises."""
    global _running, _saved
    with _lock:
        if _running == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved, WORK_SWITCH_INTERVAL))
        _running += 1
    try:
        return await asyncio.to_thread(fn, *args)
    finally:
        with _lock:
            _running -= 1
            if _running == 0:
                sys.setswitchinterval(_saved)
