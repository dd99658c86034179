"""gtun: a VPN relay and clients speaking the WireGuard protocol."""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("GTUN_PURE", "") not in ("", "0"):  # native.PURE_ENV, read once here
    from gtun import native as _native

    _native.force_pure()
