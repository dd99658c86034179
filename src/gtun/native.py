"""Which of gtun's modules may be compiled with mypyc, and the switch back to pure Python.

The per-packet modules (MYPYC_MODULES) are strictly typed, so mypyc can compile them to
C extension modules (scripts/build-native, run by scripts/setup) that sit beside their
.py files in the source tree; Python's import system then prefers the extension.  The
.py files stay the reference: with GTUN_PURE=1 in the environment, gtun/__init__.py
calls force_pure() before any other gtun module is imported, and every gtun module is
loaded from its .py file.  The test suite runs the core's tests both ways.

A compiled module older than its .py file (edited, or another branch checked out since
the build) would run old code: then every gtun module is loaded from its .py file too,
until scripts/build-native runs again (tests/test_native.py fails meanwhile).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# The hot path of a packet over UDP, compiled by scripts/build-native (one list, read by
# that script too).  A compiled class takes no new attributes and its methods cannot be
# patched, and arguments are checked against their annotations: keep these modules so.
# Not here yet: relay.py and client.py (mypyc 2.4 fails on the events' dataclasses,
# which name device.Peer while device.py imports them); the relay's per-datagram loop
# lives in forward.py (receive_all) for that reason.
MYPYC_MODULES = (
    "gtun.core.offload",
    "gtun.core.packet",
    "gtun.core.bulk",
    "gtun.core.wg.replay",
    "gtun.core.wg.device",
    "gtun.core.forward",
    "gtun.io.udp",
    "gtun.io.driver",
)
# The name of their shared library, gtun/_compiled__mypyc*.so (inside the package).
MYPYC_GROUP = "gtun._compiled"

PURE_ENV = "GTUN_PURE"


def pure_requested() -> bool:
    """Whether the environment asks for the pure-Python modules (GTUN_PURE=1)."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


class _PureFinder:
    """A meta path finder that finds gtun's modules as source files only, so that a
    compiled extension beside a .py file is never chosen."""

    _loaders = [(importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)]

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith("gtun.") or path is None:
            return None
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, *self._loaders).find_spec(name)
            if spec is not None:
                return spec
        return None


def force_pure() -> None:
    """Load gtun's modules from their .py files from now on (idempotent)."""
    if not any(isinstance(f, _PureFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PureFinder())


def stale() -> bool:
    """Whether some compiled module is older than its .py file."""
    package = os.path.dirname(os.path.abspath(__file__))
    for name in MYPYC_MODULES:
        base = os.path.join(package, *name.split(".")[1:])
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            try:
                if os.stat(base + ".py").st_mtime > os.stat(base + suffix).st_mtime:
                    return True
            except OSError:
                continue
    return False


def is_compiled(module: ModuleType) -> bool:
    """Whether `module` was loaded from a compiled extension."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def compiled() -> list[str]:
    """The modules of MYPYC_MODULES that are in use compiled (importing them)."""
    return [name for name in MYPYC_MODULES if is_compiled(importlib.import_module(name))]
