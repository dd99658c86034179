"""gtun.system.malloc: the allocator keeps freed memory instead of trimming it."""

from __future__ import annotations

import subprocess
import sys

from gtun.lab.netns import python_env
from gtun.system import malloc


def test_keep_heap_is_accepted_by_glibc() -> None:
    # Each gtun daemon calls it once at start; here in a child, not to change pytest's.
    code = "from gtun.system.malloc import keep_heap; print(keep_heap())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=python_env()
    )
    assert out.stdout.strip() == "True"


def test_no_brk_churn_when_64k_buffers_come_and_go() -> None:
    """Freeing a few 60 KB buffers gives the heap's top back to the kernel (brk) with
    glibc's defaults, every time; with keep_heap, at most a few times."""
    code = (
        "import ctypes, sys\n"
        "from gtun.system.malloc import keep_heap\n"
        "if sys.argv[1] == 'keep': keep_heap()\n"
        "libc = ctypes.CDLL(None); libc.sbrk.restype = ctypes.c_void_p\n"
        "trims = 0\n"
        "for i in range(500):\n"
        "    bufs = [b'x' * 60000 + bytes([i & 255, k]) for k in range(4)]\n"
        "    high = libc.sbrk(0)\n"
        "    del bufs\n"
        "    trims += libc.sbrk(0) != high\n"
        "print(trims)\n"
    )
    counts = {}
    for mode in ("keep", "default"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            capture_output=True,
            text=True,
            check=True,
            env=python_env(),
        )
        counts[mode] = int(out.stdout.strip())
    assert counts["keep"] <= 3 < counts["default"], counts
    assert malloc.TRIM_THRESHOLD >= 1 << 20
