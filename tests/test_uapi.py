"""`wg show` compatibility (app/uapi.py): WireGuard's cross-platform configuration
protocol.  The text protocol as pure functions; the cores' peers as a relay and a client
answer them; the Unix-socket server on a temporary directory (requests good, malformed
and huge, stale and foreign sockets); the daemons in-process with the socket in a
temporary directory; and wireguard-tools' own `wg` reading the answers, which needs the
socket where `wg` looks (/var/run/wireguard, as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv6Address, ip_network
from pathlib import Path
from typing import Any

import pytest

from gtun.app import uapi
from gtun.app.config import load_client_config, load_server_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.uapi import (
    UapiDevice,
    UapiError,
    UapiPeer,
    UapiServer,
    client_allowed_ips,
    pull_answer,
    pull_operation,
    pull_set_line,
    push_interface,
    push_peer,
    uapi_endpoint,
)
from gtun.core.client import ClientCore
from gtun.core.relay import PeerSpec, Relay
from gtun.core.tunnel import PushedConfig
from gtun.errors import ConfigError
from gtun.io.tcp import TcpEndpoint, TcpLimits
from gtun.testing.link import CoreLink, relay_settings
from gtun.testing.mesh import MeshLink
from gtun.testing.platform import FakePlatform
from test_daemons import Net, configured, exchange  # the in-process relay and client

KEY = bytes(range(32))
KEY_HEX = KEY.hex()
LIMIT = 10.0  # seconds any one asyncio scenario may take


# --- the text protocol -------------------------------------------------------------


def test_the_interface_lines_leave_out_what_is_not_set() -> None:
    assert push_interface(KEY, 9621, 0x51) == (
        f"private_key={KEY_HEX}\nlisten_port=9621\nfwmark=81\n"
    )
    assert push_interface(KEY) == f"private_key={KEY_HEX}\n"
    assert push_interface(None, 0, 0) == ""


def test_a_peer_is_its_key_first_then_its_state_in_wireguard_go_order() -> None:
    peer = UapiPeer(
        public_key=KEY,
        endpoint="192.0.2.7:51820",
        last_handshake=1_700_000_000.25,
        rx_bytes=1234,
        tx_bytes=5678,
        persistent_keepalive=25,
        allowed_ips=("10.66.0.2/32", "fd66::2/128", "192.168.88.0/24"),
    )
    assert push_peer(peer) == (
        f"public_key={KEY_HEX}\n"
        f"preshared_key={'00' * 32}\n"
        "protocol_version=1\n"
        "endpoint=192.0.2.7:51820\n"
        "last_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=250000000\n"
        "tx_bytes=5678\n"
        "rx_bytes=1234\n"
        "persistent_keepalive_interval=25\n"
        "allowed_ip=10.66.0.2/32\n"
        "allowed_ip=fd66::2/128\n"
        "allowed_ip=192.168.88.0/24\n"
    )


def test_a_peer_never_met_has_no_endpoint_and_a_zero_handshake() -> None:
    text = push_peer(UapiPeer(public_key=KEY))
    assert "endpoint=" not in text
    assert "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n" in text
    assert "persistent_keepalive_interval=0\n" in text
    assert "allowed_ip=" not in text


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (None, (0, 0)),
        (1_700_000_000.0, (1_700_000_000, 0)),
        (1_700_000_000.999999, (1_700_000_000, 999_999_046)),  # a float's own precision
        (12.5, (12, 500_000_000)),
    ],
)
def test_handshake_time_is_seconds_and_nanoseconds(
    when: float | None, expected: tuple[int, int]
) -> None:
    sec, nsec = uapi.handshake_time(when)
    assert sec == expected[0] and 0 <= nsec < 1_000_000_000
    assert abs(nsec - expected[1]) < 1000


class FakeWriteTransport:
    """What TcpEndpoint asks of its asyncio transport when it is made."""

    def set_write_buffer_limits(self, high: int) -> None:
        pass


def test_endpoints_of_ipv4_ipv6_and_tcp_peers() -> None:
    assert uapi_endpoint(None) is None
    assert uapi_endpoint(("192.0.2.7", 51820)) == "192.0.2.7:51820"
    assert uapi_endpoint(("2001:db8::7", 9621, 0, 0)) == "[2001:db8::7]:9621"
    assert uapi_endpoint(("::ffff:192.0.2.7", 9621, 0, 0)) == "[::ffff:192.0.2.7]:9621"
    # A TCP peer: the address and port its connection comes from, a form wg reads.
    loop = asyncio.new_event_loop()
    try:
        for peername, text in (
            (("198.51.100.4", 40123), "198.51.100.4:40123"),
            (("2001:db8::4", 40123, 0, 0), "[2001:db8::4]:40123"),
        ):
            ep = TcpEndpoint(None, FakeWriteTransport(), peername, TcpLimits(), loop)  # type: ignore[arg-type]
            assert uapi_endpoint(ep) == text
            assert uapi.pull_answer(_answer(UapiPeer(KEY, endpoint=text))).peers[0].endpoint == text
    finally:
        loop.close()
    assert uapi_endpoint(object()) is None  # an endpoint with no address: none given


def _answer(*peers: UapiPeer, device: UapiDevice | None = None) -> str:
    device = device or UapiDevice(private_key=KEY, listen_port=9621)
    return (
        push_interface(device.private_key, device.listen_port, device.fwmark)
        + "".join(push_peer(p) for p in peers)
        + "errno=0\n\n"
    )


def test_the_reader_reads_back_what_was_written() -> None:
    peers = (
        UapiPeer(
            public_key=public_key(KEY),
            endpoint="[2001:db8::1]:9621",
            last_handshake=1_700_000_123.5,
            rx_bytes=2**40,
            tx_bytes=7,
            persistent_keepalive=25,
            allowed_ips=("0.0.0.0/0", "::/0"),
        ),
        UapiPeer(public_key=bytes(32 * [0xAB]), preshared_key=bytes(32 * [1])),
    )
    got = pull_answer(_answer(*peers, device=UapiDevice(KEY, 51820, 7)))
    assert (got.private_key, got.listen_port, got.fwmark) == (KEY, 51820, 7)
    assert got.peers == peers


@pytest.mark.parametrize(
    "bad",
    [
        "private_key=abc\nerrno=0\n\n",  # a key too short
        f"private_key={'zz' * 32}\nerrno=0\n\n",  # not hex
        f"public_key={KEY_HEX}\nrx_bytes=-1\nerrno=0\n\n",  # not a number
        f"public_key={KEY_HEX}\nendpoint=example.com:1\nerrno=0\n\n",  # not an IP
        f"public_key={KEY_HEX}\nendpoint=192.0.2.1\nerrno=0\n\n",  # no port
        f"public_key={KEY_HEX}\nallowed_ip=10.0.0.0/33\nerrno=0\n\n",  # a prefix too long
        f"public_key={KEY_HEX}\nallowed_ip=10.0.0.0\nerrno=0\n\n",  # no prefix
        "listen_port=70000\nerrno=0\n\n",  # out of range
        "garbage\nerrno=0\n\n",  # not key=value
        f"private_key={KEY_HEX}\n\n",  # no errno
        f"private_key={KEY_HEX}\nerrno=0\n",  # no blank line
        "errno=-95\n\n",  # an error
    ],
)
def test_the_reader_is_as_strict_as_wg(bad: str) -> None:
    with pytest.raises(UapiError):
        pull_answer(bad)


def test_the_reader_skips_keys_it_does_not_know() -> None:
    text = f"public_key={KEY_HEX}\nprotocol_version=1\nsomething_new=3\nerrno=0\n\n"
    assert pull_answer(text).peers == (UapiPeer(KEY),)


def test_operations_and_set_lines() -> None:
    assert pull_operation(b"get=1\n") == "get"
    assert pull_operation(b"set=1\n") == "set"
    for bad in (b"get=2\n", b"get=1", b"GET=1\n", b"hello\n", b"\n"):
        with pytest.raises(UapiError) as exc:
            pull_operation(bad)
        assert exc.value.code == uapi.EPROTO
    assert pull_set_line(b"\n") is True
    assert pull_set_line(b"listen_port=1\n") is False
    with pytest.raises(UapiError):
        pull_set_line(b"no equals sign\n")


def test_a_clients_allowed_ips() -> None:
    config = PushedConfig(
        name="c1",
        address=IPv4Address("10.66.0.2"),
        prefix=24,
        gateway=IPv4Address("10.66.0.1"),
        routes=(ip_network("192.168.77.0/24"), ip_network("fd77::/64")),
        mtu=1420,
        dns=(),
        mode="tun",
        address6=IPv6Address("fd66::2"),
        prefix6=64,
        gateway6=IPv6Address("fd66::1"),
    )
    assert client_allowed_ips(None, False, False) == ()
    assert client_allowed_ips(config, False, False) == ("10.66.0.0/24", "192.168.77.0/24")
    assert client_allowed_ips(config, True, False) == (
        "10.66.0.0/24",
        "fd66::/64",
        "192.168.77.0/24",
        "fd77::/64",
    )
    assert client_allowed_ips(config, False, True) == ("0.0.0.0/0",)
    assert client_allowed_ips(config, True, True) == ("0.0.0.0/0", "::/0")


# --- what a relay and a client answer ----------------------------------------------


def joined(parts: list[bytes]) -> str:
    """A get answer's parts as the text a client reads, with its errno line."""
    return b"".join(parts).decode() + "errno=0\n\n"


def core_net() -> tuple[CoreLink, list[PeerSpec]]:
    """A relay core with clients c1 (a LAN behind it, IPv6) and c2, in memory."""
    relay = Relay(secrets.token_bytes(32), relay_settings(), wall_offset=1_700_000_000.0)
    net = CoreLink(relay, now=1000.0)
    specs = [
        PeerSpec(
            "c1",
            b"",
            IPv4Address("10.66.0.2"),
            (ip_network("192.168.88.0/24"),),
            IPv6Address("fd66::2"),
        ),
        PeerSpec("c2", b"", IPv4Address("10.66.0.3")),
    ]
    for spec in specs:
        client = ClientCore(secrets.token_bytes(32), relay.wg.public_key, "R", mode="tun")
        spec.public_key = client.wg.public_key
        net.add_client(spec.name, client)
    relay.set_peers(specs)
    return net, specs


def test_a_relay_answers_every_peer_with_its_handshake_counters_and_addresses() -> None:
    net, specs = core_net()
    net.start("c1")  # c2 never connects
    relay = net.relay
    key = secrets.token_bytes(32)
    answer = joined(asyncio.run(uapi.relay_answer(relay, key, 9621)))
    got = pull_answer(answer)
    assert (got.private_key, got.listen_port, got.fwmark) == (key, 9621, 0)
    by_key = {p.public_key: p for p in got.peers}
    assert set(by_key) == {s.public_key for s in specs}
    c1 = relay.wg.peers[specs[0].public_key]
    p1 = by_key[specs[0].public_key]
    assert c1.last_handshake is not None and c1.rx_bytes > 0 and c1.tx_bytes > 0
    assert p1.last_handshake == pytest.approx(1_700_000_000.0 + c1.last_handshake, abs=1e-6)
    assert (p1.rx_bytes, p1.tx_bytes) == (c1.rx_bytes, c1.tx_bytes)
    assert p1.allowed_ips == ("10.66.0.2/32", "fd66::2/128", "192.168.88.0/24")
    # The in-memory link's endpoint is a name, no address: no endpoint line.
    assert p1.endpoint is None
    p2 = by_key[specs[1].public_key]
    assert p2.last_handshake is None and (p2.rx_bytes, p2.tx_bytes) == (0, 0)
    assert p2.allowed_ips == ("10.66.0.3/32",)


def test_a_relay_answers_the_other_relays_of_its_mesh_with_their_routes() -> None:
    lan = ip_network("192.168.77.0/24")
    net = MeshLink({"A": (), "B": (lan,)})
    net.add_client("a1", "A", "10.66.0.2", "fd66::2")
    net.configure()
    relay_a, relay_b = net.relays["A"], net.relays["B"]
    answer = joined(asyncio.run(uapi.relay_answer(relay_a, KEY, 9621)))
    by_key = {p.public_key: p for p in pull_answer(answer).peers}
    b = relay_a.mesh_peer("B")
    assert b is not None and b.has_session
    mesh_b = by_key[relay_b.wg.public_key]
    assert mesh_b.allowed_ips == (str(lan),)
    assert mesh_b.persistent_keepalive == int(b.persistent_keepalive) > 0
    assert (mesh_b.rx_bytes, mesh_b.tx_bytes) == (b.rx_bytes, b.tx_bytes)
    assert mesh_b.last_handshake is not None
    assert net.clients["a1"].wg.public_key in by_key


def test_a_client_answers_its_relays_the_one_in_use_with_the_allowed_ips() -> None:
    net, _ = core_net()
    net.start("c1")
    client = net.clients["c1"]
    other = public_key(generate_private_key())
    client.wg.add_peer(other, endpoint=("192.0.2.9", 9621))  # a second relay, learnt
    allowed = ("10.66.0.0/24",)
    parts = asyncio.run(
        uapi.client_answer(
            list(client.wg.peers.values()), client.server, 5.0, KEY, 40000, 0x5154, allowed
        )
    )
    got = pull_answer(joined(parts))
    assert (got.listen_port, got.fwmark) == (40000, 0x5154)
    by_key = {p.public_key: p for p in got.peers}
    in_use = by_key[client.server.public_key]
    assert in_use.allowed_ips == allowed
    assert in_use.rx_bytes == client.server.rx_bytes > 0
    assert by_key[other].allowed_ips == () and by_key[other].endpoint == "192.0.2.9:9621"


def test_ten_thousand_peers_are_gathered_in_chunks_between_yields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop runs between chunks: a task that counts its turns gets one per chunk."""
    monkeypatch.setattr(uapi, "STATUS_CHUNK", 100)
    peers = [UapiPeer(bytes(32)) for _ in range(10_000)]

    async def scenario() -> tuple[int, list[str]]:
        turns = 0
        done = False

        async def count() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(count())
        await asyncio.sleep(0)
        parts = await uapi.gather(peers, push_peer)
        done = True
        await task
        return turns, parts

    turns, parts = asyncio.run(scenario())
    assert len(parts) == 10_000 // 100
    assert b"".join(parts) == "".join(map(push_peer, peers)).encode()
    assert turns >= 10_000 // 100 - 1


# --- the socket ----------------------------------------------------------------------


async def ask(path: Path, request: bytes, *, read_to_eof: bool = False) -> bytes:
    """Send `request`; what comes back up to the end of the first answer (the first
    blank line: an answer has none before its end), or everything to the end of the
    stream."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
    try:
        writer.write(request)
        await writer.drain()
        if read_to_eof:
            return await reader.read()
        return await reader.readuntil(b"\n\n")
    finally:
        writer.close()


def ask_raw(path: Path, request: bytes, *, end: bool = False) -> bytes:
    """Send `request` (and shut the sending side when `end`) from a plain blocking
    socket, as `wg` does, and read until the server closes.  A reset after the answer
    (the server closed with part of the request unread) ends the read, as it ends wg's
    after it read the answer: asyncio's reader would drop what it had buffered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(LIMIT)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(request)
            if end:
                s.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                data += chunk
        return data


@contextlib.asynccontextmanager
async def serving(
    path: Path, get: Callable[[], Awaitable[list[bytes]]] | None = None
) -> AsyncIterator[UapiServer]:
    async def default() -> list[bytes]:
        answer = _answer(UapiPeer(KEY, endpoint="192.0.2.1:9621"))
        return [answer.removesuffix("errno=0\n\n").encode()]

    server = UapiServer(path, get or default)
    assert await server.start()
    try:
        yield server
    finally:
        await server.close()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(LIMIT):
            await scenario()

    asyncio.run(bounded())


def test_get_is_answered_twice_on_one_connection_and_the_socket_is_private(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wireguard" / "gtuT0.sock"

    async def scenario() -> None:
        async with serving(path):
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            reader, writer = await asyncio.open_unix_connection(str(path))
            for _ in range(2):
                writer.write(b"get=1\n\n")
                data = await reader.readuntil(b"errno=0\n\n")
                assert pull_answer(data.decode()).peers[0].endpoint == "192.0.2.1:9621"
            writer.close()
        assert not path.exists()  # removed on close

    run(scenario)


def test_set_is_refused_with_eopnotsupp_and_the_connection_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gtuT0.sock"

    async def scenario() -> None:
        async with serving(path):
            got = await ask(path, b"set=1\nlisten_port=1\nreplace_peers=true\n\nget=1\n\n")
            assert got == f"errno={-95}\n\n".encode()
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"set=1\nprivate_key=00\n\nget=1\n\n")
            assert await reader.readuntil(b"\n\n") == b"errno=-95\n\n"
            assert (await reader.readuntil(b"errno=0\n\n")).startswith(b"private_key=")
            writer.close()

    with caplog.at_level(logging.WARNING, logger="gtun"):
        run(scenario)
    refusals = [r for r in caplog.records if "refused a `wg set`" in r.getMessage()]
    assert len(refusals) == 1 and "gtuT0" in refusals[0].getMessage()  # once a minute


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"hello\n", -71),  # not an operation: EPROTO
        (b"get=2\n\n", -71),
        (b"get=1\nX", -22),  # a trailing character after get=1: EINVAL, as wireguard-go
        (b"set=1\nno equals sign\n\n", -71),
        (b"get=1", None),  # ends in the middle of a line: answered EPROTO
    ],
)
def test_a_malformed_request_is_answered_with_an_errno_and_the_connection_closed(
    tmp_path: Path, request_bytes: bytes, code: int | None
) -> None:
    path = tmp_path / "gtuT0.sock"

    async def scenario() -> None:
        async with serving(path):
            end = code is None  # the request ends there
            got = await asyncio.to_thread(ask_raw, path, request_bytes, end=end)
            # To the end of the stream: the server closed the connection.
            assert got == f"errno={code if code is not None else -71}\n\n".encode()

    run(scenario)


def test_a_huge_request_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gtuT0.sock"
    monkeypatch.setattr(uapi, "MAX_SET", 64 * 1024)

    async def scenario() -> None:
        async with serving(path):
            # A line over MAX_LINE: refused once MAX_LINE is read, not after 16 MB.
            huge = b"get=" + b"1" * (16 * 1024 * 1024)
            assert await asyncio.to_thread(ask_raw, path, huge) == b"errno=-90\n\n"  # EMSGSIZE
            # A set of short lines over MAX_SET.
            lines = b"allowed_ip=10.0.0.0/8\n" * (1024 * 1024 // 22)
            got = await asyncio.to_thread(ask_raw, path, b"set=1\n" + lines)
            assert got == b"errno=-90\n\n"
            # And the server still answers.
            assert (await ask(path, b"get=1\n\n")).endswith(b"errno=0\n\n")

    run(scenario)


def test_idle_and_excess_connections_are_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gtuT0.sock"
    monkeypatch.setattr(uapi, "REQUEST_TIMEOUT", 0.5)

    async def scenario() -> None:
        async with serving(path):
            held = [
                await asyncio.open_unix_connection(str(path)) for _ in range(uapi.MAX_CONNECTIONS)
            ]
            await asyncio.sleep(0.1)
            # One too many: closed unanswered.
            assert await asyncio.to_thread(ask_raw, path, b"get=1\n\n") == b""
            # The idle ones are closed after REQUEST_TIMEOUT; then a request is served.
            start = time.monotonic()
            for r, w in held:
                assert await r.read() == b""
                w.close()
            assert time.monotonic() - start < 3
            assert (await ask(path, b"get=1\n\n")).endswith(b"errno=0\n\n")

    run(scenario)


def test_a_probe_that_connects_and_closes_is_harmless(tmp_path: Path) -> None:
    """`wg show` (all devices) connects to every socket and closes at once."""
    path = tmp_path / "gtuT0.sock"

    async def scenario() -> None:
        async with serving(path):
            for _ in range(3):
                _, writer = await asyncio.open_unix_connection(str(path))
                writer.close()
            assert (await ask(path, b"get=1\n\n")).endswith(b"errno=0\n\n")

    run(scenario)


def test_a_failing_answer_is_an_errno_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "gtuT0.sock"

    async def broken() -> list[bytes]:
        raise KeyError("a bug")

    async def scenario() -> None:
        async with serving(path, broken):
            assert await ask(path, b"get=1\n\n", read_to_eof=True) == b"errno=-55\n\n"

    run(scenario)


def test_a_stale_socket_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gtuT0.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening: as a SIGKILLed process leaves it
    dead.close()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe,
        pytest.raises(ConnectionRefusedError),
    ):
        probe.connect(str(path))

    async def scenario() -> None:
        async with serving(path):
            assert (await ask(path, b"get=1\n\n")).endswith(b"errno=0\n\n")

    with caplog.at_level(logging.INFO, logger="gtun"):
        run(scenario)
    assert any("nobody answered" in r.getMessage() for r in caplog.records)
    assert not path.exists()


def test_someone_elses_socket_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gtuT0.sock"

    async def scenario() -> None:
        async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\n\n")
            writer.write(b"errno=0\n\n")  # another program's device, no peers
            await writer.drain()
            writer.close()

        owner = await asyncio.start_unix_server(other, path=str(path))
        inode = os.lstat(path).st_ino
        try:
            server = UapiServer(path, _never)
            assert not await server.start()
            await server.close()  # nothing of ours to remove
            assert os.lstat(path).st_ino == inode
            assert await ask(path, b"get=1\n\n") == b"errno=0\n\n"  # still the other's
        finally:
            owner.close()
            await owner.wait_closed()

    with caplog.at_level(logging.WARNING, logger="gtun"):
        run(scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "answered by another process" in warnings[0]


async def _never() -> list[bytes]:
    raise AssertionError("not ours to answer")


def test_something_that_is_not_a_socket_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gtuT0.sock"
    path.write_text("not a socket")

    async def scenario() -> None:
        server = UapiServer(path, _never)
        assert not await server.start()
        await server.close()

    with caplog.at_level(logging.WARNING, logger="gtun"):
        run(scenario)
    assert path.read_text() == "not a socket"
    assert any("is not a socket" in r.getMessage() for r in caplog.records)


def test_on_exit_only_the_socket_made_is_removed(tmp_path: Path) -> None:
    """`wg` unlinks a socket it cannot connect to, and another process may make a new
    one at the same path: that one stays."""
    path = tmp_path / "gtuT0.sock"

    async def scenario() -> None:
        server = UapiServer(path, _never)
        assert await server.start()
        path.unlink()
        theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.bind(str(path))
        try:
            await server.close()
            assert path.exists()
        finally:
            theirs.close()

    run(scenario)


def test_no_directory_no_socket(tmp_path: Path) -> None:
    cleanups: list[str] = []

    async def scenario() -> None:
        got = await uapi.start_uapi(lambda what, undo: cleanups.append(what), None, "x", _never)
        assert got is None

    run(scenario)
    assert cleanups == []


# --- the config key ------------------------------------------------------------------


def test_the_uapi_key(tmp_path: Path) -> None:
    write = tmp_path / "k.key"
    write.write_text(encode_key(generate_private_key()) + "\n")
    write.chmod(0o600)
    server_key = encode_key(public_key(generate_private_key()))
    base_server = '[server]\nprivate_key_file = "k.key"\nnetwork = "10.66.0.0/24"\n'
    base_client = (
        f'[client]\nserver = "192.0.2.1:9621"\nserver_public_key = "{server_key}"\n'
        'private_key_file = "k.key"\n'
    )
    for base, load in ((base_server, load_server_config), (base_client, load_client_config)):
        cfg = tmp_path / "c.toml"
        cfg.write_text(base)
        assert load(cfg).uapi is True
        cfg.write_text(base + "uapi = false\n")
        assert load(cfg).uapi is False
        cfg.write_text(base + 'uapi = "no"\n')
        with pytest.raises(ConfigError, match=r"uapi.*boolean"):
            load(cfg)


# --- the daemons, in-process ---------------------------------------------------------


def test_the_daemons_serve_and_remove_their_sockets(tmp_path: Path) -> None:
    net = Net(tmp_path)
    relay_pf, client_pf = FakePlatform(), FakePlatform()
    relay_pf.wg_sockets = client_pf.wg_sockets = tmp_path / "wireguard"
    relay_sock, client_sock = tmp_path / "wireguard/gtr0.sock", tmp_path / "wireguard/gtc0.sock"

    async def scenario() -> None:
        async with configured(net, relay_pf, client_pf) as (server, client):
            await exchange(relay_pf, client_pf, b"hello")
            got = pull_answer((await ask(relay_sock, b"get=1\n\n")).decode())
            assert server.relay is not None
            assert got.private_key == net.keys["relay"] and got.listen_port == net.port
            [peer] = got.peers
            c1 = server.relay.peer_by_name("c1")
            assert c1 is not None and peer.public_key == c1.public_key
            assert peer.allowed_ips == ("10.66.0.2/32",)
            assert peer.endpoint is not None and peer.endpoint.startswith("127.0.0.1:")
            assert peer.rx_bytes == c1.rx_bytes > 0

            got = pull_answer((await ask(client_sock, b"get=1\n\n")).decode())
            assert got.private_key == net.keys["c1"]
            assert got.listen_port > 0 and got.fwmark == 0
            [relay] = got.peers
            assert relay.endpoint == f"127.0.0.1:{net.port}"
            assert relay.allowed_ips == ("10.66.0.0/24", "192.168.77.0/24")
            assert relay.last_handshake is not None
            assert abs(relay.last_handshake - time.time()) < LIMIT
        assert not relay_sock.exists() and not client_sock.exists()
        assert relay_pf.outstanding() == [] and client_pf.outstanding() == []

    try:
        run(scenario)
    finally:
        relay_pf.close_ends()
        client_pf.close_ends()


def test_uapi_false_makes_no_socket(tmp_path: Path) -> None:
    net = Net(tmp_path)
    for name, section in (("relay.toml", "[server]\n"), ("c1.toml", "[client]\n")):
        path = tmp_path / name
        path.write_text(path.read_text().replace(section, section + "uapi = false\n", 1))
    relay_pf, client_pf = FakePlatform(), FakePlatform()
    relay_pf.wg_sockets = client_pf.wg_sockets = tmp_path / "wireguard"

    async def scenario() -> None:
        async with configured(net, relay_pf, client_pf):
            assert not (tmp_path / "wireguard").exists()

    try:
        run(scenario)
    finally:
        relay_pf.close_ends()
        client_pf.close_ends()


# --- wireguard-tools' own wg ---------------------------------------------------------


def wg_unavailable() -> str | None:
    if shutil.which("wg") is None:
        return "needs wireguard-tools' wg"
    if os.geteuid() != 0:
        return "needs root: wg looks in /var/run/wireguard"
    return None


def wg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["wg", *args], capture_output=True, text=True, timeout=10)


@pytest.mark.skipif(wg_unavailable() is not None, reason=str(wg_unavailable()))
def test_wg_reads_the_answer(tmp_path: Path) -> None:
    """wg show DEVICE dump, wg show and wg showconf read IPv4, IPv6 and TCP endpoints,
    handshake times, transfer counters, keepalives, allowed IPs and the fwmark; wg set
    is refused with one clear line."""
    device = f"gtuU{secrets.token_hex(3)}"  # unique: /var/run/wireguard is shared
    path = uapi.UAPI_DIR / f"{device}.sock"
    private = generate_private_key()
    now = time.time()
    peers = [
        UapiPeer(
            public_key(generate_private_key()),
            endpoint="192.0.2.7:51820",
            last_handshake=now - 42.5,
            rx_bytes=123_456,
            tx_bytes=654_321,
            persistent_keepalive=25,
            allowed_ips=("10.66.0.2/32", "fd66::2/128", "192.168.88.0/24"),
        ),
        UapiPeer(
            public_key(generate_private_key()),
            endpoint="[2001:db8::7]:9621",
            last_handshake=now - 3,
            rx_bytes=1,
            tx_bytes=2,
            allowed_ips=("10.66.0.3/32",),
        ),
        UapiPeer(public_key(generate_private_key()), endpoint="198.51.100.4:40123"),  # TCP
        UapiPeer(public_key(generate_private_key())),  # never met
    ]

    async def get() -> list[bytes]:
        return [
            push_interface(private, 9621, 0x5154).encode(),
            *map(str.encode, map(push_peer, peers)),
        ]

    results: dict[str, subprocess.CompletedProcess[str]] = {}

    async def scenario() -> None:
        async with serving(path, get):
            for name, args in {
                "dump": ("show", device, "dump"),
                "show": ("show", device),
                "showconf": ("showconf", device),
                "set": ("set", device, "listen-port", "1"),
            }.items():
                results[name] = await asyncio.to_thread(wg, *args)

    run(scenario)
    assert not path.exists()
    dump = results["dump"]
    assert dump.returncode == 0, dump.stderr
    head, *rows = [line.split("\t") for line in dump.stdout.splitlines()]
    assert head == [encode_key(private), encode_key(public_key(private)), "9621", "0x5154"]
    assert len(rows) == len(peers)
    by_key = {row[0]: row for row in rows}
    for peer in peers:
        key, psk, endpoint, allowed, handshake, rx, tx, keepalive = by_key[
            encode_key(peer.public_key)
        ]
        assert psk == "(none)"
        assert endpoint == (peer.endpoint or "(none)")
        assert allowed == (",".join(peer.allowed_ips) or "(none)")
        assert int(handshake) == int(peer.last_handshake or 0)
        assert (int(rx), int(tx)) == (peer.rx_bytes, peer.tx_bytes)
        assert keepalive == (str(peer.persistent_keepalive) if peer.persistent_keepalive else "off")
    show = results["show"].stdout
    assert f"interface: {device}" in show and "fwmark: 0x5154" in show
    assert re.search(r"latest handshake: 4[2-9] seconds ago", show), show
    conf = results["showconf"].stdout
    assert f"PrivateKey = {encode_key(private)}" in conf and "ListenPort = 9621" in conf
    assert "FwMark = 0x5154" in conf and "Endpoint = [2001:db8::7]:9621" in conf
    assert results["set"].returncode != 0
    assert results["set"].stderr.strip() == "Unable to modify interface: Operation not supported"


def test_the_reader_agrees_with_a_live_answer_of_any_size() -> None:
    """The formatter's output for many peers reads back (the same code serves `wg`)."""
    peers = [
        UapiPeer(
            secrets.token_bytes(32),
            endpoint=f"10.0.{i // 256}.{i % 256}:{1024 + i}",
            last_handshake=1_700_000_000 + i,
            rx_bytes=i,
            tx_bytes=2 * i,
            allowed_ips=(f"10.66.{i // 256}.{i % 256}/32",),
        )
        for i in range(2000)
    ]
    got: Any = pull_answer(_answer(*peers))
    assert list(got.peers) == peers
