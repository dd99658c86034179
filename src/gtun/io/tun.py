"""The TUN/TAP device edge.

Everything above this module sees a `PacketDevice`: a non-blocking file descriptor
that an event loop can watch (`loop.add_reader(dev.fileno(), ...)`), `read()` that
returns one packet or None when there is nothing to read, and `write()` that reports
a packet the kernel would not take as False so the caller can count a drop.
`gtun.testing.tun.FakeTun` implements the same interface over a socketpair for tests.

Offloads.  A TUN device opened with `offload=True` asks the kernel for IFF_VNET_HDR
and TUNSETOFFLOAD(CSUM, TSO4, TSO6): every read and write then starts with a
virtio-net header (offload.py), and the kernel hands over whole TCP super-packets of up
to 64 KB with the checksum left to us, and takes such super-packets back (one write
instead of dozens).  `read_super()` / `write_super()` carry (header, packet) pairs;
`read()` / `write()` keep working on single packets.  When the kernel refuses the
offloads (an old kernel, or a TAP device, which gtun opens without them), the device is
opened plainly and `offload_error` says why; `write_super()` then segments a
super-packet into packets itself, so callers need not care.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from typing import Protocol

from gtun.core.offload import (
    GSO_HDR_LEN,
    PLAIN,
    Gso,
    OffloadError,
    pull_gso,
    push_gso,
    segment,
)
from gtun.errors import RuntimeFailure

# From <linux/if_tun.h> and <linux/if.h>.
log = logging.getLogger("gtun")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16

TUN_PATH = "/dev/net/tun"

# Tuning knob: the largest packet read in one call (the largest IP packet).
MAX_PACKET = 65535
_PLAIN_HDR = bytes(GSO_HDR_LEN)

# A write failing with one of these concerns that one packet only (the device is down,
# the packet is malformed or too big, buffers are full): the caller drops it.
PACKET_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EINVAL,
        errno.EIO,
        errno.EMSGSIZE,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.EFAULT,
        errno.EPIPE,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
    }
)


class PacketDevice(Protocol):
    """A packet device: a TUN (IP packets) or TAP (Ethernet frames), or a fake."""

    @property
    def name(self) -> str: ...

    def fileno(self) -> int: ...

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting.  Raises RuntimeFailure."""
        ...

    def write(self, packet: bytes) -> bool:
        """Hand one packet to the kernel; False if it was dropped."""
        ...

    def read_super(self) -> tuple[Gso, bytes] | None:
        """One packet or TCP super-packet with its offload header (PLAIN for a packet),
        or None when none is waiting.  Raises RuntimeFailure (device) or OffloadError
        (an impossible header from the kernel)."""
        ...

    def write_super(self, hdr: Gso, packet: bytes) -> int:
        """Hand a packet or super-packet to the kernel; the number of packets dropped."""
        ...

    def close(self) -> None: ...


def _check_name(name: str) -> None:
    # The kernel's dev_valid_name(), checked here so the user gets a clear line.
    # An empty name or one with "%d" lets the kernel pick (e.g. "tun%d" -> "tun0").
    problem = None
    if len(name.encode()) >= IFNAMSIZ:
        problem = f"longer than {IFNAMSIZ - 1} characters"
    elif name in (".", ".."):
        problem = "reserved name"
    elif any(c in "/:" or c.isspace() or not c.isprintable() for c in name):
        problem = "contains '/', ':', whitespace or a control character"
    if problem:
        raise RuntimeFailure(f"invalid device name {name!r}: {problem}")


class TunDevice:
    """An open TUN or TAP device (non-blocking, without packet information header).

    With `vnet` (offloads granted) every read and write carries a virtio-net header."""

    def __init__(
        self, fd: int, name: str, tap: bool, *, vnet: bool = False, offload_error: str = ""
    ) -> None:
        self._fd = fd
        self._name = name
        self.tap = tap
        self.vnet = vnet
        self.offload_error = offload_error  # why offloads were asked for and not granted

    @property
    def name(self) -> str:
        """The device name the kernel gave (a "%d" in the requested name is filled in)."""
        return self._name

    def fileno(self) -> int:
        return self._fd

    def _read(self) -> bytes | None:
        try:
            return os.read(self._fd, MAX_PACKET + GSO_HDR_LEN)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise RuntimeFailure(f"cannot read from {self._name}: {exc.strerror}") from exc

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting.  On an offloading device it may be
        a TCP super-packet: use read_super() there.

        Raises RuntimeFailure if the device itself fails (closed, gone).
        """
        data = self._read()
        if data is None or not self.vnet:
            return data
        return data[GSO_HDR_LEN:]

    def read_super(self) -> tuple[Gso, bytes] | None:
        data = self._read()
        if data is None:
            return None
        if not self.vnet:
            return PLAIN, data
        return pull_gso(data), data[GSO_HDR_LEN:]

    def _writev(self, parts: list[bytes]) -> bool:
        try:
            os.writev(self._fd, parts)
        except OSError as exc:
            if exc.errno in PACKET_ERRNOS:
                return False
            raise RuntimeFailure(f"cannot write to {self._name}: {exc.strerror}") from exc
        return True

    def write(self, packet: bytes) -> bool:
        """Give one packet to the kernel.  False (a drop) if it would block or refuses it.

        Raises RuntimeFailure only if the device itself fails (closed).
        """
        return self._writev([_PLAIN_HDR, packet] if self.vnet else [packet])

    def write_super(self, hdr: Gso, packet: bytes) -> int:
        if self.vnet:
            return 0 if self._writev([push_gso(hdr), packet]) else 1
        return write_segments(self, hdr, packet)

    def close(self) -> None:
        """Close the device; a non-persistent device disappears.  Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "TAP" if self.tap else "TUN"
        return f"<TunDevice {kind} {self._name} fd={self._fd}>"


def write_segments(dev: PacketDevice, hdr: Gso, packet: bytes) -> int:
    """write_super() for a device without offloads: segment, write each; drops."""
    if hdr == PLAIN:
        return 0 if dev.write(packet) else 1
    try:
        packets = segment(hdr, packet)
    except OffloadError:
        return 1
    return sum(1 for p in packets if not dev.write(p))


def open_tun_queues(
    name: str, queues: int, *, tap: bool = False, offload: bool = False
) -> list[TunDevice]:
    """Create (or attach to) TUN device `name` with `queues` queues (IFF_MULTI_QUEUE),
    one open descriptor each: what the kernel routes into the device is spread over the
    queues by flow (a flow's packets go to the queue that last wrote that flow's), and
    any queue may write.  Offloads as open_tun(); all queues get the same.  Raises
    RuntimeFailure as open_tun() does."""
    _check_name(name)
    devices: list[TunDevice] = []
    try:
        vnet = offload and not tap
        error = ""
        try:
            devices.append(_open(name, tap=tap, vnet=vnet, multi=True))
        except _OffloadRefused as exc:
            vnet, error = False, str(exc)
            devices.append(_open(name, tap=tap, vnet=False, multi=True))
        name = devices[0].name
        for _ in range(queues - 1):
            devices.append(_open(name, tap=tap, vnet=vnet, multi=True))
        for dev in devices:
            dev.offload_error = error
    except BaseException:
        for dev in devices:
            dev.close()
        raise
    return devices


def open_tun(name: str, *, tap: bool = False, offload: bool = False) -> TunDevice:
    """Create (or attach to) TUN device `name` (a TAP device if `tap`) and open it.

    With `offload` (TUN only) ask for the virtio-net header and TCP segmentation
    offloads; if the kernel refuses, the device is opened without them and
    `offload_error` of the result says why.

    Raises RuntimeFailure with one line saying what is wrong: no /dev/net/tun, not
    permitted, device busy, invalid name.
    """
    _check_name(name)
    if offload and not tap:
        try:
            return _open(name, tap=False, vnet=True)
        except _OffloadRefused as exc:
            dev = _open(name, tap=False, vnet=False)
            dev.offload_error = str(exc)
            return dev
    return _open(name, tap=tap, vnet=False)


def log_offloads(dev: TunDevice, asked: bool) -> None:
    """Say once whether the device got the offloads it was opened with."""
    if dev.vnet:
        log.info("device %s: TCP segmentation offloads on (64 KB reads and writes)", dev.name)
    elif asked and dev.offload_error:
        log.warning(
            "device %s: the kernel refused offloads (%s); one packet per read and write",
            dev.name,
            dev.offload_error,
        )


class _OffloadRefused(Exception):
    pass


def _open(name: str, *, tap: bool, vnet: bool, multi: bool = False) -> TunDevice:
    kind = "TAP" if tap else "TUN"
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise RuntimeFailure(f"{TUN_PATH} is missing: load the tun module (modprobe tun)") from exc
    except PermissionError as exc:
        raise RuntimeFailure(f"opening {kind} device {name} needs root (CAP_NET_ADMIN)") from exc
    except OSError as exc:
        raise RuntimeFailure(f"cannot open {TUN_PATH}: {exc.strerror}") from exc
    try:
        flags = (IFF_TAP if tap else IFF_TUN) | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        if multi:
            flags |= IFF_MULTI_QUEUE
        ifr = struct.pack("16sH22x", name.encode(), flags)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            if vnet and exc.errno == errno.EINVAL:
                raise _OffloadRefused(f"the vnet header was refused: {exc.strerror}") from exc
            raise _ioctl_error(exc, kind, name) from exc
        actual = ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        if vnet:
            _set_offloads(fd)
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    return TunDevice(fd, actual, tap, vnet=vnet)


def _set_offloads(fd: int) -> None:
    """Header size and offloads of a vnet device; _OffloadRefused when refused."""
    try:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", GSO_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as exc:
        raise _OffloadRefused(f"TUNSETOFFLOAD was refused: {exc.strerror}") from exc


def _ioctl_error(exc: OSError, kind: str, name: str) -> RuntimeFailure:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return RuntimeFailure(f"opening {kind} device {name} needs root (CAP_NET_ADMIN)")
    if exc.errno == errno.EBUSY:
        return RuntimeFailure(f"{kind} device {name} is busy: another program has it open")
    if exc.errno == errno.EINVAL:
        return RuntimeFailure(
            f"cannot create {kind} device {name!r}: invalid name, "
            "or a device of another kind has that name"
        )
    if exc.errno == errno.EEXIST:
        return RuntimeFailure(
            f"cannot create {kind} device {name}: a device of another kind has that name"
        )
    return RuntimeFailure(f"cannot create {kind} device {name}: {exc.strerror}")
