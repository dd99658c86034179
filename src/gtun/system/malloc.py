"""The C allocator's trimming, set for a packet-moving process.

Python hands objects over 512 bytes to the C library's malloc.  gtun builds and frees
many 64 KB buffers a second (GRO trains read from the UDP socket, coalesced
super-packets for the TUN).  With glibc's defaults, a free that leaves more than
M_TRIM_THRESHOLD (128 KB) at the top of the heap gives it back to the kernel (brk), and
the next allocation asks for it again: thousands of brk calls and fresh zeroed pages a
second, whether that happens depends on the heap's layout by chance.  Measured on the
benchmark machine: a relay in that state spent three times the kernel time and moved
about a fifth less over UDP.  Keeping up to TRIM_THRESHOLD of freed memory in the heap
ends the churn; the memory it may hold is bounded by that figure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gtun")

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Tuning knobs.
TRIM_THRESHOLD = 64 << 20  # freed heap memory kept for reuse instead of trimmed
MMAP_THRESHOLD = 1 << 20  # allocations from the heap up to this size (fixed, not adaptive)


def keep_heap() -> bool:
    """Set the allocator to keep freed memory (glibc's mallopt); False where there is
    no glibc or it refused, which only costs speed."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("mallopt refused: freed memory may be trimmed and asked for again")
    return done
