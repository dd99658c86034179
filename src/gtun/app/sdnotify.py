"""systemd's service notifications (sd_notify(3)), without libsystemd.

Theory of operation
-------------------
Under a unit of `Type=notify`, systemd passes the daemon `NOTIFY_SOCKET`: a datagram
socket, a file system path ("/run/systemd/notify") or a name in the abstract namespace
("@..."; the "@" stands for a leading NUL byte).  Each datagram is newline-separated
assignments: `READY=1` once the daemon serves (systemctl start returns, units ordered
after it start), `RELOADING=1` with `MONOTONIC_USEC=` when it begins a reload and
`READY=1` again when done, `STOPPING=1` when it begins to shut down, `STATUS=` a line
that `systemctl status` shows, and `WATCHDOG=1`.

With `WatchdogSec=`, systemd also passes `WATCHDOG_USEC` (and `WATCHDOG_PID`, the process
meant): a daemon that sends no `WATCHDOG=1` within that time is killed with SIGABRT
and restarted.  The pings are sent every half period by a timer of the daemon's event
loop, so a loop that stalls (a busy callback, a blocking call) stops them: a stall is
what the watchdog is for, a process that merely exists is not.

Without `NOTIFY_SOCKET` (run by hand, by a test, by another supervisor) every call
does nothing.  A datagram that cannot be sent is dropped: notifications are advice to
the service manager, never a reason for the daemon to fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("gtun")


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address `NOTIFY_SOCKET` names: a path (str), an abstract name
    (bytes, with its leading NUL), or None for none or a kind this module does not
    speak (the "vsock:" addresses of newer systemd)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between two `WATCHDOG=1` pings (half of `WATCHDOG_USEC`), or None when
    there is no watchdog for this process (unset, malformed, or `WATCHDOG_PID` names
    another process)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """Sends a daemon's notifications to `address` (see notify_address); with
    `watchdog` (seconds between pings) start_watchdog() keeps pinging from the loop."""

    def __init__(self, address: str | bytes | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address is not None else None
        self._sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False  # a failure is logged once

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(notify_address(env.get("NOTIFY_SOCKET")), watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of `KEY=VALUE` assignments; whether it was sent."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd (NOTIFY_SOCKET): %s", exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", status_line(status))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", status_line("reloading"))

    def stopping(self) -> None:
        self.send("STOPPING=1", status_line("stopping"))

    def status(self, text: str) -> None:
        self.send(status_line(text))

    # --- the watchdog ----------------------------------------------------------------

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping now and every `watchdog` seconds from `loop` (nothing without one)."""
        if self.watchdog is None or self._timer is not None:
            return
        self._ping(loop)

    def _ping(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.watchdog is not None
        self.send("WATCHDOG=1")
        self._timer = loop.call_later(self.watchdog, self._ping, loop)

    def close(self) -> None:
        """Stop the pings and close the socket."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(text: str) -> str:
    """A `STATUS=` assignment: one line, whatever `text` holds."""
    return "STATUS=" + " ".join(text.split())
