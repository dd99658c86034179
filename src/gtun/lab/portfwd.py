"""A TCP port of a lab namespace, reached from this process's loopback.

A browser running in the host's namespace cannot reach a console that listens on
127.0.0.1 inside a relay's namespace, and the host's addresses and routes are never to
be changed for a test.  `NsPortForward` listens on 127.0.0.1 (an ephemeral port) here
and, for each connection, connects to the target from inside the namespace: the thread
that connects first moves itself into the namespace with setns(2), which changes the
network namespace of the calling thread only (so the rest of this process, and every
socket it made before, stays where it was).  The bytes are then copied both ways.  This
is what an SSH tunnel (`ssh -L`) does for a real console.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import socket
import threading

CLONE_NEWNET = 0x40000000  # <sched.h>
CONNECT_TIMEOUT = 5.0  # seconds to reach the target inside the namespace
CHUNK = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name` (`ip netns` names it
    under /var/run/netns).  Raises OSError."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NsPortForward:
    """127.0.0.1:`port` here -> `target` inside namespace `netns`, until close()."""

    def __init__(self, netns: str, target: tuple[str, int]) -> None:
        self.netns = netns
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        # This thread stays in the namespace until it ends: it is never reused.
        try:
            _enter_netns(self.netns)
            upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._conns.update((client, upstream))
        try:
            self._pump(client, upstream)
        finally:
            with self._lock:
                self._conns.discard(client)
                self._conns.discard(upstream)
            client.close()
            upstream.close()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            open_ends = 2
            while open_ends and not self._closed.is_set():
                for key, _ in sel.select(timeout=0.5):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(CHUNK)
                    except OSError:
                        return
                    if not data:
                        sel.unregister(src)
                        open_ends -= 1
                        with contextlib.suppress(OSError):
                            peer[src].shutdown(socket.SHUT_WR)
                        continue
                    try:
                        peer[src].sendall(data)
                    except OSError:
                        return

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._accepting.join(timeout=2)

    def __enter__(self) -> NsPortForward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
