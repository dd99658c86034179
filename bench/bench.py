#!/usr/bin/env python3
"""Throughput, latency and CPU cost of gtun next to raw veth, wireguard-go, OpenVPN and
tinc, in one run.

Run as root:

    python3 bench/bench.py [--seconds 10] [--runs 3] [--paths veth,wireguard-go,...]
                           [--json out.json] [--markdown [FILE]] [--profile DIR]
    python3 bench/bench.py --verify-gb 1G

It builds network namespaces (prefix "gtb", underlay addresses in 10.240.0.0/16), sets up
every selected path in its own namespaces, and then measures them one at a time, round
after round (`--runs`, paths interleaved in each round so that drift hits them all):

  - iperf3, one TCP stream and four (-P 4), receiver's rate in Mbit/s;
  - ping RTT idle (`--pings` pings) and under load (pings every 0.2 s during the
    one-stream run), median of the replies;
  - CPU seconds per GB moved: the utime + stime (/proc/PID/task/*/stat) of the tunnel's
    own processes (wireguard-go, openvpn, tincd, the gtun relay and clients) during the
    iperf3 run, divided by the bytes iperf3 received.  Not counted: iperf3 itself, and
    the kernel's softirq work (veth, the TUN, the UDP/TCP stack), which the kernel does
    not attribute to a process; the JSON has the machine-wide softirq seconds per GB as
    `softirq_s_per_gb`, which includes whatever else runs on the machine.

The table shows medians (JSON: every sample, min and max), and each path's throughput as
a ratio to the fastest peer for the same stream count: wireguard-go, OpenVPN or tinc for
the point-to-point rows, OpenVPN client-to-client or a wireguard-go hub for the
client-to-client rows.  A path that fails to set up or to measure says "failed: reason";
the others still run.  Every namespace and process is removed at the end, also on
Ctrl-C or failure.  Outside the namespaces only wireguard-go's control sockets under
/var/run/wireguard (removed at the end) and a temporary directory are touched.

Paths (`--paths` takes these keys, comma-separated):
  veth              two namespaces joined by a veth pair
  wireguard-go      wireguard-go <-> wireguard-go over a veth
  openvpn           OpenVPN 2.6 over UDP, AES-256-GCM, TLS with throwaway certificates
                    made with openssl at bench time, DCO off; client -> server
                    (`--server ... --topology subnet --dh none --data-ciphers AES-256-GCM
                    --disable-dco`; clients `--client --remote-cert-tls server`)
  tinc              tinc 1.0, router mode, its default cipher (1.0: Blowfish-CBC with
                    HMAC-SHA1), keys from `tincd -K`; node -> node
  gtun-udp          a gtun client to the relay's own tunnel address, over UDP
  gtun-tcp          the same over gtun's TCP transport
  gtun-c2c          a gtun client through the relay to another gtun client (UDP)
  openvpn-c2c       an OpenVPN client through a `client-to-client` server to another
  wireguard-go-hub  a wireguard-go client through a wireguard-go hub (ip_forward on in
                    the hub's namespace) to another

`--verify-gb SIZE` measures nothing: it pushes SIZE random bytes over TCP through each
gtun path (UDP and TCP client -> relay, client -> client) over IPv4 and IPv6 inside the
tunnel, compares SHA-256 at both ends and prints a pass/fail table with durations (which
include making the random bytes and hashing them in Python at both ends).  The relay gets
`network6 = "fd24:240::/64"` for it; otherwise gtun runs with its own config defaults.

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import ipaddress
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if importlib.util.find_spec("gtun") is None:  # running from a source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import gtun  # noqa: E402
from gtun.lab.net import GtunNet  # noqa: E402
from gtun.lab.netns import Lab, Namespace, list_namespaces  # noqa: E402

PREFIX = "gtb"
UNDERLAY = 240  # 10.240.0.0/16; GtunNet puts client i's underlay on 10.240.<i>.0/24
GTUN_NETWORK = "10.240.200.0/24"
GTUN_NETWORK6 = "fd24:240::/64"
VETH_NET = "10.240.101"  # raw veth path
WG_UNDERLAY = "10.240.102"  # the veth under the two wireguard-go instances
WG_TUNNEL = "10.240.103"  # wireguard-go's tunnel addresses
OVPN_UNDERLAY = "10.240.104"
OVPN_TUNNEL = "10.240.105"
TINC_UNDERLAY = "10.240.106"
TINC_TUNNEL = "10.240.107"
OVPN_C2C_UNDERLAY = ("10.240.108", "10.240.109")
OVPN_C2C_TUNNEL = "10.240.110"
HUB_UNDERLAY = ("10.240.111", "10.240.112")
HUB_TUNNEL = "10.240.113"
WG_PORT = 51820
OVPN_PORT = 1194
TINC_PORT = 655
WG_RUN_DIR = Path("/var/run/wireguard")  # wireguard-go's UAPI sockets; shared by namespaces
IPERF_PORT = 5201
VERIFY_PORT = 5202
LOAD_PING_INTERVAL = 0.2


@dataclass(frozen=True)
class PathSpec:
    key: str
    label: str
    group: str  # "base", "peer", "gtun", "peer-c2c" or "gtun-c2c"


PATHS = [
    PathSpec("veth", "veth", "base"),
    PathSpec("wireguard-go", "wireguard-go", "peer"),
    PathSpec("openvpn", "OpenVPN (UDP, AES-256-GCM)", "peer"),
    PathSpec("tinc", "tinc", "peer"),
    PathSpec("gtun-udp", "gtun client->relay (UDP)", "gtun"),
    PathSpec("gtun-tcp", "gtun client->relay (TCP)", "gtun"),
    PathSpec("openvpn-c2c", "OpenVPN client->client", "peer-c2c"),
    PathSpec("wireguard-go-hub", "wireguard-go hub client->client", "peer-c2c"),
    PathSpec("gtun-c2c", "gtun client->client (UDP)", "gtun-c2c"),
]
BY_KEY = {p.key: p for p in PATHS}

# Bounds on every wait (seconds).
LISTEN_TIMEOUT = 10.0
START_TIMEOUT = 20.0
CONFIGURE_TIMEOUT = 30.0
PING_SLACK = 15.0
IPERF_SLACK = 30.0

METRICS = ("mbit1", "mbit4", "rtt_idle", "rtt_load", "cpu_gb1", "cpu_gb4")


@dataclass
class Result:
    key: str
    label: str
    group: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)  # retransmits, softirq, ...
    cpu_pct: dict[str, float] = field(default_factory=dict)  # last 1-stream run, per process
    errors: list[str] = field(default_factory=list)
    setup_error: str | None = None

    def add(self, metric: str, value: float | None, table: str = "samples") -> None:
        if value is not None:
            getattr(self, table).setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.samples.get(metric)
        return statistics.median(values) if values else None

    def p90(self, metric: str) -> float | None:
        """The 90th percentile of an `extra` series (every ping under load of every
        run): the spread the median hides.  None with fewer than two values."""
        values = self.extra.get(metric) or []
        if len(values) < 2:
            return None
        return statistics.quantiles(values, n=10, method="inclusive")[-1]

    def failed(self) -> str | None:
        """Why this path has no figures at all, or None."""
        if self.setup_error is not None:
            return f"setup: {self.setup_error}"
        if not self.samples.get("mbit1") and not self.samples.get("mbit4"):
            return self.errors[-1] if self.errors else "no measurement"
        return None

    def as_json(self) -> dict[str, Any]:
        stats = {
            m: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
            for m, v in {**self.samples, **self.extra}.items()
            if v
        }
        return {
            "key": self.key,
            "label": self.label,
            "group": self.group,
            "figures": stats,
            "cpu_pct_last_run": self.cpu_pct,
            "errors": self.errors,
            "failed": self.failed(),
        }


@dataclass
class Setup:
    """A path ready to measure: traffic from `src` to `address` (in `dst`)."""

    src: Namespace
    dst: Namespace
    address: str
    pids: dict[str, int] = field(default_factory=dict)  # the tunnel's processes


# --- measurements ---------------------------------------------------------------------------

_TIME = re.compile(r"time[=<]([0-9.]+) ms")


def rtts(text: str) -> list[float]:
    return [float(m.group(1)) for m in _TIME.finditer(text)]


def ping(src: Namespace, address: str, count: int, interval: float) -> float:
    """Median RTT in ms of `count` pings; RuntimeError when none came back."""
    out = src.run(
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", address],
        check=False,
        timeout=count * interval + PING_SLACK,
    )
    got = rtts(out.stdout)
    if not got:
        raise RuntimeError(f"ping {address} from {src.name} failed: {out.stdout}{out.stderr}")
    return statistics.median(got)


def warm_up(src: Namespace, address: str, timeout: float = 20.0) -> None:
    """Ping until one reply comes (completes handshakes); RuntimeError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = src.run(["ping", "-n", "-c", "1", "-W", "1", address], check=False, timeout=5)
        if out.returncode == 0:
            return
    raise RuntimeError(f"no ping reply from {address} in {src.name} after {timeout:g} s")


def first_answer(ns: Namespace, address: str, deadline: float) -> float | None:
    """Ping `address` every 0.1 s or so until one answer; the time it came (monotonic),
    or None at `deadline`."""
    while time.monotonic() < deadline:
        if ns.run(["ping", "-n", "-c", "1", "-W", "0.2", address], check=False).returncode == 0:
            return time.monotonic()
        time.sleep(0.05)
    return None


def wait_listening(ns: Namespace, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"iperf3 server in {ns.name} exited with {proc.returncode}")
        ss = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if f":{port}" in ss:
            return
        time.sleep(0.1)
    raise RuntimeError(f"iperf3 server in {ns.name} not listening after {LISTEN_TIMEOUT:g} s")


def iperf_client_cmd(
    address: str, seconds: int, streams: int, congestion: str | None = None
) -> list[str]:
    """The iperf3 client's command line (`-C`: the sender's congestion control)."""
    # fmt: off
    cmd = ["iperf3", "-J", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds),
           "-P", str(streams), "--connect-timeout", "5000"]
    # fmt: on
    return cmd + (["-C", congestion] if congestion else [])


def iperf(
    src: Namespace,
    dst: Namespace,
    address: str,
    seconds: int,
    log_dir: Path,
    streams: int = 1,
    on_start: Callable[[], None] | None = None,
    congestion: str | None = None,
) -> dict[str, Any]:
    """`streams` TCP streams from `src` to `address` (in `dst`) for `seconds`; iperf3's
    JSON.  `on_start` is called just before the client starts; `congestion`: the
    sender's TCP congestion control (None: the namespace's default)."""
    server = dst.spawn(
        ["iperf3", "-s", "-1", "-B", address, "-p", str(IPERF_PORT)],
        log_path=log_dir / f"iperf3-server-{dst.name}.log",
    )
    try:
        wait_listening(dst, IPERF_PORT, server)
        if on_start is not None:
            on_start()
        cmd = iperf_client_cmd(address, seconds, streams, congestion)
        out = src.run(cmd, check=False, timeout=seconds + IPERF_SLACK)
        try:
            report: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(
                f"iperf3 from {src.name} gave no JSON (exit {out.returncode}): "
                f"{out.stderr.strip() or out.stdout.strip()}"
            ) from None
        if "error" in report:
            raise RuntimeError(f"iperf3 from {src.name} to {address}: {report['error']}")
        return report
    finally:
        if server.poll() is None:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(5)


class LoadPings:
    """Pings every LOAD_PING_INTERVAL from `src` to `address` while a load of `seconds`
    runs: start() (an iperf() on_start), then stop(), which gives the RTTs in ms."""

    def __init__(self, src: Namespace, address: str, seconds: float, log: Path) -> None:
        self.src, self.address, self.seconds, self.log = src, address, seconds, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.write_bytes(b"")
        # fmt: off
        cmd = ["ping", "-n", "-i", str(LOAD_PING_INTERVAL), "-W", "2",
               "-w", str(int(self.seconds) + 5), self.address]
        # fmt: on
        self.proc = self.src.spawn(cmd, log_path=self.log)

    def stop(self) -> list[float]:
        proc = self.proc
        if proc is None:
            return []
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        try:
            return rtts(self.log.read_text(errors="replace"))
        except OSError:
            return []


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each thread of `pid`, keyed "tid name"; {} if gone."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (task / "stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                # utime and stime are fields 14 and 15 of proc(5), 12 and 13 after ")".
                out[f"{task.name} {name}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def softirq_seconds() -> float:
    """Machine-wide softirq CPU seconds so far (/proc/stat), all CPUs."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu "):
                return int(line.split()[7]) / CLK_TCK
    return 0.0


class CpuMeter:
    """CPU use of some processes between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, dict[str, float]] = {}
        self.softirq_before = 0.0
        self.started = 0.0
        self.threads: dict[str, dict[str, float]] = {}  # % of one CPU, per thread
        self.seconds: dict[str, float] = {}  # CPU seconds per process
        self.softirq = 0.0
        self.wall = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        self.softirq_before = softirq_seconds()
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        """% of one CPU per process; CPU seconds are left in `self.seconds`, per-thread
        figures in `self.threads`."""
        self.wall = wall = time.monotonic() - self.started
        self.softirq = softirq_seconds() - self.softirq_before
        totals = {}
        for name, pid in self.pids.items():
            after, before = cpu_seconds(pid), self.before.get(name, {})
            used = {t: max(0.0, s - before.get(t, 0.0)) for t, s in after.items()}
            self.seconds[name] = sum(used.values())
            self.threads[name] = {t: round(100 * s / wall, 1) for t, s in used.items()}
            totals[name] = round(100 * self.seconds[name] / wall, 1)
        return totals


def measure_round(result: Result, setup: Setup, args: argparse.Namespace, log_dir: Path) -> None:
    """One round on one path: idle ping, one stream with pings alongside, four streams."""
    src, dst, address = setup.src, setup.dst, setup.address
    try:
        warm_up(src, address)
        result.add("rtt_idle", ping(src, address, args.pings, args.ping_interval))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        result.errors.append(f"ping: {e}")
        return
    ping_log = log_dir / f"ping-load-{result.key}.log"
    for streams in (1, 4):
        meter = CpuMeter(setup.pids)
        pings = LoadPings(src, address, args.seconds, ping_log) if streams == 1 else None

        def start(meter: CpuMeter = meter, pings: LoadPings | None = pings) -> None:
            meter.start()
            if pings is not None:
                pings.start()

        try:
            report = iperf(
                src, dst, address, args.seconds, log_dir, streams, start, args.congestion
            )
            meter.stop()
            end = report["end"]
            received = end["sum_received"]
            result.add(f"mbit{streams}", received["bits_per_second"] / 1e6)
            result.add(f"retransmits{streams}", end["sum_sent"].get("retransmits"), "extra")
            gb = received["bytes"] / 1e9
            if setup.pids and gb > 0:
                result.add(f"cpu_gb{streams}", sum(meter.seconds.values()) / gb)
                if streams == 1:
                    result.cpu_pct = {
                        n: round(100 * s / meter.wall, 1) for n, s in meter.seconds.items()
                    }
            if gb > 0:
                result.add(f"softirq_s_per_gb{streams}", meter.softirq / gb, "extra")
        except (RuntimeError, subprocess.TimeoutExpired, KeyError) as e:
            result.errors.append(f"{streams} stream(s): {type(e).__name__}: {e}")
        finally:
            got = pings.stop() if pings is not None else []
        if got:
            result.add("rtt_load", statistics.median(got))
            result.extra.setdefault("rtt_load_pings", []).extend(got)  # the spread: p90


# --- the paths ------------------------------------------------------------------------------


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} after {timeout:g} s")
        time.sleep(0.05)


def check_alive(procs: dict[str, subprocess.Popen[bytes]], logs: dict[str, Path]) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = " | ".join(logs[name].read_text(errors="replace").splitlines()[-3:])
            raise RuntimeError(f"{name} exited with {proc.returncode}: {tail}")


def setup_veth(lab: Lab, workdir: Path) -> Setup:
    a, b = lab.add_ns("va"), lab.add_ns("vb")
    lab.veth(a, "v0", f"{VETH_NET}.1/24", b, "v0", f"{VETH_NET}.2/24")
    return Setup(a, b, f"{VETH_NET}.2")


# wireguard-go


def _wg_key(ns: Namespace) -> tuple[str, str]:
    private = ns.run(["wg", "genkey"]).stdout.strip()
    public = ns.run(["wg", "pubkey"], input=private + "\n").stdout.strip()
    return private, public


@dataclass
class WgNode:
    ns: Namespace
    ifname: str
    private: str
    public: str
    underlay: str
    tunnel: str  # "address/prefix"


class WireGuardGo:
    """wireguard-go instances; interface names are unique per run (the UAPI socket
    directory is shared by all namespaces) and start with the bench's prefix."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.names: list[str] = []
        self.tag = os.getpid() % 100000

    def start(self, ns: Namespace, suffix: str, underlay: str, tunnel: str) -> tuple[WgNode, int]:
        ifname = f"{PREFIX}{self.tag}{suffix}"
        sock = WG_RUN_DIR / f"{ifname}.sock"
        if sock.exists():
            raise RuntimeError(f"{sock} exists; another wireguard-go?")
        self.names.append(ifname)
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        log = self.workdir / f"{ifname}.log"
        proc = ns.spawn(["wireguard-go", "-f", ifname], log_path=log, env=env)
        wait_for(
            lambda: sock.exists() or proc.poll() is not None,
            START_TIMEOUT,
            f"wireguard-go {ifname} in {ns.name}: no {sock}",
        )
        check_alive({"wireguard-go": proc}, {"wireguard-go": log})
        return WgNode(ns, ifname, *_wg_key(ns), underlay, tunnel), proc.pid

    def configure(self, node: WgNode, peers: list[tuple[WgNode, str]]) -> None:
        """Set `node`'s key and its peers ((peer, allowed-ips)), address it, bring it up."""
        key_file = self.workdir / f"{node.ifname}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(node.private + "\n")
        cmd = ["wg", "set", node.ifname, "listen-port", str(WG_PORT), "private-key", str(key_file)]
        for peer, allowed in peers:
            # fmt: off
            cmd += ["peer", peer.public, "endpoint", f"{peer.underlay}:{WG_PORT}",
                    "allowed-ips", allowed]
            # fmt: on
        node.ns.run(cmd)
        node.ns.run(["ip", "addr", "add", node.tunnel, "dev", node.ifname])
        node.ns.run(["ip", "link", "set", node.ifname, "up"])
        wait_tun_up(node.ns, node.ifname)

    def remove_sockets(self) -> None:
        for ifname in self.names:  # a killed wireguard-go leaves its socket behind
            with contextlib.suppress(OSError):
                (WG_RUN_DIR / f"{ifname}.sock").unlink()


def wait_tun_up(ns: Namespace, ifname: str) -> None:
    """Wait for `ifname`'s UP flag (a TUN's operstate stays UNKNOWN)."""

    def up() -> bool:
        link = json.loads(ns.run(["ip", "-j", "link", "show", ifname]).stdout)[0]
        return "UP" in link.get("flags", []) and link.get("operstate") in ("UP", "UNKNOWN")

    wait_for(up, START_TIMEOUT, f"in {ns.name}: {ifname} not up")


def setup_wireguard_go(lab: Lab, wg: WireGuardGo) -> Setup:
    a, b = lab.add_ns("wa"), lab.add_ns("wb")
    lab.veth(a, "u0", f"{WG_UNDERLAY}.1/24", b, "u0", f"{WG_UNDERLAY}.2/24")
    na, pa = wg.start(a, "a", f"{WG_UNDERLAY}.1", f"{WG_TUNNEL}.1/24")
    nb, pb = wg.start(b, "b", f"{WG_UNDERLAY}.2", f"{WG_TUNNEL}.2/24")
    wg.configure(na, [(nb, f"{WG_TUNNEL}.2/32")])
    wg.configure(nb, [(na, f"{WG_TUNNEL}.1/32")])
    return Setup(a, b, f"{WG_TUNNEL}.2", {"wireguard-go a": pa, "wireguard-go b": pb})


def setup_wireguard_go_hub(lab: Lab, wg: WireGuardGo) -> Setup:
    """Clients a and b each peer with the hub only; the hub forwards between them."""
    hub, a, b = lab.add_ns("wh"), lab.add_ns("wha"), lab.add_ns("whb")
    (ua, ub), t = HUB_UNDERLAY, HUB_TUNNEL
    lab.veth(hub, "ua", f"{ua}.1/24", a, "u0", f"{ua}.2/24")
    lab.veth(hub, "ub", f"{ub}.1/24", b, "u0", f"{ub}.2/24")
    hub.sysctl("net.ipv4.ip_forward", 1)  # in the hub's namespace only
    hub.sysctl("net.ipv4.conf.all.send_redirects", 0)  # a and b must not bypass the hub
    nh, ph = wg.start(hub, "h", f"{ua}.1", f"{t}.1/24")  # reached by a on ua, b on ub
    na, pa = wg.start(a, "c", f"{ua}.2", f"{t}.2/24")
    nb, pb = wg.start(b, "d", f"{ub}.2", f"{t}.3/24")
    wg.configure(nh, [(na, f"{t}.2/32"), (nb, f"{t}.3/32")])
    hub_for_b = WgNode(hub, nh.ifname, nh.private, nh.public, f"{ub}.1", nh.tunnel)
    wg.configure(na, [(nh, f"{t}.0/24")])
    wg.configure(nb, [(hub_for_b, f"{t}.0/24")])
    pids = {"wireguard-go hub": ph, "wireguard-go a": pa, "wireguard-go b": pb}
    return Setup(a, b, f"{t}.3", pids)


# OpenVPN


def make_pki(directory: Path, names: list[str]) -> None:
    """A throwaway CA and an EC certificate per name ("server" gets serverAuth, the
    others clientAuth), made with openssl in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        out = subprocess.run(
            ["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeError(f"openssl {args[0]}: {out.stderr.strip()}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    # fmt: off
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=gtun-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    # fmt: on
    for name in names:
        usage = "serverAuth" if name == "server" else "clientAuth"
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyAgreement\n"
            f"extendedKeyUsage={usage}\n"
        )
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        # fmt: off
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                "-extfile", f"{name}.ext")
        # fmt: on


OVPN_COMMON = ["--dev", "gtbovpn0", "--dev-type", "tun", "--proto", "udp4",
               "--data-ciphers", "AES-256-GCM", "--disable-dco", "--verb", "3"]  # fmt: skip
OVPN_READY = "Initialization Sequence Completed"


def setup_openvpn(
    lab: Lab, workdir: Path, tag: str, underlays: list[str], tunnel: str, c2c: bool
) -> Setup:
    """An OpenVPN server and one client per underlay network; traffic from the first
    client to the server (one client) or to the second client (`c2c`)."""
    pki = workdir / f"pki-{tag}"
    clients = [f"client{i}" for i in range(1, len(underlays) + 1)]
    make_pki(pki, ["server", *clients])
    server = lab.add_ns(f"{tag}s")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}

    def cert(name: str) -> list[str]:
        return ["--ca", str(pki / "ca.crt"), "--cert", str(pki / f"{name}.crt"),
                "--key", str(pki / f"{name}.key")]  # fmt: skip

    # fmt: off
    cmd = ["openvpn", *OVPN_COMMON, "--server", f"{tunnel}.0", "255.255.255.0",
           "--topology", "subnet", "--port", str(OVPN_PORT), "--dh", "none",
           "--keepalive", "10", "60", *cert("server")]
    # fmt: on
    if c2c:
        cmd.append("--client-to-client")
    nss = []
    for i, net in enumerate(underlays, start=1):
        ns = lab.add_ns(f"{tag}{i}")
        lab.veth(server, f"u{i}", f"{net}.1/24", ns, "u0", f"{net}.2/24")
        nss.append(ns)
    logs["openvpn server"] = workdir / f"{tag}-server.log"
    procs["openvpn server"] = server.spawn(cmd, log_path=logs["openvpn server"])
    for i, (ns, net) in enumerate(zip(nss, underlays, strict=True), start=1):
        # fmt: off
        ccmd = ["openvpn", *OVPN_COMMON, "--client", "--remote", f"{net}.1", str(OVPN_PORT),
                "--nobind", "--remote-cert-tls", "server", *cert(f"client{i}")]
        # fmt: on
        name = f"openvpn client{i}"
        logs[name] = workdir / f"{tag}-client{i}.log"
        procs[name] = ns.spawn(ccmd, log_path=logs[name])

    def ready() -> bool:
        check_alive(procs, logs)
        return all(
            OVPN_READY in logs[n].read_text(errors="replace") for n in procs if "client" in n
        )

    wait_for(ready, START_TIMEOUT, f"{tag}: OpenVPN clients not connected")
    pids = {n: p.pid for n, p in procs.items()}
    if not c2c:
        return Setup(nss[0], server, f"{tunnel}.1", pids)
    return Setup(nss[0], nss[1], tun_address(nss[1], "gtbovpn0"), pids)


def tun_address(ns: Namespace, ifname: str) -> str:
    info = json.loads(ns.run(["ip", "-j", "-4", "addr", "show", ifname]).stdout)
    for a in info[0].get("addr_info", []):
        return str(a["local"])
    raise RuntimeError(f"in {ns.name}: {ifname} has no IPv4 address")


# tinc


def setup_tinc(lab: Lab, workdir: Path) -> Setup:
    a, b = lab.add_ns("ta"), lab.add_ns("tb")
    lab.veth(a, "u0", f"{TINC_UNDERLAY}.1/24", b, "u0", f"{TINC_UNDERLAY}.2/24")
    nodes = [("a", a, 1), ("b", b, 2)]
    for name, ns, i in nodes:
        conf = workdir / f"tinc-{name}"
        (conf / "hosts").mkdir(parents=True, exist_ok=True)
        (conf / "tinc.conf").write_text(
            f"Name = {name}\nInterface = gtbtinc0\nAddressFamily = ipv4\nMode = router\n"
            + ("ConnectTo = b\n" if name == "a" else "")
        )
        (conf / "hosts" / name).write_text(
            f"Address = {TINC_UNDERLAY}.{i}\nPort = {TINC_PORT}\nSubnet = {TINC_TUNNEL}.{i}/32\n"
        )
        up = conf / "tinc-up"
        up.write_text(
            f"#!/bin/sh\nip addr add {TINC_TUNNEL}.{i}/24 dev $INTERFACE\n"
            "ip link set $INTERFACE up\n"
        )
        up.chmod(0o755)
        # stdin not a terminal: tincd -K takes the default file names without asking.
        ns.run(["tincd", "-c", str(conf), "-K", "2048"], input="")
    for name, _, _ in nodes:  # each node needs the other's host file (address, key)
        other = "b" if name == "a" else "a"
        host = (workdir / f"tinc-{other}" / "hosts" / other).read_text()
        (workdir / f"tinc-{name}" / "hosts" / other).write_text(host)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    # b first, up (tinc-up has run) before a connects to it: a refused first connection
    # would make a wait for its retry.
    for name, ns, _ in reversed(nodes):
        conf = workdir / f"tinc-{name}"
        logs[f"tincd {name}"] = workdir / f"tinc-{name}.log"
        procs[f"tincd {name}"] = ns.spawn(
            ["tincd", "-c", str(conf), "-D", "-d", "1", f"--pidfile={conf / 'tinc.pid'}"],
            log_path=logs[f"tincd {name}"],
        )

        def addressed(ns: Namespace = ns) -> bool:
            check_alive(procs, logs)
            return _has_addr(ns, "gtbtinc0")

        wait_for(addressed, START_TIMEOUT, f"tinc {name}: gtbtinc0 not addressed")
    return Setup(a, b, f"{TINC_TUNNEL}.2", {n: p.pid for n, p in procs.items()})


def _has_addr(ns: Namespace, ifname: str) -> bool:
    out = ns.run(["ip", "-j", "-4", "addr", "show", ifname], check=False)
    if out.returncode != 0:
        return False
    info = json.loads(out.stdout or "[]")
    return bool(info and info[0].get("addr_info"))


# gtun


def setup_gtun(lab: Lab, workdir: Path) -> GtunNet:
    net = GtunNet(
        lab,
        workdir / "gtun",
        clients=3,
        underlay=UNDERLAY,
        network=GTUN_NETWORK,
        network6=GTUN_NETWORK6,
        lan=False,
        nat=False,
    )
    net.set_transport(net.clients[2], "tcp")  # c3 measures the TCP transport
    net.start_all(timeout=CONFIGURE_TIMEOUT)
    return net


def relay_address(net: GtunNet, version: int = 4) -> str:
    network = net.network if version == 4 else net.network6
    assert network is not None
    return str(next(ipaddress.ip_network(network).hosts()))


def gtun_setups(net: GtunNet) -> dict[str, Setup]:
    c1, c2, c3 = net.clients
    pids = {f"gtun {n.name}": n.proc.pid for n in (net.relay, *net.clients) if n.proc is not None}
    relay = relay_address(net)
    return {
        "gtun-udp": Setup(c1.ns, net.relay.ns, relay, pids),
        "gtun-tcp": Setup(c3.ns, net.relay.ns, relay, pids),
        "gtun-c2c": Setup(c1.ns, c2.ns, c2.extra["address"], pids),
    }


# --- profiling ------------------------------------------------------------------------------


# The profiles --profile writes: (file name, which gtun node, which path).
PROFILES = (
    ("relay-client-to-client.txt", "relay", "client-to-client"),
    ("relay-client-to-relay-udp.txt", "relay", "client-to-relay (UDP)"),
    ("client-client-to-relay-udp.txt", "client", "client-to-relay (UDP)"),
)


def py_spy() -> str:
    """py-spy: beside this Python (a virtualenv's bin, often not on PATH under sudo),
    else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else "py-spy"


def profile_node(
    pid: int,
    who: str,
    path: str,
    src: Namespace,
    dst: Namespace,
    address: str,
    args: argparse.Namespace,
    workdir: Path,
) -> str:
    """Run py-spy on gtun process `pid` (the `who` of `path`) during one more iperf3
    from `src` to `address`; its summary.

    A separate run, so that sampling (which pauses the process) leaves the table alone.
    """
    raw = workdir / f"{who}.raw"
    duration = max(1, args.seconds - 1)
    rate = 100
    spies: list[subprocess.Popen[str]] = []

    def start() -> None:
        # fmt: off
        cmd = [py_spy(), "record", "--format", "raw", "--function", "--threads", "-r", str(rate),
               "-d", str(duration), "-o", str(raw), "--pid", str(pid)]
        # fmt: on
        spies.append(
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )

    mbit: float | None = None
    error = ""
    meter = CpuMeter({who: pid})

    def started() -> None:
        meter.start()
        start()

    try:
        try:
            warm_up(src, address)
            report = iperf(src, dst, address, args.seconds, workdir, 1, started, args.congestion)
            meter.stop()
            mbit = report["end"]["sum_received"]["bits_per_second"] / 1e6
        except (RuntimeError, subprocess.TimeoutExpired, KeyError) as e:
            error = str(e)
        if not spies:
            raise RuntimeError(f"no profile: {error}")
        _, err = spies[0].communicate(timeout=duration + 30)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)
    if spies[0].returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spies[0].returncode}): {err.strip()}")
    return summarize_raw(raw, duration, rate, mbit, meter.threads.get(who, {}), who, path)


def summarize_raw(
    raw: Path,
    duration: int,
    rate: int,
    mbit: float | None,
    cpu: dict[str, float],
    who: str = "relay",
    path: str = "client-to-client",
    top: int = 10,
) -> str:
    """Top functions by own and by total samples from py-spy's collapsed stacks.

    Expects `--threads`: each stack starts with a "thread (0x...)" frame.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    per_thread: Counter[str] = Counter()
    trunk: dict[str, Counter[str]] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        while frames and frames[0].startswith(("thread ", "process ")):
            thread = frames.pop(0)
        if not frames:
            continue
        samples += count
        per_thread[thread] += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
            trunk.setdefault(thread, Counter())[f] += count
    if samples == 0:
        return f"py-spy recorded no non-idle samples of the {who}\n"
    # Frames under which (nearly) all of a thread's samples sit say nothing: main(), the loop.
    boring = {f for t, c in trunk.items() for f, n in c.items() if n >= 0.98 * per_thread[t]}

    def table(counter: Counter[str], skip: set[str] = set()) -> list[str]:  # noqa: B006
        rows = [(f, n) for f, n in counter.most_common() if f not in skip][:top]
        return [f"{n:7d} {100 * n / samples:5.1f}%  {frame}" for frame, n in rows]

    throughput = "failed" if mbit is None else f"{mbit:.0f} Mbit/s"
    lines = [
        f"py-spy record --format raw --function --threads on the gtun {who} during a",
        f"{path} iperf3 run ({throughput} while sampled; py-spy pauses the",
        f"{who} at each sample).",
        f"{samples} non-idle samples in {duration} s at {rate} Hz; per thread "
        "(100% = always runnable):",
        *(f"  {100 * n / (duration * rate):5.1f}%  {t}" for t, n in per_thread.most_common()),
        f"CPU actually used by each {who} thread during the iperf3 run, from /proc",
        "(100% = one CPU):",
        *(f"  {pct:5.1f}%  {t}" for t, pct in sorted(cpu.items(), key=lambda kv: -kv[1])),
        "py-spy counts a thread as busy when the kernel has it runnable, also while it",
        "waits for a CPU, and an idle thread blocked in a C call (queue.get, epoll_wait)",
        "can be counted busy under its Python caller: trust the /proc figures for load.",
        "",
        f"Top {top} by own time (samples, share of all non-idle samples, function (file:line)):",
        *table(own),
        "",
        f"Top {top} by total time (including callees; the always-present trunk left out):",
        *table(total, boring),
    ]
    return "\n".join(lines) + "\n"


# --- report ---------------------------------------------------------------------------------


def first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return ((out.stdout or out.stderr).splitlines() or ["unknown"])[0].strip()


def environment() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "kernel": platform.release(),
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "gtun": getattr(gtun, "__version__", "unknown"),
        "wireguard_go": first_line(["wireguard-go", "--version"]),
        # Its first line goes on with build flags: "OpenVPN 2.6.14 x86_64-pc-linux-gnu [SSL ...".
        "openvpn": " ".join(first_line(["openvpn", "--version"]).split()[:2]),
        "tinc": first_line(["tincd", "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "iperf3": first_line(["iperf3", "--version"]),
    }


HEADERS = [
    "path",
    "1 stream Mbit/s",
    "x peer",
    "4 streams Mbit/s",
    "x peer",
    "RTT idle ms",
    "RTT load ms",
    "RTT load p90 ms",
    "CPU s/GB 1",
    "CPU s/GB 4",
]
FAIL_WIDTH = 70


def best_peer(results: list[Result], group: str, metric: str) -> float | None:
    """The fastest peer's median for `metric`: among the client-to-client peers for a
    client-to-client row, else among the point-to-point peers."""
    peers = "peer-c2c" if group.endswith("c2c") else "peer"
    values = [m for r in results if r.group == peers and (m := r.median(metric)) is not None]
    return max(values) if values else None


def rows(results: list[Result], width: int | None = FAIL_WIDTH) -> list[list[str]]:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    out = []
    for r in results:
        failed = r.failed()
        if failed is not None:
            text = f"failed: {failed}".replace("\n", " ").replace("|", "/")
            if width is not None and len(text) > width:
                text = text[: width - 3] + "..."
            out.append([r.label, text] + ["-"] * (len(HEADERS) - 2))
            continue
        row = [r.label]
        for metric in ("mbit1", "mbit4"):
            value, base = r.median(metric), best_peer(results, r.group, metric)
            ratio = None if value is None or not base else value / base
            row += [num(value, ".0f"), num(ratio, ".2f")]
        row += [num(r.median("rtt_idle"), ".3f"), num(r.median("rtt_load"), ".2f")]
        row += [num(r.p90("rtt_load_pings"), ".2f")]
        row += [num(r.median("cpu_gb1"), ".1f"), num(r.median("cpu_gb4"), ".1f")]
        out.append(row)
    return out


def text_table(results: list[Result]) -> str:
    body = rows(results)
    # A failure's text spans the figure columns, so it does not set their width.
    widths = [
        max(len(row[i]) for row in [HEADERS, *body] if i == 0 or not row[1].startswith("failed"))
        for i in range(len(HEADERS))
    ]

    def fmt(row: list[str]) -> str:
        if row[1].startswith("failed"):
            return f"{row[0].ljust(widths[0])}  {row[1]}"
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(HEADERS), fmt(["-" * w for w in widths]), *map(fmt, body)])


def method_lines(env: dict[str, Any], args: argparse.Namespace) -> list[str]:
    return [
        f"Medians of {args.runs} run(s) in one invocation, paths interleaved in each round.  "
        f'iperf3 TCP, {args.seconds} s per run, receiver\'s rate; "x peer" is the ratio to the '
        "fastest of wireguard-go, OpenVPN and tinc for the same stream count (client-to-client "
        "rows: to the fastest of OpenVPN client-to-client and a wireguard-go hub).  "
        f"RTT idle: median of {args.pings} pings {args.ping_interval} s apart; RTT load: median "
        f"of pings every {LOAD_PING_INTERVAL} s during the one-stream run (p90: the 90th "
        "percentile of all of them, every run together).  CPU s/GB: user + "
        "system CPU seconds of the tunnel's own processes (wireguard-go, openvpn, tincd, the "
        "gtun relay and clients) per GB received; softirq work and iperf3 are not counted.",
        f"{env['date']}; Linux {env['kernel']}; {env['cpu']}, {env['nproc']} CPUs; "
        f"Python {env['python']}, gtun {env['gtun']}; {env['wireguard_go']}; {env['openvpn']}; "
        f"{env['tinc']}; {env['iperf3']}.",
    ]


def markdown_table(results: list[Result], env: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows(results, width=None)),
        "",
        *(line + "\n" for line in method_lines(env, args)),
    ]
    return "\n".join(lines)


# --- the measuring run ----------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    m = re.fullmatch(r"([0-9]+)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 64M or 1G")
    return int(m.group(1)) * units[m.group(2).upper()]


def parse_paths(text: str) -> list[PathSpec]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown path(s) {', '.join(unknown) or '(none)'}; choose from " + ", ".join(BY_KEY)
        )
    return [p for p in PATHS if p.key in keys]  # in table order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="iperf3 duration per run (10)")
    p.add_argument("--runs", type=int, default=3, help="rounds over all paths; medians (3)")
    p.add_argument(
        "--paths", type=parse_paths, default=PATHS,
        help="comma-separated subset of: " + ", ".join(BY_KEY),
    )  # fmt: skip
    p.add_argument("--pings", type=int, default=20, help="idle pings per path and run (20)")
    p.add_argument("--ping-interval", type=float, default=0.1, help="seconds between pings")
    p.add_argument(
        "--congestion",
        metavar="ALGO",
        help="the iperf3 sender's TCP congestion control (e.g. cubic, bbr; default: the "
        "kernel's), to see how much of the RTT under load is the sender's",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--markdown", nargs="?", const="-", metavar="FILE",
        help="print a Markdown table (or write it to FILE)",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="after the measurements, run py-spy on the relay during one more "
        "client-to-client iperf3 and on the relay and the client during one more UDP "
        "client-to-relay iperf3; summaries in DIR/*.txt",
    )  # fmt: skip
    p.add_argument(
        "--verify-gb", type=parse_size, metavar="SIZE",
        help="instead of measuring, push SIZE bytes (e.g. 64M, 1G) over each gtun path, "
        "IPv4 and IPv6 inside, and check SHA-256 at both ends",
    )  # fmt: skip
    p.add_argument("--workdir", type=Path, help="keep configs and logs here (default: temporary)")
    args = p.parse_args(argv)
    if args.seconds < 1 or args.pings < 1 or args.ping_interval < 0.01 or args.runs < 1:
        p.error("--seconds, --runs and --pings must be at least 1, --ping-interval at least 0.01")
    if args.verify_gb is not None and args.verify_gb < 1:
        p.error("--verify-gb must be at least 1 byte")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


SETUP_ERRORS = (RuntimeError, TimeoutError, OSError, ValueError, subprocess.TimeoutExpired)


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Result], dict[str, str]]:
    specs: list[PathSpec] = args.paths
    results = {s.key: Result(s.key, s.label, s.group) for s in specs}
    profile: dict[str, str] = {}
    wg = WireGuardGo(workdir)
    try:
        with Lab(PREFIX) as lab:
            setups: dict[str, Setup] = {}
            net: GtunNet | None = None
            builders: dict[str, Callable[[], Setup]] = {
                "veth": lambda: setup_veth(lab, workdir),
                "wireguard-go": lambda: setup_wireguard_go(lab, wg),
                "openvpn": lambda: setup_openvpn(
                    lab, workdir, "ov", [OVPN_UNDERLAY], OVPN_TUNNEL, c2c=False
                ),
                "tinc": lambda: setup_tinc(lab, workdir),
                "openvpn-c2c": lambda: setup_openvpn(
                    lab, workdir, "oc", list(OVPN_C2C_UNDERLAY), OVPN_C2C_TUNNEL, c2c=True
                ),
                "wireguard-go-hub": lambda: setup_wireguard_go_hub(lab, wg),
            }
            for spec in specs:
                print(f"setting up {spec.label} ...", file=sys.stderr)
                try:
                    if spec.group.startswith("gtun"):
                        if net is None:
                            net = setup_gtun(lab, workdir)
                        setups[spec.key] = gtun_setups(net)[spec.key]
                    else:
                        setups[spec.key] = builders[spec.key]()
                except SETUP_ERRORS as e:
                    reason = f"{type(e).__name__}: {e}".strip()
                    print(f"  {spec.label} setup failed: {reason}", file=sys.stderr)
                    results[spec.key].setup_error = reason
                    if spec.group.startswith("gtun"):
                        # One failed GtunNet fails all gtun paths; do not retry per path.
                        for other in specs:
                            if other.group.startswith("gtun"):
                                results[other.key].setup_error = reason
                        net = None
            for round_ in range(1, args.runs + 1):
                for spec in specs:
                    setup = setups.get(spec.key)
                    if setup is None or results[spec.key].setup_error is not None:
                        continue
                    print(
                        f"run {round_}/{args.runs}: {spec.label} ({setup.src.name} -> "
                        f"{setup.address}) ...",
                        file=sys.stderr,
                    )
                    before = len(results[spec.key].errors)
                    measure_round(results[spec.key], setup, args, workdir)
                    for err in results[spec.key].errors[before:]:
                        print(f"  {spec.label}: {err}", file=sys.stderr)
            if args.profile is not None and net is not None:
                c1, c2 = net.clients[0], net.clients[1]
                relay_address = net.network.split("/")[0].rsplit(".", 1)[0] + ".1"
                for name, who, path in PROFILES:
                    print(f"profiling the {who} ({path}) ...", file=sys.stderr)
                    node = net.relay if who == "relay" else c1
                    dst, address = (
                        (c2.ns, c2.extra["address"])
                        if path == "client-to-client"
                        else (net.relay.ns, relay_address)
                    )
                    assert node.proc is not None  # `ip netns exec` execs: this is python
                    try:
                        profile[name] = profile_node(
                            node.proc.pid, who, path, c1.ns, dst, address, args, workdir
                        )
                    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                        print(f"  profile failed: {e}", file=sys.stderr)
            if net is not None:
                for node in (net.relay, *net.clients):
                    if node.proc is not None and node.proc.poll() is not None:
                        print(f"{node.name} exited early:\n{net.log_tail(node)}", file=sys.stderr)
    finally:
        wg.remove_sockets()
    return [results[s.key] for s in specs], profile


# --- --verify-gb ----------------------------------------------------------------------------


@dataclass
class Verified:
    path: str
    family: str
    size: int
    seconds: float | None = None
    ok: bool = False
    error: str | None = None


def verify(args: argparse.Namespace, workdir: Path) -> list[Verified]:
    size: int = args.verify_gb
    # Bounded: generous for a slow path (4 MB/s), never forever.
    timeout = max(120.0, size / 4e6)
    out: list[Verified] = []
    with Lab(PREFIX) as lab:
        print("setting up gtun (relay, UDP and TCP clients, IPv4 and IPv6) ...", file=sys.stderr)
        try:
            net = setup_gtun(lab, workdir)
        except SETUP_ERRORS as e:
            reason = f"setup: {type(e).__name__}: {e}"
            for path in ("client->relay (UDP)", "client->relay (TCP)", "client->client (UDP)"):
                for family in ("IPv4", "IPv6"):
                    out.append(Verified(path, family, size, error=reason))
            return out
        c1, c2, c3 = net.clients
        cases = [
            ("client->relay (UDP)", c1.ns, net.relay, None),
            ("client->relay (TCP)", c3.ns, net.relay, None),
            ("client->client (UDP)", c1.ns, c2.ns, c2),
        ]
        for path, src, dst, peer in cases:
            for family, version in (("IPv4", 4), ("IPv6", 6)):
                v = Verified(path, family, size)
                out.append(v)
                if peer is None:
                    address: str | None = relay_address(net, version)
                    dst_ns = net.relay.ns
                else:
                    address = peer.extra.get("address" if version == 4 else "address6")
                    dst_ns = peer.ns
                if address is None:
                    v.error = f"{dst}: no {family} address in the tunnel"
                    continue
                print(f"verify {path} {family} -> {address} ...", file=sys.stderr)
                try:
                    warm_up(src, address)
                    sent, received, v.seconds = net.transfer(
                        src, dst_ns, address, size, port=VERIFY_PORT, timeout=timeout
                    )
                    v.ok = bool(sent) and sent == received
                    if not v.ok:
                        v.error = f"sha256 sent {sent[:16] or '?'}, received {received[:16] or '?'}"
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                    v.error = f"{type(e).__name__}: {e}".strip()
    return out


def verify_table(results: list[Verified]) -> str:
    headers = ["path", "inside", "bytes", "seconds", "Mbit/s", "result"]
    body = []
    for v in results:
        rate = v.size * 8 / v.seconds / 1e6 if v.ok and v.seconds else None
        body.append(
            [
                v.path,
                v.family,
                str(v.size),
                "-" if v.seconds is None else f"{v.seconds:.2f}",
                "-" if rate is None else f"{rate:.0f}",
                "pass" if v.ok else f"FAIL: {v.error}"[:FAIL_WIDTH],
            ]
        )
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 1, 5) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, body)])


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    stale = [n for n in list_namespaces() if n.startswith(PREFIX)]
    if stale:
        print(
            f"bench.py: namespaces {', '.join(stale)} exist (another run, or a killed one); "
            f"remove them with `ip netns delete NAME`",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    env = environment()
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gtun-bench-")))
        try:
            if args.verify_gb is not None:
                checked = verify(args, workdir)
            else:
                results, profile = run(args, workdir)
        except KeyboardInterrupt:
            print("interrupted; namespaces removed", file=sys.stderr)
            return 130
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired) as e:
            print(f"bench.py: {e}", file=sys.stderr)
            return 1

    if args.verify_gb is not None:
        print()
        print(verify_table(checked))
        for v in checked:
            if v.error and len(f"FAIL: {v.error}") > FAIL_WIDTH:
                print(f"error: {v.path} {v.family}: {v.error}")
        if args.json is not None:
            data = {"environment": env, "verify": [v.__dict__ for v in checked]}
            args.json.write_text(json.dumps(data, indent=2) + "\n")
        return 0 if all(v.ok for v in checked) else 1

    print()
    print(text_table(results))
    for r in results:
        if r.cpu_pct:
            use = ", ".join(f"{k} {v:.0f}%" for k, v in r.cpu_pct.items())
            print(f"  CPU during {r.label}, 1 stream, last run (100% = one CPU): {use}")
    print()
    for key in ("date", "kernel", "cpu", "nproc", "python", "gtun", "wireguard_go", "openvpn",
                "tinc", "openssl", "iperf3"):  # fmt: skip
        print(f"{key:13s} {env[key]}")
    print(f"{'method':13s} {method_lines(env, args)[0]}")
    for r in results:
        for err in ([f"setup: {r.setup_error}"] if r.setup_error else []) + r.errors:
            print(f"error: {r.label}: {err}")
    if args.json is not None:
        data = {
            "environment": env,
            "settings": {
                "seconds": args.seconds,
                "runs": args.runs,
                "pings": args.pings,
                "ping_interval": args.ping_interval,
                "load_ping_interval": LOAD_PING_INTERVAL,
                "paths": [s.key for s in args.paths],
            },
            "results": [r.as_json() for r in results],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown is not None:
        md = markdown_table(results, env, args)
        if args.markdown == "-":
            print()
            print(md, end="")
        else:
            Path(args.markdown).write_text(md)
    if profile and args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        for name, text in profile.items():
            out = args.profile / name
            out.write_text(text)
            print()
            print(f"profile summary ({out}):")
            print(text, end="")
    return 1 if any(r.failed() or r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
