"""A gtun network in namespaces: a relay with a LAN host behind it and gtun clients,
each in its own namespace, running real `gtun` processes.  Used by `gtun demo`, the
tests and the benchmark.

    underlay: client i  <-- veth 10.<u>.<i>.0/24 -->  relay  <-- veth 192.168.77.0/24 --> lan
    overlay:  10.66.0.0/24 on the relay's TUN; the LAN is pushed as a route, NAT on.

Every address lives inside the lab's namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtun.app.control import query
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.errors import GtunError
from gtun.lab.netns import Lab, Namespace, python_env

PORT = 9621
GTUN = (sys.executable, "-m", "gtun")  # the command, run from this checkout
METRICS_PORT = 9622  # the relay's metrics_listen (127.0.0.1) when GtunNet(metrics=True)
CLIENT_METRICS_PORT = 9623  # each client's, on its own namespace's loopback
LAN_NET = "192.168.77"


@dataclass
class Node:
    ns: Namespace
    name: str
    key: bytes
    config: Path
    socket: Path
    log: Path
    underlay: str = ""
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def public(self) -> str:
        return encode_key(public_key(self.key))


def write_key(path: Path, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(encode_key(key) + "\n")


def set_config_keys(path: Path, section: str, keys: dict[str, str]) -> None:
    """Add `keys` (TOML values, already quoted) at the top of `[section]` of a config."""
    text = path.read_text()
    head = f"[{section}]\n"
    if head not in text:
        raise ValueError(f"{path} has no [{section}]")
    path.write_text(text.replace(head, head + "".join(f"{k} = {v}\n" for k, v in keys.items())))


def run_gtun(ns: Namespace, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a `gtun` command (status, doctor, ...) from this checkout in namespace `ns`;
    its exit code is the caller's to check."""
    return ns.run([*GTUN, *args], check=False, timeout=timeout, env=python_env())


def gtun_stdout(ns: Namespace, *args: str, timeout: float = 30) -> str:
    """What a `gtun` command prints in `ns`; raises RuntimeError, with its stderr, when
    it fails."""
    out = run_gtun(ns, *args, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(
            f"gtun {' '.join(args)} exited with {out.returncode}: {out.stderr.strip()}"
        )
    return out.stdout


def doctor_results(
    ns: Namespace, config: Path, *extra: str
) -> tuple[int, dict[str, dict[str, Any]]]:
    """`gtun doctor --json` in `ns`: (exit code, results by check name).  Raises
    RuntimeError when doctor itself failed (an exit code other than 0 or 1)."""
    out = run_gtun(ns, "doctor", "--json", "-c", str(config), *extra)
    if out.returncode not in (0, 1):
        raise RuntimeError(f"gtun doctor exited with {out.returncode}: {out.stderr.strip()}")
    return out.returncode, {r["check"]: r for r in json.loads(out.stdout)}


class GtunNet:
    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        *,
        clients: int = 2,
        underlay: int = 250,
        network: str = "10.66.0.0/24",
        lan: bool = True,
        nat: bool = True,
        extra_peers: str = "",
        debug: bool = False,
        metrics: bool = False,
        mode: str | None = None,
        network6: str | None = None,
    ) -> None:
        self.lab = lab
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network = network
        self.network6 = network6  # the relay's "network6" (IPv6 inside the tunnel), if set
        self.debug = debug
        self.metrics = metrics
        r = lab.add_ns("relay")
        self.relay = Node(
            r,
            "relay",
            generate_private_key(),
            self.dir / "server.toml",
            self.dir / "server.sock",
            self.dir / "server.log",
        )
        self.lan: Namespace | None = None
        if lan:
            self.lan = lab.add_ns("lan")
            lab.veth(r, "rlan", f"{LAN_NET}.1/24", self.lan, "lan0", f"{LAN_NET}.10/24")
            # No route back to the virtual network: replies reach clients only through NAT.
        self.clients: list[Node] = []
        for i in range(1, clients + 1):
            ns = lab.add_ns(f"c{i}")
            lab.veth(r, f"rc{i}", f"10.{underlay}.{i}.1/24", ns, "up0", f"10.{underlay}.{i}.2/24")
            node = Node(
                ns,
                f"c{i}",
                generate_private_key(),
                self.dir / f"c{i}.toml",
                self.dir / f"c{i}.sock",
                self.dir / f"c{i}.log",
                underlay=f"10.{underlay}.{i}.1",
            )
            self.clients.append(node)
        self._write_configs(nat=nat, lan=lan, extra_peers=extra_peers)
        if mode is not None:  # the relay's "mode" key ("tun" or "tap")
            text = self.relay.config.read_text()
            self.relay.config.write_text(
                text.replace("[server]\n", f'[server]\nmode = "{mode}"\n', 1)
            )

    def add_lan6(self, relay_address: str, lan_address: str) -> None:
        """IPv6 on the LAN link too: the relay's side and the LAN host (/64, no DAD)."""
        if self.lan is None:
            raise ValueError("this GtunNet has no LAN host")
        for ns, dev, addr in (
            (self.relay.ns, "rlan", relay_address),
            (self.lan, "lan0", lan_address),
        ):
            ns.sysctl(f"net.ipv6.conf.{dev}.disable_ipv6", 0)
            ns.run(["ip", "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad"])

    def _write_configs(self, *, nat: bool, lan: bool, extra_peers: str) -> None:
        r = self.relay
        write_key(self.dir / "server.key", r.key)
        routes = f'["{LAN_NET}.0/24"]' if lan else "[]"
        peers = "".join(
            f'\n[[peers]]\nname = "{c.name}"\npublic_key = "{c.public}"\n' for c in self.clients
        )
        r.config.write_text(
            "[server]\n"
            f'listen = "0.0.0.0:{PORT}"\n'
            'private_key_file = "server.key"\n'
            f'network = "{self.network}"\n'
            + (f'network6 = "{self.network6}"\n' if self.network6 else "")
            + 'device = "gtun0"\n'
            f"routes = {routes}\n"
            f"nat = {'true' if nat else 'false'}\n"
            f'state_dir = "{self.dir / "state"}"\n'
            f'control_socket = "{r.socket}"\n'
            + (f'metrics_listen = "127.0.0.1:{METRICS_PORT}"\n' if self.metrics else "")
            + peers
            + extra_peers
        )
        for c in self.clients:
            write_key(self.dir / f"{c.name}.key", c.key)
            c.config.write_text(
                "[client]\n"
                f'server = "{c.underlay}:{PORT}"\n'
                f'server_public_key = "{r.public}"\n'
                f'private_key_file = "{c.name}.key"\n'
                'device = "gtun0"\n'
                f'control_socket = "{c.socket}"\n'
                f'state_dir = "{self.dir / c.name}"\n'
                + (f'metrics_listen = "127.0.0.1:{CLIENT_METRICS_PORT}"\n' if self.metrics else "")
            )

    # --- processes ---------------------------------------------------------------------

    def _gtun(self, node: Node, role: str) -> None:
        cmd = list(GTUN)
        if self.debug:
            cmd.append("--debug")
        cmd += [role, "-c", str(node.config)]
        node.proc = node.ns.spawn(cmd, log_path=node.log)

    def start_relay(self, timeout: float = 10.0) -> None:
        self._gtun(self.relay, "server")
        self.wait_status(self.relay, lambda s: True, timeout, "relay to start")

    def start_all(self, clients: list[Node] | None = None, timeout: float = 20.0) -> None:
        """Start the relay, then `clients` (default: all), and wait until each client is
        configured."""
        clients = self.clients if clients is None else clients
        self.start_relay()
        for c in clients:
            self.start_client(c)
        for c in clients:
            self.wait_configured(c, timeout=timeout)

    def start_client(self, node: Node, transport: str | None = None) -> None:
        """Start `node`'s client; `transport` ("udp", "tcp", "auto") is written into its
        config first (None: leave the config as it is, UDP unless set before)."""
        if transport is not None:
            self.set_transport(node, transport)
        self._gtun(node, "client")

    def set_transport(self, node: Node, transport: str) -> None:
        lines = [
            line
            for line in node.config.read_text().splitlines()
            if not line.startswith("transport =")
        ]
        at = lines.index("[client]") + 1
        lines.insert(at, f'transport = "{transport}"')
        node.config.write_text("\n".join(lines) + "\n")
        node.extra["transport"] = transport

    def stop(self, node: Node, timeout: float = 10.0) -> int | None:
        proc = node.proc
        if proc is None:
            return None
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return None
        finally:
            node.proc = None

    def status(self, node: Node) -> dict[str, Any] | None:
        try:
            return query(node.socket, {"command": "status"}, timeout=2.0)
        except GtunError:
            return None

    def wait_status(self, node: Node, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.name} exited ({node.proc.returncode}) waiting for {what}:\n"
                    + self.log_tail(node)
                )
            st = self.status(node)
            if st is not None and cond(st):
                return st
            time.sleep(0.2)
        raise TimeoutError(
            f"timed out after {timeout:g}s waiting for {what}:\n{self.log_tail(node)}"
        )

    def wait_configured(self, node: Node, timeout: float = 20.0) -> str:
        st = self.wait_status(
            node, lambda s: s.get("address") is not None, timeout, f"{node.name} configured"
        )
        address = str(st["address"]).split("/")[0]
        node.extra["address"] = address
        if st.get("address6"):
            node.extra["address6"] = str(st["address6"]).split("/")[0]
        return address

    def log_tail(self, node: Node, lines: int = 30) -> str:
        try:
            text = node.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- traffic ------------------------------------------------------------------------

    def ping(self, ns: Namespace, address: str, count: int = 3, timeout: float = 30) -> float:
        """Average RTT in ms; raises RuntimeError when no reply came."""
        out = ns.run(
            ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", address],
            check=False,
            timeout=timeout,
        )
        for line in out.stdout.splitlines():
            if "min/avg/max" in line:
                return float(line.split("=")[1].split("/")[1])
        raise RuntimeError(f"ping {address} from {ns.name} failed:\n{out.stdout}{out.stderr}")

    def transfer(
        self,
        src: Namespace,
        dst: Namespace,
        address: str,
        size: int,
        port: int = 5201,
        timeout: float = 120,
    ) -> tuple[str, str, float]:
        """Send `size` random bytes over TCP to `address` (IPv4 or IPv6) within `timeout`
        seconds; (sent sha256, received sha256, seconds)."""
        bind = "::" if ":" in address else "0.0.0.0"
        receiver = dst.spawn(
            [sys.executable, "-c", _RECEIVER, str(port), bind], log_path=self.dir / "receiver.out"
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ss = dst.run(["ss", "-ltn", f"sport = :{port}"], check=False).stdout
                if f":{port}" in ss:
                    break
                time.sleep(0.1)
            started = time.monotonic()
            sent = src.run(
                [sys.executable, "-c", _SENDER, address, str(port), str(size)], timeout=timeout
            ).stdout.strip()
            receiver.wait(60)
            elapsed = time.monotonic() - started
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait(5)
        got = (self.dir / "receiver.out").read_text().strip().splitlines()
        received = got[-1] if got else ""
        return sent, received, elapsed


_RECEIVER = """
import hashlib, socket, sys
bind = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((bind, int(sys.argv[1]))); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(60); h = hashlib.sha256()
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b)
print(h.hexdigest(), flush=True)
"""

_SENDER = """
import hashlib, os, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=30); h = hashlib.sha256(); left = size
while left:
    b = os.urandom(min(left, 1 << 16)); h.update(b); s.sendall(b); left -= len(b)
s.shutdown(socket.SHUT_WR); s.recv(1); s.close(); print(h.hexdigest())
"""


def dump_status(node: Node) -> str:
    st = query(node.socket, {"command": "status"})
    return json.dumps(st, indent=2)


# --- checked transfers over long-lived agents ------------------------------------------
#
# GtunNet.transfer starts two processes per transfer.  A suite that moves many streams
# (both directions, IPv4 and IPv6, several paths, streams in parallel) instead starts one
# XferServer per namespace and runs each namespace's batch of jobs from one process.
# The server listens on "::" (IPv4 through mapped addresses) for TCP jobs and echoes UDP
# datagrams on the same port.
#
#   up:   the client sends b"U" + size (8 bytes BE) + `size` random bytes and half-closes;
#         the server answers with the byte count (8 bytes BE) and the SHA-256 of what came.
#   down: the client sends b"D" + size; the server sends `size` random bytes, then the
#         SHA-256 of what it sent, and closes.  A stream that carried a byte too many or
#         too few hashes wrong or ends early, and either way the job fails.

XFER_PORT = 5301


@dataclass(frozen=True)
class XferJob:
    """One TCP stream: `direction` "up" (client to server) or "down" (server to client)."""

    address: str
    direction: str
    size: int
    port: int = XFER_PORT


@dataclass(frozen=True)
class XferResult:
    job: XferJob
    sent: str  # SHA-256 of what the sending end sent
    received: str  # SHA-256 of what the receiving end received
    nbytes: int  # bytes the receiving end received
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.nbytes == self.job.size and self.sent == self.received

    def __str__(self) -> str:
        j = self.job
        state = "ok" if self.ok else f"FAILED ({self.error or 'checksum or length mismatch'})"
        return (
            f"{j.direction} {j.size} B with {j.address}: {state}, got {self.nbytes} B, "
            f"sent {self.sent[:16]} received {self.received[:16]}, {self.seconds:.2f} s"
        )


def start_xfer_server(
    ns: Namespace, log_path: Path, port: int = XFER_PORT, timeout: float = 10
) -> subprocess.Popen[bytes]:
    """Start the transfer and UDP-echo server in `ns`; returned once it listens.
    Raises RuntimeError when it does not within `timeout`."""
    proc = ns.spawn([sys.executable, "-c", _XFER_SERVER, str(port)], log_path=log_path)
    deadline = time.monotonic() + timeout
    while "ready" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"in {ns.name}: the transfer server did not start:\n"
                + log_path.read_text(errors="replace")
            )
        time.sleep(0.05)
    return proc


def run_xfers(
    ns: Namespace, jobs: list[XferJob], *, timeout: float | None = None
) -> list[XferResult]:
    """Run `jobs` from `ns` against XferServers, all at once (one thread each); results in
    the order of `jobs`.  A job that fails has `ok` False and says why in `error`.  The
    default `timeout` allows 60 s plus 2 s per 10 MB moved."""
    if timeout is None:
        timeout = 60 + sum(j.size for j in jobs) / 5e6
    spec = json.dumps([[j.address, j.port, j.direction, j.size] for j in jobs])
    out = ns.python(_XFER_CLIENT, spec, timeout=timeout)
    rows = json.loads(out.stdout)
    return [XferResult(job, *row) for job, row in zip(jobs, rows, strict=True)]


def udp_echo(
    ns: Namespace, address: str, sizes: list[int], *, port: int = XFER_PORT, tries: int = 3
) -> tuple[dict[int, int], int]:
    """Send a random datagram of each size in `sizes` from `ns` to an XferServer and check
    the echo byte for byte: ({size: attempts it took, 0 where no exact echo came in
    `tries` attempts of half a second each}, datagrams that came back matching nothing sent)."""
    bound = 10 + len(sizes) * tries * 0.5  # the waits for echoes, and some slack
    out = ns.python(
        _UDP_ECHO_CLIENT, address, str(port), json.dumps(sizes), str(tries), timeout=bound
    )
    answer = json.loads(out.stdout)
    return {int(k): v for k, v in answer["attempts"].items()}, int(answer["wrong"])


def ping_sizes(
    ns: Namespace, address: str, sizes: list[int], *, df: bool, count: int = 2, deadline: int = 3
) -> dict[int, str]:
    """Ping `address` from `ns` with each ICMP payload size (one ping process per size, all
    at once), with DF set (`-M do`) or letting the sender fragment (`-M dont`); {size:
    ping's summary line}, "" unless exactly `count` echoes were sent and each answered
    within `deadline` seconds, with data ping found right.

    `-w` rather than `-W`: once one reply has come, ping waits only two round trips for
    the rest, so `-W` reads a slow reply as a lost one.  Under `-w` ping sends another
    echo for each one lost, which the "sent" count then shows."""
    family = "-6" if ":" in address else "-4"
    procs = {}
    for size in sizes:
        cmd = [*ns.exec_prefix(), "ping", family, "-n", "-c", str(count), "-i", "0.05"]
        cmd += ["-w", str(deadline), "-M", "do" if df else "dont", "-s", str(size), address]
        procs[size] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    result: dict[int, str] = {}
    for size, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=deadline + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        summary = next((ln for ln in out.splitlines() if "received" in ln), "")
        good = summary.startswith(f"{count} packets transmitted, {count} received")
        result[size] = summary if good and "wrong data" not in out else ""
    return result


_XFER_SERVER = r"""
import hashlib, os, socket, struct, sys, threading
port = int(sys.argv[1])

def exact(c, n):
    buf = b""
    while len(buf) < n:
        b = c.recv(n - len(buf))
        if not b:
            raise OSError(f"stream ended after {len(buf)} of {n} header bytes")
        buf += b
    return buf

def serve(c):
    try:
        c.settimeout(60)
        head = exact(c, 9)
        mode, size = head[:1], struct.unpack("!Q", head[1:])[0]
        h, n = hashlib.sha256(), 0
        if mode == b"U":
            while b := c.recv(1 << 18):
                h.update(b); n += len(b)
            c.sendall(struct.pack("!Q", n) + h.digest())
        elif mode == b"D":
            while n < size:
                b = os.urandom(min(size - n, 1 << 16)); h.update(b); c.sendall(b); n += len(b)
            c.sendall(h.digest())
        print(mode.decode(), size, n, h.hexdigest(), flush=True)
    except OSError as e:
        print("error", e, flush=True)
    finally:
        c.close()

def echo(u):
    while True:
        data, addr = u.recvfrom(65535)
        u.sendto(data, addr)

s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("::", port)); s.listen(64)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); u.bind(("::", port))
threading.Thread(target=echo, args=(u,), daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

_XFER_CLIENT = r"""
import hashlib, json, os, socket, struct, sys, threading, time
jobs = json.loads(sys.argv[1])
results = [None] * len(jobs)

def exact(c, n):
    buf = b""
    while len(buf) < n:
        b = c.recv(n - len(buf))
        if not b:
            break
        buf += b
    return buf

def run(i, address, port, direction, size):
    h, n, sent, received, error = hashlib.sha256(), 0, "", "", None
    started = time.monotonic()
    try:
        c = socket.create_connection((address, port), timeout=30)
        c.settimeout(60)
        if direction == "up":
            c.sendall(b"U" + struct.pack("!Q", size))
            left = size
            while left:
                b = os.urandom(min(left, 1 << 16)); h.update(b); c.sendall(b); left -= len(b)
            c.shutdown(socket.SHUT_WR)
            answer = exact(c, 40)
            sent = h.hexdigest()
            if len(answer) != 40:
                error = f"no answer from the server ({len(answer)} bytes)"
            else:
                n, received = struct.unpack("!Q", answer[:8])[0], answer[8:].hex()
        else:
            c.sendall(b"D" + struct.pack("!Q", size))
            while n < size:
                b = c.recv(min(size - n, 1 << 18))
                if not b:
                    break
                h.update(b); n += len(b)
            received = h.hexdigest()
            digest = exact(c, 32)
            sent = digest.hex()
            if len(digest) != 32:
                error = f"stream ended after {n} of {size} bytes"
            elif c.recv(1):
                error = "bytes after the end of the stream"
        c.close()
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    results[i] = [sent, received, n, time.monotonic() - started, error]

threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results))
"""

_UDP_ECHO_CLIENT = r"""
import json, os, socket, sys
address, port, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
u = socket.socket(family, socket.SOCK_DGRAM); u.connect((address, port)); u.settimeout(0.5)
attempts, sent, wrong = {}, set(), 0
for size in json.loads(sys.argv[3]):
    attempts[size] = 0
    for attempt in range(1, tries + 1):
        data = os.urandom(size)
        sent.add(data)
        u.send(data)
        try:
            while (got := u.recv(65535)) != data:
                wrong += got not in sent  # else a late echo of an earlier attempt
        except TimeoutError:
            continue
        attempts[size] = attempt
        break
print(json.dumps({"attempts": attempts, "wrong": wrong}))
"""


# --- stock WireGuard peers (wireguard-go) ---------------------------------------------

# [Interface] keys of wg-quick that `wg setconf` does not take.
WG_QUICK_ONLY = {"address", "dns", "mtu", "table", "preup", "postup", "predown", "postdown",
                 "saveconfig"}  # fmt: skip


def split_wg_quick(text: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """(what `wg setconf` takes, wg-quick-only [Interface] keys, all AllowedIPs)."""
    out: list[str] = []
    iface: dict[str, list[str]] = {}
    allowed: list[str] = []
    section = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            section = line.lower()
            out.append(line)
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        lkey = key.lower()
        values = [v.strip() for v in value.split(",") if v.strip()]
        if section == "[interface]" and lkey in WG_QUICK_ONLY:
            iface.setdefault(lkey, []).extend(values)
            continue
        if section == "[peer]" and lkey == "allowedips":
            allowed.extend(values)
        out.append(f"{key} = {value}")
    return "\n".join(out) + "\n", iface, allowed


def apply_wg_quick(ns: Namespace, ifname: str, wg_quick: str, conf_path: Path) -> list[str]:
    """Apply a wg-quick configuration (as `gtun peer add` prints it) to WireGuard
    interface `ifname` in `ns` the way wg-quick does: `wg setconf` with the wg-quick-only
    keys stripped, then its addresses, MTU, link up and a route per AllowedIPs.  Returns
    the AllowedIPs."""
    setconf, iface, allowed = split_wg_quick(wg_quick)
    fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(setconf)
    ns.run(["wg", "setconf", ifname, str(conf_path)])
    for address in iface.get("address", []):
        ns.run(["ip", "addr", "add", address, "dev", ifname, *(["nodad"] * (":" in address))])
    for mtu in iface.get("mtu", []):
        ns.run(["ip", "link", "set", ifname, "mtu", mtu])
    ns.run(["ip", "link", "set", ifname, "up"])
    for net in allowed:
        # `replace`: the Address's own prefix route may already cover it.
        ns.run(["ip", "route", "replace", net, "dev", ifname])
    return allowed
