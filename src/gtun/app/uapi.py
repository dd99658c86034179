"""`wg show` for gtun: WireGuard's cross-platform configuration protocol (UAPI) on
/var/run/wireguard/DEVICE.sock, the socket wireguard-tools looks for, so that `wg show`,
`wg show DEVICE dump`, `wg showconf DEVICE` and Prometheus WireGuard exporters read a
gtun relay's or client's peers unchanged.

The protocol (https://www.wireguard.com/xplatform/, as wireguard-go's device/uapi.go
serves it and wireguard-tools' src/ipc-uapi.h reads it): a Unix stream socket; a request
is an operation line, "get=1" or "set=1", then key=value lines and a blank line; the
answer is key=value lines, then "errno=N" and a blank line, and the connection stays
open for the next request.  A get answer gives the interface (private_key, listen_port,
fwmark: each only when set), then per peer public_key first and the peer's own keys;
keys are lowercase hex.  wg reads it strictly: it skips a key it does not know, and a
malformed value ends the read with EPROTO.  An errno is negative, as wireguard-go
writes it (wg negates a set answer's errno itself).

gtun serves "get" only.  Its configuration comes from its files and its store, so a
"set" is read to its blank line and refused with errno=-EOPNOTSUPP (`wg set` prints
"Unable to modify interface: Operation not supported").  A malformed request is
answered with an errno and the connection closed; every read is bounded in size
(MAX_LINE, MAX_SET) and time (REQUEST_TIMEOUT), and at most MAX_CONNECTIONS are served
at once.  A get answer is built STATUS_CHUNK peers between yields to the event loop,
as `gtun status` is (the loop forwards every packet), and written a part at a time.

The socket is taken as wireguard-go's ipc.UAPIOpen takes it (the directory 0755, the
socket 0600: it gives the private key), with one difference: a socket another process
answers (a wireguard-go or another gtun with the same device name: the directory is
shared by every network namespace) is never taken: one warning, and the daemon runs
without it.  A socket nobody answers (left by a SIGKILL) is replaced.  On exit only the
socket this process made is removed (its inode is compared): `wg` itself unlinks a
socket it finds dead, and another process may have made a new one since.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, TypeVar

from gtun.app.control import socket_answers
from gtun.core.relay import PeerSpec, Relay
from gtun.core.tunnel import PushedConfig
from gtun.core.wg import Peer
from gtun.io.transport import endpoint_text

log = logging.getLogger("gtun")

# From the specification (wireguard-tools src/ipc-uapi-unix.h, wireguard-go ipc/).
UAPI_DIR = Path("/var/run/wireguard")  # where `wg` looks for DEVICE.sock
KEY_SIZE = 32
# Error codes as wireguard-go writes them (negative errno values, ipc/uapi_unix.go).
EPROTO = -errno.EPROTO  # a line that is not key=value, an unknown operation
EINVAL = -errno.EINVAL  # a bad value (a trailing character after get=1)
EMSGSIZE = -errno.EMSGSIZE  # a line or a set over its bound (gtun's own)
EOPNOTSUPP = -errno.EOPNOTSUPP  # set=1: gtun is configured by its files
ENOANO = -55  # wireguard-go's IpcErrorUnknown: our bug

# Tuning knobs.
MAX_LINE = 4096  # bytes in one request line (wg's longest is an endpoint, ~60)
MAX_SET = 8 * 1024 * 1024  # bytes of one set request, read only to be refused
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0  # seconds to send a whole request, and to read its answer
STATUS_CHUNK = 500  # peers described between two yields to the event loop
SET_LOG_INTERVAL = 60.0  # seconds between two log lines about refused sets

Network = IPv4Network | IPv6Network
T = TypeVar("T")
# What a daemon gives the server: its get answer's body (without the errno line), in
# parts written one after the other (no copy of a whole 10,000 peers' answer at once).
GetAnswer = Callable[[], Awaitable[list[bytes]]]


class UapiError(Exception):
    """A request or an answer that breaks the protocol; `code` is the errno to answer
    (negative, as wireguard-go's)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- the text protocol -------------------------------------------------------------


@dataclass(slots=True)
class UapiPeer:
    """One peer as a get answer gives it (not frozen: one is made per peer per `wg
    show`, 10,000 of them on a large relay)."""

    public_key: bytes
    preshared_key: bytes = bytes(KEY_SIZE)  # all zeros: none
    endpoint: str | None = None  # "host:port", "[v6host]:port"
    last_handshake: float | None = None  # Unix time; None: never
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0  # seconds; 0: off
    allowed_ips: tuple[str, ...] = ()  # "10.66.0.2/32", "fd66::2/128"


@dataclass(frozen=True)
class UapiDevice:
    """A whole get answer."""

    private_key: bytes | None = None
    listen_port: int = 0  # 0: none (wg shows no port)
    fwmark: int = 0
    peers: tuple[UapiPeer, ...] = ()


def push_interface(private_key: bytes | None, listen_port: int = 0, fwmark: int = 0) -> str:
    """The interface's lines of a get answer; a key that is not set is left out (as
    wireguard-go does)."""
    lines = []
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}\n")
    if listen_port:
        lines.append(f"listen_port={listen_port}\n")
    if fwmark:
        lines.append(f"fwmark={fwmark}\n")
    return "".join(lines)


def handshake_time(when: float | None) -> tuple[int, int]:
    """Unix time as (seconds, nanoseconds); (0, 0) for never, as WireGuard says it."""
    if when is None or when <= 0:
        return 0, 0
    sec = math.floor(when)
    # The fraction is exact in a float (when - sec); when * 1e9 would not be.
    return sec, min(round((when - sec) * 1e9), 999_999_999)


def push_peer(peer: UapiPeer) -> str:
    """One peer's lines of a get answer, public_key first (it starts a peer)."""
    sec, nsec = handshake_time(peer.last_handshake)
    lines = [
        f"public_key={peer.public_key.hex()}\n",
        f"preshared_key={peer.preshared_key.hex()}\n",
        "protocol_version=1\n",
    ]
    if peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}\n")
    lines.append(
        f"last_handshake_time_sec={sec}\n"
        f"last_handshake_time_nsec={nsec}\n"
        f"tx_bytes={peer.tx_bytes}\n"
        f"rx_bytes={peer.rx_bytes}\n"
        f"persistent_keepalive_interval={peer.persistent_keepalive}\n"
    )
    lines.extend(f"allowed_ip={net}\n" for net in peer.allowed_ips)
    return "".join(lines)


def push_answer(code: int) -> bytes:
    """The end of every answer: its errno and the blank line."""
    return f"errno={code}\n\n".encode()


def uapi_endpoint(endpoint: Hashable | None) -> str | None:
    """A peer's endpoint as the protocol gives it, "host:port" ("[host]:port" for IPv6):
    a UDP address as it is; a TCP connection as the address and port of its other end,
    the form wg reads (it resolves the text as a UDP address: over TCP that is where
    the peer's connection comes from, or the relay's port a client dialled).  None for
    no endpoint, or one that has no address."""
    if endpoint is None:
        return None
    if endpoint.__class__ is tuple:
        return endpoint_text(endpoint)
    address = getattr(endpoint, "address", None)
    return address if isinstance(address, str) else None


def pull_operation(line: bytes) -> str:
    """The operation a request line names: "get" or "set".  Raises UapiError."""
    if line == b"get=1\n":
        return "get"
    if line == b"set=1\n":
        return "set"
    raise UapiError(EPROTO, f"invalid operation {line[:40]!r}")


def pull_set_line(line: bytes) -> bool:
    """Whether a line of a set request ends it (the blank line).  Raises UapiError for
    a line that is not key=value."""
    if line == b"\n":
        return True
    if not line.endswith(b"\n") or b"=" not in line:
        raise UapiError(EPROTO, f"failed to parse line {line[:40]!r}")
    return False


def pull_answer(text: str) -> UapiDevice:
    """A get answer read as strictly as wg reads it (src/ipc-uapi.h): keys in hex,
    numbers in decimal, an endpoint "host:port" with an IP literal, prefixes that fit
    their family, the answer ending "errno=0" and a blank line.  Raises UapiError."""
    if not text.endswith("\n\n"):
        raise UapiError(EPROTO, "the answer does not end with a blank line")
    device: dict[str, Any] = {"private_key": None, "listen_port": 0, "fwmark": 0}
    peers: list[dict[str, Any]] = []
    code: int | None = None
    for line in text[:-2].split("\n"):
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(EPROTO, f"failed to parse line {line!r}")
        if code is not None:
            raise UapiError(EPROTO, f"{line!r} after errno")
        if key == "errno":
            code = int(value) if value.lstrip("-").isdigit() else _bad(line)
        elif key == "public_key":
            peers.append({"public_key": _pull_key(value)})
        elif not peers:
            if key == "private_key":
                device["private_key"] = _pull_key(value)
            elif key in ("listen_port", "fwmark"):
                device[key] = _pull_number(value, 0xFFFF if key == "listen_port" else 2**32 - 1)
        else:
            _pull_peer_key(peers[-1], key, value)
    if code != 0:
        raise UapiError(code or EPROTO, f"the answer's errno is {code}")
    return UapiDevice(
        device["private_key"],
        device["listen_port"],
        device["fwmark"],
        tuple(_peer_of(p) for p in peers),
    )


def _pull_peer_key(peer: dict[str, Any], key: str, value: str) -> None:
    if key == "preshared_key":
        peer[key] = _pull_key(value)
    elif key == "endpoint":
        peer[key] = _pull_endpoint(value)
    elif key == "allowed_ip":
        address, slash, prefix = value.partition("/")
        if not slash or not prefix.isdigit():
            _bad(value)
        try:
            net = ip_network(f"{ip_address(address)}/{int(prefix)}", strict=False)
        except ValueError:
            _bad(value)
        peer.setdefault("allowed_ips", []).append(str(net))
    elif key in ("last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes", "tx_bytes"):
        peer[key] = _pull_number(value, 2**64 - 1)
    elif key == "persistent_keepalive_interval":
        peer[key] = _pull_number(value, 0xFFFF)
    # Anything else (protocol_version, keys of newer versions): skipped, as wg does.


def _peer_of(p: dict[str, Any]) -> UapiPeer:
    sec, nsec = p.get("last_handshake_time_sec", 0), p.get("last_handshake_time_nsec", 0)
    return UapiPeer(
        public_key=p["public_key"],
        preshared_key=p.get("preshared_key", bytes(KEY_SIZE)),
        endpoint=p.get("endpoint"),
        last_handshake=sec + nsec / 1e9 if sec or nsec else None,
        rx_bytes=p.get("rx_bytes", 0),
        tx_bytes=p.get("tx_bytes", 0),
        persistent_keepalive=p.get("persistent_keepalive_interval", 0),
        allowed_ips=tuple(p.get("allowed_ips", ())),
    )


def _bad(text: str) -> Any:
    raise UapiError(EPROTO, f"malformed value {text!r}")


def _pull_key(value: str) -> bytes:
    if len(value) != 2 * KEY_SIZE:
        _bad(value)
    try:
        return bytes.fromhex(value)
    except ValueError:
        return _bad(value)


def _pull_number(value: str, limit: int) -> int:
    if not value.isdigit() or not value.isascii() or int(value) > limit:
        _bad(value)
    return int(value)


def _pull_endpoint(value: str) -> str:
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    try:
        ip_address(host.partition("%")[0])
    except ValueError:
        _bad(value)
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        _bad(value)
    return value


# --- what a relay and a client answer ----------------------------------------------


def wg_peer(peer: Peer, wall: float, allowed_ips: tuple[str, ...]) -> UapiPeer:
    """A WireGuard peer of the core as UapiPeer; `wall` is the core's offset from its
    clock to Unix time (so the handshake time is the one `gtun status` reports)."""
    return UapiPeer(
        public_key=peer.public_key,
        preshared_key=peer.preshared_key,
        endpoint=uapi_endpoint(peer.endpoint),
        last_handshake=peer.last_handshake + wall if peer.last_handshake is not None else None,
        rx_bytes=peer.rx_bytes,
        tx_bytes=peer.tx_bytes,
        persistent_keepalive=int(peer.persistent_keepalive),
        allowed_ips=allowed_ips,
    )


async def gather(items: Sequence[T], line: Callable[[T], str]) -> list[bytes]:
    """`line` of every item, encoded STATUS_CHUNK items a part, with a yield to the
    event loop between two parts."""
    parts = []
    for start in range(0, len(items), STATUS_CHUNK):
        if start:
            await asyncio.sleep(0)
        parts.append("".join([line(item) for item in items[start : start + STATUS_CHUNK]]).encode())
    return parts


async def relay_answer(
    relay: Relay,
    private_key: bytes,
    listen_port: int,
    others: Mapping[bytes, Sequence[WorkerPeer]] | None = None,
) -> list[bytes]:
    """A relay's get answer: every client peer, its allowed IPs its addresses and the
    LANs behind it; and every other relay of a mesh (WireGuard peers too), its allowed
    IPs the routes behind it.  `others`: what the relay's other workers (app/workers.py)
    have of each peer, added: the bytes summed, the endpoint and handshake of the worker
    holding the peer's session."""
    wall = relay.wg.wall_offset  # fixed at start, as status has it

    def describe(peer: Peer) -> str:
        if relay.is_mesh(peer):
            allowed = tuple(str(r) for r in peer.data.relay.routes)
        else:
            allowed = client_owned(peer.data.spec)
        item = wg_peer(peer, wall, allowed)
        if others:
            for other in others.get(peer.public_key, ()):
                item.rx_bytes += other.rx_bytes
                item.tx_bytes += other.tx_bytes
                if other.holds and other.last_handshake is not None:
                    item.last_handshake = other.last_handshake + wall
                    item.endpoint = other.endpoint
        return push_peer(item)

    parts = await gather(list(relay.wg.peers.values()), describe)
    return [push_interface(private_key, listen_port).encode(), *parts]


@dataclass(frozen=True, slots=True)
class WorkerPeer:
    """What another worker of the relay has of a peer, for relay_answer()."""

    rx_bytes: int
    tx_bytes: int
    last_handshake: float | None  # monotonic, as the cores' clocks
    endpoint: str | None  # as uapi_endpoint() gives it
    holds: bool  # its session is the one the peer uses: its endpoint and handshake shown


def client_owned(spec: PeerSpec) -> tuple[str, ...]:
    """A client peer's allowed IPs at the relay: its addresses and the LANs behind it
    (PeerSpec.owned(), as text made without a network object per address)."""
    own = [f"{spec.address}/32"]
    if spec.address6 is not None:
        own.append(f"{spec.address6}/128")
    own.extend(str(net) for net in spec.subnets)
    return tuple(own)


def client_allowed_ips(
    config: PushedConfig | None, ipv6: bool, full_tunnel: bool
) -> tuple[str, ...]:
    """What a client sends into the tunnel, as the relay's allowed IPs: everything in
    full-tunnel mode (IPv6 only with an IPv6 address: without, the full tunnel makes it
    unreachable instead), otherwise the virtual networks and the pushed routes; none
    before the relay pushed a configuration."""
    if config is None:
        return ()
    if full_tunnel:
        return ("0.0.0.0/0",) + (("::/0",) if ipv6 else ())
    nets: list[Network] = [IPv4Network((config.address, config.prefix), strict=False)]
    if ipv6 and config.address6 is not None and config.prefix6 is not None:
        nets.append(IPv6Network((config.address6, config.prefix6), strict=False))
    nets.extend(r for r in config.routes if r.version == 4 or ipv6)
    return tuple(str(n) for n in dict.fromkeys(nets))


async def client_answer(
    peers: Sequence[Peer],
    in_use: Peer,
    wall: float,
    private_key: bytes,
    listen_port: int,
    fwmark: int,
    allowed_ips: tuple[str, ...],
) -> list[bytes]:
    """A client's get answer: its relays (several once it learnt a mesh's), the one in
    use with `allowed_ips`; the others with none (no traffic is routed to them, and an
    allowed IP belongs to one peer only)."""

    def describe(peer: Peer) -> str:
        return push_peer(wg_peer(peer, wall, allowed_ips if peer is in_use else ()))

    parts = await gather(list(peers), describe)
    return [push_interface(private_key, listen_port, fwmark).encode(), *parts]


def udp_port(sock: socket.socket | None) -> int:
    """The port a UDP socket is bound to (0: no socket, as over TCP)."""
    if sock is None:
        return 0
    try:
        return int(sock.getsockname()[1])
    except OSError:
        return 0


# --- the socket --------------------------------------------------------------------


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class UapiServer:
    """The UAPI socket of one device.  start() takes it (or says why not and leaves it);
    close() stops serving and removes the socket only if it is still the one made."""

    def __init__(self, path: Path, get: GetAnswer) -> None:
        self.path = path
        self.get = get
        self._server: asyncio.AbstractServer | None = None
        self._made: tuple[int, int] | None = None  # the socket file's (device, inode)
        self._writers: set[asyncio.StreamWriter] = set()
        self._set_logged: float | None = None

    async def start(self) -> bool:
        """Listen on `path`.  False (one warning logged) when the path is another
        process's socket, is not a socket, or cannot be made: the daemon runs without."""
        try:
            sock = self._take()
        except OSError as exc:
            log.warning(
                "cannot make %s (%s): `wg show` will not see this device",
                self.path,
                exc.strerror or exc,
            )
            return False
        if sock is None:
            return False
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except OSError as exc:
            sock.close()
            self._remove()
            log.warning("cannot serve %s (%s): `wg show` will not see this device", self.path, exc)
            return False
        return True

    def _take(self) -> socket.socket | None:
        """Bind and listen on `path`; replace a dead socket there, leave a live one or
        anything that is not a socket (None, said once).  Raises OSError."""
        directory = self.path.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o755)  # as wireguard-go: `wg` runs as any user
        for _ in range(3):  # a dead socket replaced meanwhile by another process: look again
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # 0600: the answer holds the private key
            try:
                sock.bind(str(self.path))
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
            else:
                self._made = _identity(self.path)
                try:
                    sock.listen(MAX_CONNECTIONS)
                except OSError:
                    sock.close()
                    self._remove()
                    raise
                return sock
            finally:
                os.umask(old)
            if not self._stale():
                return None
        raise OSError(errno.EADDRINUSE, "taken and freed over and over")

    def _stale(self) -> bool:
        """Something is at `path`: remove it and True if it is a dead socket; otherwise
        say why it is left (False)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return True  # gone meanwhile: bind again
        if not stat.S_ISSOCK(st.st_mode):
            log.warning(
                "%s exists and is not a socket: leaving it; `wg show` will not see this device",
                self.path,
            )
            return False
        if socket_answers(self.path):
            log.warning(
                "%s is answered by another process (a wireguard-go or another gtun with "
                "device %s): leaving it; this gtun runs without `wg show`",
                self.path,
                self.path.name.removesuffix(".sock"),
            )
            return False
        if _identity(self.path) == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        log.info("replaced %s, a socket nobody answered (left by a killed process)", self.path)
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self._remove()

    def _remove(self) -> None:
        """Remove the socket file if it is still the one this server made."""
        if self._made is not None and _identity(self.path) == self._made:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._made = None

    # --- connections ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._writers.add(writer)
        clean = False
        try:
            while await self._request(reader, writer):
                pass
            clean = True
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass  # a client that went away, or took too long: cut off
        finally:
            self._writers.discard(writer)
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is to end (the client closed
        it, or the request was malformed: answered, then closed)."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await _readline(reader)
                if not line:
                    return False  # closed (`wg` opens and closes a connection to probe)
                op = pull_operation(line)
                if op == "get":
                    if await reader.readexactly(1) != b"\n":
                        raise UapiError(EINVAL, "trailing character after get=1")
                else:
                    await self._read_set(reader)
        except UapiError as exc:
            log.debug("%s: %s", self.path, exc)
            await _send(writer, push_answer(exc.code))
            return False
        if op == "set":
            self._note_set()
            await _send(writer, push_answer(EOPNOTSUPP))
            return True
        try:
            parts = await self.get()
        except Exception:  # a bug of ours: answered, logged, not fatal
            log.exception("%s: building the get answer failed", self.path)
            await _send(writer, push_answer(ENOANO))
            return False
        await _send(writer, *parts, push_answer(0))
        return True

    async def _read_set(self, reader: asyncio.StreamReader) -> None:
        """Read a set request to its blank line.  Raises UapiError past MAX_SET."""
        size = 0
        while True:
            line = await _readline(reader)
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            size += len(line)
            if size > MAX_SET:
                raise UapiError(EMSGSIZE, f"set request over {MAX_SET} bytes")
            if pull_set_line(line):
                return

    def _note_set(self) -> None:
        now = time.monotonic()
        if self._set_logged is None or now - self._set_logged >= SET_LOG_INTERVAL:
            self._set_logged = now
            log.warning(
                "refused a `wg set` on %s: gtun takes its configuration from its files "
                "(edit the file and reload)",
                self.path.name.removesuffix(".sock"),
            )


async def _readline(reader: asyncio.StreamReader) -> bytes:
    """One line, or b"" at the end of the stream.  Raises UapiError for a line over the
    reader's limit (MAX_LINE), or the end of the stream in the middle of one."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as exc:
        raise UapiError(EMSGSIZE, f"a request line over {MAX_LINE} bytes") from exc
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise UapiError(EPROTO, "the request ends in the middle of a line") from exc
        return b""
    return line


async def _send(writer: asyncio.StreamWriter, *parts: bytes) -> None:
    """Write `parts`, each once the client has read enough of the ones before (the
    transport's high-water mark), within REQUEST_TIMEOUT in all: a client that does not
    read is cut off.  Raises TimeoutError or OSError."""
    async with asyncio.timeout(REQUEST_TIMEOUT):
        for part in parts:
            writer.write(part)
            await writer.drain()


async def start_uapi(
    add_cleanup: Callable[[str, Callable[[], object]], None],
    directory: Path | None,
    device: str,
    get: GetAnswer,
) -> UapiServer | None:
    """Serve `wg show` for `device` in `directory` (None: not on this platform) and
    record its removal with `add_cleanup` (the daemon's Runtime.push).  None when the
    socket could not be taken (said in the log)."""
    if directory is None:
        return None
    server = UapiServer(directory / f"{device}.sock", get)
    if not await server.start():
        return None
    add_cleanup("wg UAPI socket", server.close)
    return server
