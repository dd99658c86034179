"""gtun: a VPN relay and clients speaking the WireGuard protocol."""

from gtun import native as _native

__version__ = "0.1.0"

# Before any other gtun module is imported: compiled modules (mypyc) or their .py files.
if _native.pure_requested() or _native.stale():
    _native.force_pure()
