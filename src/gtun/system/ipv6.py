"""IPv6 inside the tunnel: who gets which address of `network6`, and the device switch.

Assignment
----------
Every IPv4 address of the virtual network has a twin in `network6` with the same host
number: the relay, the first host of `network` (10.66.0.1), is also the first host of
`network6` (fd66::1); the peer leased 10.66.0.7 is also fd66::7.  The IPv4 lease is
already stable (kept per public key in the state store, or fixed by the config's
`address`), so the IPv6 address is stable too, across restarts of either end, with no
second lease table to keep in step.  The cost is that `network6` must hold at least as
many addresses as `network`, which any /64 does (config.py checks it).

`enable_ipv6` clears a device's `disable_ipv6` switch (for a distribution or a parent
namespace that turns IPv6 off by default), so that IPv6 addresses can be added to it.
It acts on the calling process's network namespace and on that one device only.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from gtun.errors import RuntimeFailure

__all__ = ["address6_for", "enable_ipv6", "eui64_link_local", "fits"]


def fits(network: IPv4Network, network6: IPv6Network) -> bool:
    """Whether every host number of `network` exists in `network6`."""
    return network6.num_addresses >= network.num_addresses


def address6_for(network: IPv4Network, network6: IPv6Network, address: IPv4Address) -> IPv6Address:
    """The twin of `address` (a host of `network`) in `network6`: the same host number.

    Raises ValueError when `address` is outside `network` or `network6` is too small.
    """
    if address not in network:
        raise ValueError(f"address {address} is outside network {network}")
    if not fits(network, network6):
        raise ValueError(f"network6 {network6} has fewer addresses than network {network}")
    host = int(address) - int(network.network_address)
    return network6.network_address + host


def enable_ipv6(device: str, proc_sys: Path = Path("/proc/sys")) -> bool:
    """Let `device` carry IPv6: write 0 to its disable_ipv6 if it holds 1.

    Returns whether it changed anything.  The setting lives and dies with the device,
    which gtun creates and removes, so there is nothing to restore.  Raises
    RuntimeFailure naming the file when the kernel has no IPv6 or refuses.
    """
    path = proc_sys / "net/ipv6/conf" / device / "disable_ipv6"
    try:
        if path.read_text().strip() == "0":
            return False
        path.write_text("0\n")
    except FileNotFoundError as exc:
        raise RuntimeFailure(
            f"cannot enable IPv6 on {device}: {path} does not exist (is IPv6 off in the kernel?)"
        ) from exc
    except OSError as exc:
        raise RuntimeFailure(f"cannot enable IPv6 on {device}: {path}: {exc.strerror}") from exc
    return True


def eui64_link_local(device: str, proc_sys: Path = Path("/proc/sys")) -> bool:
    """Have `device` form its IPv6 link-local address from its MAC (EUI-64,
    addr_gen_mode 0), before it is brought up.  In TAP mode the relay pins each peer to
    the link-local address its key's MAC gives (forward.py), so a host whose default is
    stable-privacy addresses must not pick another.  False (and nothing done) where the
    kernel has no IPv6 or no such setting: the device then has no link-local address at
    all.  Acts on that one device only, which lives and dies with gtun."""
    path = proc_sys / "net/ipv6/conf" / device / "addr_gen_mode"
    try:
        if path.read_text().strip() == "0":
            return False
        path.write_text("0\n")
    except OSError:
        return False
    return True
