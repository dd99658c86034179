"""gtun.core.offload against the kernel's own TSO and GSO, on TUN devices in a namespace.

The pure tests compare with scapy; this one lets Linux judge: it must accept what
coalesce() and split() write (cutting them into the very segments they came from, with
checksums it finishes from the pseudo-header sums we left), and segment() must undo the
super-packets it reads.  The work happens in tests/offload_kernel.py, run in the
namespace.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gtun.lab.netns import Lab, python_env

SCRIPT = Path(__file__).resolve().parent / "offload_kernel.py"


@pytest.fixture
def lab_prefix() -> str:
    return "gto"


def test_kernel_agrees_with_offload(lab: Lab) -> None:
    ns = lab.add_ns("k")
    result = ns.run([sys.executable, str(SCRIPT)], env=python_env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(kv.split("=") for kv in result.stdout.split()[1:])
    assert result.stdout.startswith("OK")
    assert int(figures["coalesced"]) == 40 + 20 + 30 * 1300  # the last, IPv6
    assert int(figures["supers"]) > 0
