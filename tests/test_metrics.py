"""Prometheus metrics: the collector over real cores (tier 1), the HTTP endpoint on
loopback (tier 2), and real relay and client processes in namespaces whose counters
move as traffic and drops happen (tier 3).
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import gtun
from gtun.app import metrics
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.metrics import ClientCollector, MetricsServer, RelayCollector, make_registry
from gtun.core.client import CLIENT_DROP_REASONS, ClientCore
from gtun.core.packet import build_icmp_echo
from gtun.core.relay import RELAY_DROP_REASONS, PeerSpec, Relay
from gtun.core.wg.device import DROP_REASONS
from gtun.errors import ConfigError
from gtun.io.tcp import TCP_DROP_REASONS
from gtun.lab.net import CLIENT_METRICS_PORT, METRICS_PORT, PORT, GtunNet, write_key
from gtun.lab.netns import Lab, Namespace
from gtun.testing.link import CoreLink, relay_settings
from labkit import hold_port, run_gtun, run_python

UNDERLAY = 236  # 10.236.x.x inside this module's namespaces

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (name, labels); the text must parse."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


# --- tier 1: the collector over real cores ----------------------------------------------


class Link(CoreLink):
    """A relay at "R" and gtun clients at their names, datagrams delivered until quiet."""

    def __init__(self) -> None:
        super().__init__(
            Relay(
                secrets.token_bytes(32),
                relay_settings(),
                wall_offset=1_700_000_000.0,
            ),
            now=500.0,
        )
        specs = []
        for i, name in enumerate(("c1", "c2"), start=2):
            client = self.add_client(
                name, ClientCore(secrets.token_bytes(32), self.relay.wg.public_key, "R")
            )
            specs.append(PeerSpec(name, client.wg.public_key, IPv4Address(f"10.66.0.{i}")))
        self.relay.set_peers(specs)

    def key(self, name: str) -> str:
        return encode_key(self.clients[name].wg.public_key)


def scrape(collector: metrics.GtunCollector) -> Samples:
    return parse(generate_latest(make_registry(collector)).decode())


def test_relay_metrics_follow_the_cores_counters() -> None:
    link = Link()
    collector = RelayCollector(link.relay, link.clock)
    before = scrape(collector)
    c1 = {"peer": "c1", "public_key": link.key("c1")}
    c2 = {"peer": "c2", "public_key": link.key("c2")}
    assert value(before, "gtun_peers") == 2
    assert value(before, "gtun_peers_connected") == 0
    assert value(before, "gtun_peer_handshakes_total", **c1) == 0
    assert value(before, "gtun_peer_last_handshake_seconds", **c1) == 0
    assert value(before, "gtun_peer_connected", **c1) == 0
    info = value(
        before,
        "gtun_info",
        role="relay",
        public_key=encode_key(link.relay.wg.public_key),
        version=gtun.__version__,
    )
    assert info == 1

    link.start()
    link.now += 1
    ping = build_icmp_echo("10.66.0.2", "10.66.0.3", 7, 1, b"hello")
    for _ in range(3):
        link.clients["c1"].tun_packet(ping, link.now)
    link.pump()
    after = scrape(collector)
    assert value(after, "gtun_peers_connected") == 2
    assert value(after, "gtun_peer_handshakes_total", **c1) == 1
    assert value(after, "gtun_peer_last_handshake_seconds", **c1) == 1_700_000_500.0
    assert value(after, "gtun_peer_connected", **c1) == 1
    # The values are the cores' own counters, read at scrape time.
    p1 = link.relay.peer_by_name("c1")
    assert p1 is not None
    assert value(after, "gtun_peer_rx_bytes_total", **c1) == p1.rx_bytes > 0
    assert value(after, "gtun_peer_tx_bytes_total", **c1) == p1.tx_bytes > 0
    # c1's three pings, its config request and its first path MTU probe; c2 got the
    # three pings, its config and the answer to its probe.
    assert value(after, "gtun_peer_rx_packets_total", **c1) == p1.rx_packets == 5
    assert value(after, "gtun_peer_tx_packets_total", **c2) == 5

    # Drops: spoofed (relay layer and per peer), garbage (WireGuard layer).
    spoof = build_icmp_echo("10.66.0.3", "10.66.0.2", 1, 1, b"spoof")  # c1 claims c2
    link.clients["c1"].tun_packet(spoof, link.now)
    link.pump()
    for junk in (b"", b"\x07junk", b"\x01" + bytes(147)):
        link.relay.receive_datagram(junk, "X", link.now)
    dropped = scrape(collector)
    assert value(dropped, "gtun_drops_total", layer="relay", reason="spoofed") == 1
    assert value(dropped, "gtun_peer_drops_total", reason="spoofed", **c1) == 1
    assert value(dropped, "gtun_peer_drops_total", reason="spoofed", **c2) == 0
    assert value(dropped, "gtun_drops_total", layer="wireguard", reason="malformed") == 2
    assert value(dropped, "gtun_drops_total", layer="wireguard", reason="mac1") == 1

    # Past REJECT_AFTER_TIME without a handshake a peer no longer counts as connected.
    link.now += 181
    stale = scrape(collector)
    assert value(stale, "gtun_peers_connected") == 0
    assert value(stale, "gtun_peer_connected", **c2) == 0
    assert value(stale, "gtun_peers") == 2


def test_every_drop_reason_is_exported_from_the_start() -> None:
    link = Link()
    relay = scrape(RelayCollector(link.relay, link.clock))
    for reason in DROP_REASONS:
        assert value(relay, "gtun_drops_total", layer="wireguard", reason=reason) == 0
    for reason in RELAY_DROP_REASONS:
        assert value(relay, "gtun_drops_total", layer="relay", reason=reason) == 0
    for name in ("c1", "c2"):
        for reason in metrics.PEER_DROP_REASONS:
            assert reason in RELAY_DROP_REASONS
            labels = {"peer": name, "public_key": link.key(name), "reason": reason}
            assert value(relay, "gtun_peer_drops_total", **labels) == 0
    client = scrape(ClientCollector(link.clients["c1"], link.clock))
    for reason in CLIENT_DROP_REASONS:
        assert value(client, "gtun_drops_total", layer="client", reason=reason) == 0


def test_tcp_counters_are_a_layer_of_their_own() -> None:
    link = Link()
    counts = dict.fromkeys(TCP_DROP_REASONS, 0)
    collector = RelayCollector(link.relay, link.clock, lambda: counts)
    for reason in TCP_DROP_REASONS:
        assert value(scrape(collector), "gtun_drops_total", layer="tcp", reason=reason) == 0
    counts["tcp_bad_frame"] += 3
    assert value(scrape(collector), "gtun_drops_total", layer="tcp", reason="tcp_bad_frame") == 3
    client = ClientCollector(link.clients["c1"], link.clock, lambda: {"tcp_stalled": 2})
    assert value(scrape(client), "gtun_drops_total", layer="tcp", reason="tcp_stalled") == 2


def test_peers_follow_a_reload() -> None:
    link = Link()
    collector = RelayCollector(link.relay, link.clock)
    c2 = link.relay.peer_by_name("c2")
    assert c2 is not None
    link.relay.set_peers([c2.data.spec])
    samples = scrape(collector)
    assert value(samples, "gtun_peers") == 1
    assert not any(dict(labels).get("peer") == "c1" for _, labels in samples)


def test_client_metrics() -> None:
    link = Link()
    client = link.clients["c1"]
    collector = ClientCollector(client, link.clock)
    relay = {"peer": "relay", "public_key": encode_key(link.relay.wg.public_key)}
    before = scrape(collector)
    assert value(before, "gtun_connected") == 0 and value(before, "gtun_configured") == 0
    assert value(before, "gtun_peers") == 1 and value(before, "gtun_peers_connected") == 0
    link.start()
    client.tun_packet(b"\x45junk", link.now)  # not an IP packet it can send
    after = scrape(collector)
    assert value(after, "gtun_connected") == 1 and value(after, "gtun_configured") == 1
    assert value(after, "gtun_peers_connected") == 1
    assert value(after, "gtun_peer_handshakes_total", **relay) == 1
    assert value(after, "gtun_peer_tx_bytes_total", **relay) == client.server.tx_bytes > 0
    # The pushed config, and the answer to the client's first path MTU probe.
    assert value(after, "gtun_peer_rx_packets_total", **relay) == 2
    assert value(after, "gtun_drops_total", layer="client", reason="not_ip") == 1
    assert not any(name == "gtun_peer_drops_total" for name, _ in after)


# --- tier 2: the HTTP endpoint on loopback ----------------------------------------------


async def _exchange(port: int, request: bytes, *, timeout: float = 10.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _serve(test: object) -> None:
    """Run `test(server)` against an endpoint on 127.0.0.1 (a free port)."""

    async def main() -> None:
        link = Link()
        registry = make_registry(RelayCollector(link.relay, link.clock))
        server = MetricsServer(registry, "127.0.0.1", 0)
        await server.start()
        try:
            await test(server)  # type: ignore[operator]
        finally:
            server.close()
            await asyncio.sleep(0.05)

    asyncio.run(main())


def test_endpoint_serves_metrics_and_404() -> None:
    async def check(server: MetricsServer) -> None:
        port = server.address[1]
        code, headers, body = _split(
            await _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        )
        assert code == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert int(headers["content-length"]) == len(body)
        samples = parse(body.decode())
        assert value(samples, "gtun_peers") == 2
        assert any(name == "process_cpu_seconds_total" for name, _ in samples)
        code, _, body = _split(await _exchange(port, b"GET /metrics?x=1 HTTP/1.0\n\n"))
        assert code == 200 and b"gtun_peers 2.0" in body
        code, headers, body = _split(await _exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
        assert code == 200 and body == b"" and int(headers["content-length"]) > 0
        code, _, _ = _split(await _exchange(port, b"GET / HTTP/1.1\r\n\r\n"))
        assert code == 404
        code, _, _ = _split(await _exchange(port, b"GET /metricsx HTTP/1.1\r\n\r\n"))
        assert code == 404
        code, headers, _ = _split(await _exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n"))
        assert code == 405 and headers["allow"] == "GET, HEAD"

    _serve(check)


def test_endpoint_survives_garbage() -> None:
    async def check(server: MetricsServer) -> None:
        port = server.address[1]
        for junk in (
            b"\x00\x01\x02\xff garbage\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET /metr\xc3\xa9s HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n",  # cut short: the client closes its side
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(junk)
            writer.write_eof()
            response = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await writer.wait_closed()
            assert _split(response)[0] == 400, junk
        # A head larger than the bound: refused without reading it all.
        huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        assert _split(await _exchange(port, huge))[0] == 400
        many = b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: aaaaaaaa\r\n" * 1000 + b"\r\n"
        assert _split(await _exchange(port, many))[0] == 400
        # Still serving.
        assert _split(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200

    _serve(check)


def test_endpoint_times_out_a_silent_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.3)

    async def check(server: MetricsServer) -> None:
        port = server.address[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and then nothing
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
        assert time.monotonic() - started < 5
        writer.close()
        await writer.wait_closed()
        assert _split(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200

    _serve(check)


def test_endpoint_bounds_its_connections() -> None:
    async def check(server: MetricsServer) -> None:
        port = server.address[1]
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
        await asyncio.sleep(0.1)
        try:
            # One more than MAX_CONNECTIONS: closed at once, unanswered (a reset, as
            # the request was not read).
            try:
                answer = await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n", timeout=2)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
        finally:
            for _, writer in silent:
                writer.close()
                await writer.wait_closed()
        await asyncio.sleep(0.1)
        assert _split(await _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200

    assert metrics.MAX_CONNECTIONS == 16
    _serve(check)


def test_endpoint_port_in_use_is_a_config_error() -> None:
    async def main() -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        try:
            link = Link()
            server = MetricsServer(
                make_registry(RelayCollector(link.relay, link.clock)),
                "127.0.0.1",
                port,
                config_file="server.toml",
                key="server.metrics_listen",
            )
            with pytest.raises(ConfigError) as info:
                await server.start()
        finally:
            holder.close()
        text = str(info.value)
        assert text.startswith("server.toml: server.metrics_listen: ")
        assert f"127.0.0.1:{port}" in text and "in use" in text
        assert isinstance(info.value.__cause__, OSError)
        assert info.value.__cause__.errno == errno.EADDRINUSE

    asyncio.run(main())


# --- tier 3: real processes in namespaces -----------------------------------------------


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_gtun_exits_2_when_the_metrics_port_is_taken(tmp_path: Path) -> None:
    write_key(tmp_path / "server.key", generate_private_key())
    write_key(tmp_path / "c.key", generate_private_key())
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        "[server]\n"
        'listen = "127.0.0.1:9621"\n'
        'private_key_file = "server.key"\n'
        'network = "10.66.0.0/24"\n'
        f'metrics_listen = "127.0.0.1:{METRICS_PORT}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'control_socket = "{tmp_path / "server.sock"}"\n'
    )
    client_toml = tmp_path / "client.toml"
    client_toml.write_text(
        "[client]\n"
        'server = "127.0.0.1:9621"\n'
        f'server_public_key = "{encode_key(public_key(generate_private_key()))}"\n'
        'private_key_file = "c.key"\n'
        f'metrics_listen = "127.0.0.1:{METRICS_PORT}"\n'
        f'control_socket = "{tmp_path / "client.sock"}"\n'
    )
    with Lab(f"gtm{secrets.token_hex(2)}") as lab:
        ns = lab.add_ns("a")
        hold_port(ns, "tcp", METRICS_PORT, tmp_path / "holder.log")
        server = run_gtun(ns, "server", "-c", str(server_toml))
        client = run_gtun(ns, "client", "-c", str(client_toml))
        links = ns.run(["ip", "-o", "link"]).stdout
    assert server.returncode == 2, server.stderr
    line = _one_line(server)
    assert "server.metrics_listen" in line and str(METRICS_PORT) in line and "in use" in line
    assert client.returncode == 2, client.stderr
    line = _one_line(client)
    assert "client.metrics_listen" in line and str(METRICS_PORT) in line and "in use" in line
    assert "gtun0" not in links
    assert not (tmp_path / "server.sock").exists() and not (tmp_path / "client.sock").exists()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GtunNet]:
    with Lab(f"gtm{secrets.token_hex(2)}") as lab:
        gnet = GtunNet(
            lab, tmp_path_factory.mktemp("metrics"), underlay=UNDERLAY, lan=False, metrics=True
        )
        gnet.start_all()
        yield gnet


_FETCH = """
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10) as r:
    sys.stdout.write(r.read().decode())
"""


def fetch(ns: Namespace, port: int) -> Samples:
    return parse(run_python(ns, _FETCH, str(port), timeout=20).stdout)


def wait_for(ns: Namespace, port: int, cond: object, what: str, timeout: float = 10) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = fetch(ns, port)
        if cond(samples):  # type: ignore[operator]
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


_SPOOF = """
import socket, sys
from gtun.core.packet import build_icmp_echo
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.SOL_IP, socket.IP_HDRINCL, 1)
for i in range(5):
    s.sendto(build_icmp_echo(sys.argv[1], sys.argv[2], 99, i, b"spoofed"), (sys.argv[2], 0))
"""

_GARBAGE = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(10):
    s.sendto(b"\\x07 not wireguard", (sys.argv[1], int(sys.argv[2])))  # unknown type
    s.sendto(b"\\x01" + bytes(147), (sys.argv[1], int(sys.argv[2])))  # initiation, bad mac1
    time.sleep(0.01)
"""


def test_counters_move_with_traffic_and_drops(net: GtunNet) -> None:
    c1, c2 = net.clients
    relay_ns = net.relay.ns
    peer = {n.name: {"peer": n.name, "public_key": n.public} for n in net.clients}
    to_relay = {"peer": "relay", "public_key": net.relay.public}

    before = fetch(relay_ns, METRICS_PORT)
    client_before = fetch(c1.ns, CLIENT_METRICS_PORT)
    assert value(before, "gtun_peers") == 2 and value(before, "gtun_peers_connected") == 2
    for name in ("c1", "c2"):
        assert value(before, "gtun_peer_handshakes_total", **peer[name]) >= 1
        assert value(before, "gtun_peer_last_handshake_seconds", **peer[name]) > 1e9
    assert value(client_before, "gtun_connected") == 1
    assert value(client_before, "gtun_configured") == 1
    assert value(client_before, "gtun_peer_handshakes_total", **to_relay) >= 1

    # Traffic: ten pings from c1 to c2 through the relay.
    net.ping(c1.ns, c2.extra["address"], count=10)
    after = fetch(relay_ns, METRICS_PORT)
    client_after = fetch(c1.ns, CLIENT_METRICS_PORT)
    for name, metric in (("c1", "rx"), ("c2", "tx"), ("c2", "rx"), ("c1", "tx")):
        grew = value(after, f"gtun_peer_{metric}_packets_total", **peer[name]) - value(
            before, f"gtun_peer_{metric}_packets_total", **peer[name]
        )
        assert grew >= 10, (name, metric, grew)
        grew = value(after, f"gtun_peer_{metric}_bytes_total", **peer[name]) - value(
            before, f"gtun_peer_{metric}_bytes_total", **peer[name]
        )
        assert grew >= 10 * 84, (name, metric, grew)  # each ping: 84 bytes inside
    for metric in ("tx_packets", "rx_packets"):
        name = f"gtun_peer_{metric}_total"
        assert value(client_after, name, **to_relay) - value(client_before, name, **to_relay) >= 10

    # Garbage datagrams to the relay's UDP port: counted by the WireGuard layer.
    def wg(samples: Samples, reason: str) -> float:
        return value(samples, "gtun_drops_total", layer="wireguard", reason=reason)

    run_python(c1.ns, _GARBAGE, c1.underlay, str(PORT))
    garbage = wait_for(
        relay_ns,
        METRICS_PORT,
        lambda s: (
            wg(s, "malformed") >= wg(before, "malformed") + 10
            and wg(s, "mac1") >= wg(before, "mac1") + 10
        ),
        "the garbage to be counted",
    )
    assert wg(garbage, "malformed") == wg(before, "malformed") + 10
    assert wg(garbage, "mac1") == wg(before, "mac1") + 10

    # A spoofed inner source from c1: counted by the relay, in total and for c1.
    def spoofed(samples: Samples, name: str | None = None) -> float:
        if name is None:
            return value(samples, "gtun_drops_total", layer="relay", reason="spoofed")
        return value(samples, "gtun_peer_drops_total", reason="spoofed", **peer[name])

    run_python(c1.ns, _SPOOF, "10.66.0.250", c2.extra["address"])
    dropped = wait_for(
        relay_ns,
        METRICS_PORT,
        lambda s: spoofed(s) >= spoofed(before) + 5,
        "the spoofed packets to be counted",
    )
    assert spoofed(dropped) == spoofed(before) + 5
    assert spoofed(dropped, "c1") == spoofed(before, "c1") + 5
    assert spoofed(dropped, "c2") == spoofed(before, "c2")

    # `gtun status` shows the same counters, in total and per peer.
    def gtun_status(*args: str) -> str:
        out = run_gtun(net.relay.ns, "status", *args, "-s", str(net.relay.socket))
        assert out.returncode == 0, out.stderr
        return out.stdout

    status = gtun_status()
    total = int(spoofed(dropped))
    assert f"spoofed {total}" in status.split("drops:", 1)[1].splitlines()[0], status
    assert f"drops from c1: spoofed {int(spoofed(dropped, 'c1'))}" in status, status
    assert "drops from c2" not in status, status
    st = json.loads(gtun_status("--json"))
    assert st["drops"]["spoofed"] == total
    assert st["drops"]["mac1"] == wg(dropped, "mac1")
    assert next(p for p in st["peers"] if p["name"] == "c1")["drops"]["spoofed"] == total


def test_relay_metrics_name_mesh_relays() -> None:
    """Another relay of the mesh is a peer without a PeerSpec: a scrape names it."""
    from gtun.core.relay import MeshRelay

    relay = Relay(generate_private_key(), relay_settings())
    relay.set_peers([PeerSpec("c1", public_key(generate_private_key()), IPv4Address("10.66.0.2"))])
    relay.set_mesh([MeshRelay("other", public_key(generate_private_key()), ("127.0.0.1", 9))])
    text = generate_latest(make_registry(RelayCollector(relay, time.monotonic))).decode()
    assert 'peer="relay other"' in text and 'peer="c1"' in text
