"""What the relay and the client daemons share while they run: the netlink thread, the
stop event and the signals that set it, the clean-up stack, the status fields they
both report, and what they tell systemd (app/sdnotify.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gtun.app.keys import encode_key
from gtun.app.sdnotify import Notifier
from gtun.core.wg import Peer
from gtun.errors import GtunError

log = logging.getLogger("gtun")


class Runtime:
    """One daemon's life: `nl()` runs netlink calls, `stop` ends the run, `push()` records
    how to undo each change and `unwind()` undoes them all, most recent first."""

    def __init__(self, role: str, device: str, public_key: bytes) -> None:
        self.role = role
        self.device = device
        self.public_key = public_key
        self.started = time.time()
        self.stop = asyncio.Event()
        # (what, undo, runs in the netlink thread); undo may return an awaitable.
        self._cleanup: list[tuple[str, Callable[[], object], bool]] = []
        self._signals: list[signal.Signals] = []
        # pyroute2's synchronous API runs its own asyncio loop, so every netlink call
        # goes to this one worker thread, never to the event loop's thread.
        self._netlink = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        # systemd (Type=notify): nothing unless NOTIFY_SOCKET is set.
        self.notify = Notifier.from_environ()
        self._describe: Callable[[], str] | None = None

    async def nl(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._netlink, fn, *args)

    # --- signals -----------------------------------------------------------------------

    def handle_signals(self, reload: Callable[[], object] | None = None) -> None:
        """SIGINT and SIGTERM stop the daemon; SIGHUP runs `reload` (a coroutine
        function or a plain one) when there is one."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
            self._signals.append(sig)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, lambda: _run_soon(lambda: self._reload(reload)))
            self._signals.append(signal.SIGHUP)

    async def _reload(self, reload: Callable[[], object]) -> None:
        """A reload asked by SIGHUP (`systemctl reload`), told to systemd around it."""
        self.notify.reloading()
        try:
            result = reload()
            if inspect.isawaitable(result):
                await result
        finally:
            self.notify.ready(self._describe() if self._describe is not None else "serving")

    # --- systemd -----------------------------------------------------------------------

    def serving(self, describe: Callable[[], str]) -> None:
        """The daemon serves: READY=1 with `describe()` as its status line (again after
        each reload), and the watchdog's pings from now on."""
        self._describe = describe
        self.notify.ready(describe())
        self.notify.start_watchdog(asyncio.get_running_loop())

    def say(self, status: str) -> None:
        """What the daemon is doing, for `systemctl status` (STATUS=)."""
        self.notify.status(status)

    def forget_signals(self) -> None:
        """Remove the handlers of the signals `handle_signals` set, and only those (a
        client sets none for SIGHUP: a relay on the same loop, in tests, keeps its)."""
        loop = asyncio.get_running_loop()
        while self._signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(self._signals.pop())

    # --- clean-up ----------------------------------------------------------------------

    def push(self, what: str, undo: Callable[[], object], in_netlink: bool = False) -> None:
        """Record how to undo `what`; `in_netlink`: `undo` runs in the netlink thread."""
        self._cleanup.append((what, undo, in_netlink))

    async def unwind(self) -> None:
        """Run every clean-up step, most recent first.  A step that fails is logged and
        the others still run; then the netlink thread ends."""
        self.notify.stopping()
        self.forget_signals()
        while self._cleanup:
            what, undo, in_netlink = self._cleanup.pop()
            try:
                if in_netlink:
                    await self.nl(undo)
                else:
                    result = undo()
                    if inspect.isawaitable(result):
                        await result
            except GtunError as exc:
                log.error("while removing %s: %s", what, exc)
            except Exception as exc:  # cleanup must go on whatever one step does
                log.error("while removing %s: %s", what, exc, exc_info=log.isEnabledFor(10))
        self._netlink.shutdown(wait=True)
        self.notify.close()

    # --- status ------------------------------------------------------------------------

    def status(
        self,
        head: dict[str, Any],
        peers: list[dict[str, Any]],
        drops: dict[str, int],
        datapath: dict[str, Any] | None,
        tail: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The `gtun status` answer: the fields both daemons report around the
        role's own (`head` after role and device, `tail` after the peers)."""
        return {
            "role": self.role,
            "device": self.device,
            **head,
            "public_key": encode_key(self.public_key),
            "uptime": time.time() - self.started,
            "peers": peers,
            **(tail or {}),
            "drops": drops,
            "datapath": datapath,
        }


def peer_traffic(peer: Peer, wall: float) -> dict[str, Any]:
    """A WireGuard peer's counters and last handshake (wall-clock time) for status;
    `wall` is the core's fixed offset, so reported times do not jitter."""
    return {
        "rx_bytes": peer.rx_bytes,
        "tx_bytes": peer.tx_bytes,
        "rx_packets": peer.rx_packets,
        "tx_packets": peer.tx_packets,
        "last_handshake": peer.last_handshake + wall if peer.last_handshake is not None else None,
    }


def _run_soon(fn: Callable[[], object]) -> None:
    result = fn()
    if inspect.isawaitable(result):
        asyncio.ensure_future(result)
