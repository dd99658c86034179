"""gtun: a VPN relay and clients speaking the WireGuard protocol."""

__version__ = "0.1.0"
