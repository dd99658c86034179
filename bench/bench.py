#!/usr/bin/env python3
"""Throughput and latency of gtun next to a raw veth and wireguard-go, in one run.

Run as root:

    python3 bench/bench.py [--seconds 10] [--json out.json] [--markdown [FILE]]
                           [--profile bench/profiles]

It builds network namespaces (prefix "gtb", underlay addresses in 10.240.0.0/16), measures
one TCP stream with iperf3 and the ping RTT through each path, one path at a time, prints a
table and removes every namespace again, also on Ctrl-C or failure.  Nothing outside the
namespaces is touched except wireguard-go's control sockets under /var/run/wireguard,
which are removed at the end.

Paths:
  veth                   two namespaces joined by a veth pair
  wireguard-go           wireguard-go <-> wireguard-go over such a veth
  gtun client->relay     a gtun client to the relay's own tunnel address
  gtun client->client    a gtun client through the relay to another gtun client

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
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if importlib.util.find_spec("gtun") is None:  # running from a source tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import gtun  # noqa: E402
from gtun.lab import Lab, Namespace, list_namespaces  # noqa: E402
from gtun.labnet import GtunNet  # noqa: E402

PREFIX = "gtb"
UNDERLAY = 240  # 10.240.0.0/16; GtunNet puts client i's underlay on 10.240.<i>.0/24
VETH_NET = "10.240.101"  # raw veth path
WG_UNDERLAY = "10.240.102"  # the veth under the two wireguard-go instances
WG_TUNNEL = "10.240.103"  # wireguard-go's tunnel addresses
WG_PORT = 51820
WG_RUN_DIR = Path("/var/run/wireguard")  # wireguard-go's UAPI sockets; shared by namespaces
IPERF_PORT = 5201
PATHS = [
    "veth",
    "wireguard-go",
    "gtun client->relay",
    "gtun client->relay (TCP)",
    "gtun client->client",
]

# Bounds on every wait (seconds).
LISTEN_TIMEOUT = 10.0
WG_START_TIMEOUT = 10.0
CONFIGURE_TIMEOUT = 30.0
PING_SLACK = 15.0
IPERF_SLACK = 30.0


@dataclass
class Result:
    path: str
    mbit_s: float | None = None
    sent_mbit_s: float | None = None
    retransmits: int | None = None
    rtt_ms: float | None = None
    rtt_mdev_ms: float | None = None
    ping_loss_pct: float | None = None
    # Share of one CPU (user + system) each gtun process used during the iperf3 run.
    cpu_pct: dict[str, float] = field(default_factory=dict)
    error: str | None = None


# --- measurements ---------------------------------------------------------------------------


def ping(src: Namespace, address: str, count: int, interval: float) -> tuple[float, float, float]:
    """(avg ms, mdev ms, loss %) of `count` pings; RuntimeError when none came back."""
    out = src.run(
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", address],
        check=False,
        timeout=count * interval + PING_SLACK,
    )
    loss = avg = mdev = None
    for line in out.stdout.splitlines():
        if "packet loss" in line:
            for part in line.split(","):
                if "packet loss" in part:
                    loss = float(part.split("%")[0])
        if "min/avg/max" in line:
            fields = line.split("=")[1].split()[0].split("/")
            avg, mdev = float(fields[1]), float(fields[3])
    if avg is None or mdev is None or loss is None:
        raise RuntimeError(f"ping {address} from {src.name} failed: {out.stdout}{out.stderr}")
    return avg, mdev, loss


def warm_up(src: Namespace, address: str, timeout: float = 15.0) -> None:
    """Ping until one reply comes (completes handshakes); RuntimeError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = src.run(["ping", "-n", "-c", "1", "-W", "1", address], check=False, timeout=5)
        if out.returncode == 0:
            return
    raise RuntimeError(f"no ping reply from {address} in {src.name} after {timeout:g} s")


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


def iperf(
    src: Namespace,
    dst: Namespace,
    address: str,
    seconds: int,
    log_dir: Path,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One TCP stream from `src` to `address` (in `dst`) for `seconds`; iperf3's JSON.

    `on_start` is called just before the client starts.
    """
    server = dst.spawn(
        ["iperf3", "-s", "-1", "-B", address, "-p", str(IPERF_PORT)],
        log_path=log_dir / f"iperf3-server-{dst.name}.log",
    )
    try:
        wait_listening(dst, IPERF_PORT, server)
        if on_start is not None:
            on_start()
        # fmt: off
        cmd = ["iperf3", "-J", "-c", address, "-p", str(IPERF_PORT), "-t", str(seconds),
               "--connect-timeout", "5000"]
        # fmt: on
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


class CpuMeter:
    """CPU use of some processes between `start()` and `stop()`, as % of one CPU."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, dict[str, float]] = {}
        self.started = 0.0
        self.threads: dict[str, dict[str, float]] = {}

    def start(self) -> None:
        self.started = time.monotonic()
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        """Per process; per-thread figures are left in `self.threads`."""
        wall = time.monotonic() - self.started
        totals = {}
        for name, pid in self.pids.items():
            after, before = cpu_seconds(pid), self.before.get(name, {})
            self.threads[name] = {
                t: round(100 * (s - before.get(t, 0.0)) / wall, 1) for t, s in after.items()
            }
            totals[name] = round(sum(self.threads[name].values()), 1)
        return totals


def measure(
    name: str,
    src: Namespace,
    dst: Namespace,
    address: str,
    args: argparse.Namespace,
    log_dir: Path,
    *,
    with_ping: bool = True,
    on_start: Callable[[], None] | None = None,
    meter: CpuMeter | None = None,
) -> Result:
    result = Result(name)

    def start() -> None:
        if meter is not None:
            meter.start()
        if on_start is not None:
            on_start()

    try:
        warm_up(src, address)
        if with_ping:
            result.rtt_ms, result.rtt_mdev_ms, result.ping_loss_pct = ping(
                src, address, args.pings, args.ping_interval
            )
        report = iperf(src, dst, address, args.seconds, log_dir, start)
        if meter is not None:
            result.cpu_pct = meter.stop()
        end = report["end"]
        result.mbit_s = end["sum_received"]["bits_per_second"] / 1e6
        result.sent_mbit_s = end["sum_sent"]["bits_per_second"] / 1e6
        result.retransmits = end["sum_sent"].get("retransmits")
    except (RuntimeError, subprocess.TimeoutExpired, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


# --- the paths ------------------------------------------------------------------------------


def setup_veth(lab: Lab) -> tuple[Namespace, Namespace, str]:
    a, b = lab.add_ns("va"), lab.add_ns("vb")
    lab.veth(a, "v0", f"{VETH_NET}.1/24", b, "v0", f"{VETH_NET}.2/24")
    return a, b, f"{VETH_NET}.2"


def _wg_key(ns: Namespace) -> tuple[str, str]:
    private = ns.run(["wg", "genkey"]).stdout.strip()
    public = ns.run(["wg", "pubkey"], input=private + "\n").stdout.strip()
    return private, public


def setup_wireguard_go(
    lab: Lab, workdir: Path, wg_names: list[str]
) -> tuple[Namespace, Namespace, str, dict[str, int]]:
    a, b = lab.add_ns("wa"), lab.add_ns("wb")
    lab.veth(a, "u0", f"{WG_UNDERLAY}.1/24", b, "u0", f"{WG_UNDERLAY}.2/24")
    # /var/run/wireguard is shared by all namespaces: names unique to this run.
    tag = os.getpid() % 100000
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    nodes = []
    pids: dict[str, int] = {}
    for i, ns in enumerate((a, b), start=1):
        ifname = f"wgb{tag}{'ab'[i - 1]}"
        if (WG_RUN_DIR / f"{ifname}.sock").exists():
            raise RuntimeError(f"{WG_RUN_DIR / ifname}.sock exists; another wireguard-go?")
        wg_names.append(ifname)
        proc = ns.spawn(["wireguard-go", "-f", ifname], log_path=workdir / f"{ifname}.log", env=env)
        pids[f"wireguard-go {ns.name}"] = proc.pid
        nodes.append((ns, ifname, i, *_wg_key(ns)))
    for ns, ifname, _, _, _ in nodes:
        sock = WG_RUN_DIR / f"{ifname}.sock"
        deadline = time.monotonic() + WG_START_TIMEOUT
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go {ifname} in {ns.name}: no {sock} yet")
            time.sleep(0.05)
    for (ns, ifname, i, private, _), (_, _, j, _, peer_public) in zip(
        nodes, reversed(nodes), strict=True
    ):
        key_file = workdir / f"{ifname}.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private + "\n")
        ns.run(["wg", "set", ifname, "listen-port", str(WG_PORT), "private-key", str(key_file),
                "peer", peer_public, "endpoint", f"{WG_UNDERLAY}.{j}:{WG_PORT}",
                "allowed-ips", f"{WG_TUNNEL}.{j}/32"])  # fmt: skip
        ns.run(["ip", "addr", "add", f"{WG_TUNNEL}.{i}/24", "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
        wait_tun_up(ns, ifname)
    return a, b, f"{WG_TUNNEL}.2", pids


def wait_tun_up(ns: Namespace, ifname: str) -> None:
    """Wait for `ifname`'s UP flag (a TUN's operstate stays UNKNOWN)."""
    deadline = time.monotonic() + WG_START_TIMEOUT
    while True:
        link = json.loads(ns.run(["ip", "-j", "link", "show", ifname]).stdout)[0]
        if "UP" in link.get("flags", []) and link.get("operstate") in ("UP", "UNKNOWN"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"in {ns.name}: {ifname} not up after {WG_START_TIMEOUT:g} s")
        time.sleep(0.05)


def setup_gtun(lab: Lab, workdir: Path) -> GtunNet:
    net = GtunNet(lab, workdir / "gtun", clients=3, underlay=UNDERLAY, lan=False, nat=False)
    net.set_transport(net.clients[2], "tcp")  # c3 measures the TCP transport
    net.start_all(timeout=CONFIGURE_TIMEOUT)
    return net


# --- profiling ------------------------------------------------------------------------------


def profile_relay(
    net: GtunNet,
    src: Namespace,
    dst: Namespace,
    address: str,
    args: argparse.Namespace,
    workdir: Path,
) -> tuple[str, Result]:
    """Run py-spy on the relay during one more client-to-client iperf3; (summary, result).

    A separate run, so that sampling (which pauses the relay) leaves the table alone.
    """
    assert net.relay.proc is not None
    pid = net.relay.proc.pid  # `ip netns exec` execs the command: this is python itself
    raw = workdir / "relay.raw"
    duration = max(1, args.seconds - 1)
    rate = 100
    spies: list[subprocess.Popen[str]] = []

    def start() -> None:
        # fmt: off
        cmd = ["py-spy", "record", "--format", "raw", "--function", "--threads", "-r", str(rate),
               "-d", str(duration), "-o", str(raw), "--pid", str(pid)]
        # fmt: on
        spies.append(
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )

    try:
        name = "gtun client->client (profiled)"
        meter = CpuMeter({"relay": pid})
        result = measure(
            name, src, dst, address, args, workdir, with_ping=False, on_start=start, meter=meter
        )
        if not spies:
            raise RuntimeError(f"no profile: {result.error}")
        _, err = spies[0].communicate(timeout=duration + 30)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)
    if spies[0].returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spies[0].returncode}): {err.strip()}")
    return summarize_raw(raw, duration, rate, result, meter.threads.get("relay", {})), result


def summarize_raw(
    raw: Path, duration: int, rate: int, result: Result, cpu: dict[str, float], top: int = 10
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
        return "py-spy recorded no non-idle samples of the relay\n"
    # Frames under which (nearly) all of a thread's samples sit say nothing: main(), the loop.
    boring = {f for t, c in trunk.items() for f, n in c.items() if n >= 0.98 * per_thread[t]}

    def table(counter: Counter[str], skip: set[str] = set()) -> list[str]:  # noqa: B006
        rows = [(f, n) for f, n in counter.most_common() if f not in skip][:top]
        return [f"{n:7d} {100 * n / samples:5.1f}%  {frame}" for frame, n in rows]

    throughput = "failed" if result.mbit_s is None else f"{result.mbit_s:.0f} Mbit/s"
    lines = [
        "py-spy record --format raw --function --threads on the gtun relay during a",
        f"client-to-client iperf3 run ({throughput} while sampled; py-spy pauses the",
        "relay at each sample).",
        f"{samples} non-idle samples in {duration} s at {rate} Hz; per thread "
        "(100% = always runnable):",
        *(f"  {100 * n / (duration * rate):5.1f}%  {t}" for t, n in per_thread.most_common()),
        "CPU actually used by each relay thread during the iperf3 run, from /proc",
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
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.splitlines() or ["unknown"])[0].strip()


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
        "wireguard_go": first_line(["wireguard-go", "--version"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "gtun": getattr(gtun, "__version__", "unknown"),
    }


def rows(results: list[Result]) -> list[list[str]]:
    by_path = {r.path: r for r in results}

    def ratio(r: Result, base: str) -> str:
        b = by_path.get(base)
        if r.mbit_s is None or b is None or not b.mbit_s:
            return "-"
        return f"{r.mbit_s / b.mbit_s:.3f}"

    out = []
    for r in results:
        if r.error is not None and r.mbit_s is None:
            rtt = "-" if r.rtt_ms is None else f"{r.rtt_ms:.3f}"
            out.append([r.path, "failed", "-", "-", rtt])
            continue
        out.append(
            [
                r.path,
                f"{r.mbit_s:.0f}" if r.mbit_s is not None else "-",
                ratio(r, "wireguard-go"),
                ratio(r, "veth"),
                f"{r.rtt_ms:.3f}" if r.rtt_ms is not None else "-",
            ]
        )
    return out


HEADERS = ["path", "Mbit/s", "vs wireguard-go", "vs veth", "RTT ms"]


def text_table(results: list[Result]) -> str:
    body = rows(results)
    widths = [max(len(row[i]) for row in [HEADERS, *body]) for i in range(len(HEADERS))]
    fmt = lambda row: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(row, widths, strict=True))
    )
    return "\n".join([fmt(HEADERS), fmt(["-" * w for w in widths]), *map(fmt, body)])


def markdown_table(results: list[Result], env: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---", "---:", "---:", "---:", "---:"]) + "|",
        *("| " + " | ".join(row) + " |" for row in rows(results)),
        "",
        f"One TCP stream (iperf3, {args.seconds} s, receiver's rate); RTT is the average of "
        f"{args.pings} pings {args.ping_interval} s apart.  {env['date']}, Linux {env['kernel']}, "
        f"{env['cpu']} ({env['nproc']} CPUs), Python {env['python']}, {env['wireguard_go']}.",
    ]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="iperf3 duration per path (10)")
    p.add_argument("--pings", type=int, default=20, help="pings per path (20)")
    p.add_argument("--ping-interval", type=float, default=0.1, help="seconds between pings")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--markdown", nargs="?", const="-", metavar="FILE",
        help="print a Markdown table (or write it to FILE)",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="after the measurements, run py-spy on the relay during one more "
        "client-to-client iperf3 and write a summary to DIR/relay-client-to-client.txt",
    )  # fmt: skip
    p.add_argument("--workdir", type=Path, help="keep configs and logs here (default: temporary)")
    args = p.parse_args(argv)
    if args.seconds < 1 or args.pings < 1 or args.ping_interval < 0.01:
        p.error("--seconds and --pings must be at least 1, --ping-interval at least 0.01")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, workdir: Path) -> tuple[list[Result], str | None]:
    results: list[Result] = []
    profile: str | None = None
    wg_names: list[str] = []
    try:
        with Lab(PREFIX) as lab:
            print("setting up namespaces ...", file=sys.stderr)
            va, vb, v_addr = setup_veth(lab)
            wa, wb, w_addr, wg_pids = setup_wireguard_go(lab, workdir, wg_names)
            paths = [("veth", va, vb, v_addr, {}), ("wireguard-go", wa, wb, w_addr, wg_pids)]
            net: GtunNet | None = None
            try:
                net = setup_gtun(lab, workdir)
            except (RuntimeError, TimeoutError, OSError) as e:
                # Still report the other paths; say why gtun's are missing.
                print(f"gtun setup failed: {e}", file=sys.stderr)
                for name in PATHS[2:]:
                    results.append(Result(name, error=f"setup: {type(e).__name__}: {e}"))
            if net is not None:
                c1, c2, c3 = net.clients
                relay_addr = str(next(ipaddress.ip_network(net.network).hosts()))
                gtun_pids = {
                    f"gtun {n.name}": n.proc.pid
                    for n in (net.relay, *net.clients)
                    if n.proc is not None
                }
                paths += [
                    ("gtun client->relay", c1.ns, net.relay.ns, relay_addr, gtun_pids),
                    ("gtun client->relay (TCP)", c3.ns, net.relay.ns, relay_addr, gtun_pids),
                    ("gtun client->client", c1.ns, c2.ns, c2.extra["address"], gtun_pids),
                ]
            for name, src, dst, address, pids in paths:
                print(f"measuring {name} ({src.name} -> {address}) ...", file=sys.stderr)
                meter = CpuMeter(pids) if pids else None
                r = measure(name, src, dst, address, args, workdir, meter=meter)
                if r.error:
                    print(f"  {name}: {r.error}", file=sys.stderr)
                results.append(r)
            results.sort(key=lambda r: PATHS.index(r.path))
            if args.profile is not None and net is not None:
                print("profiling the relay (client->client) ...", file=sys.stderr)
                try:
                    profile, _ = profile_relay(
                        net, c1.ns, c2.ns, c2.extra["address"], args, workdir
                    )
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                    print(f"  profile failed: {e}", file=sys.stderr)
            if net is not None:
                for node in (net.relay, *net.clients):
                    if node.proc is not None and node.proc.poll() is not None:
                        print(f"{node.name} exited early:\n{net.log_tail(node)}", file=sys.stderr)
    finally:
        for ifname in wg_names:  # a killed wireguard-go leaves its socket behind
            with contextlib.suppress(OSError):
                (WG_RUN_DIR / f"{ifname}.sock").unlink()
    return results, profile


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
            results, profile = run(args, workdir)
        except KeyboardInterrupt:
            print("interrupted; namespaces removed", file=sys.stderr)
            return 130
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired) as e:
            print(f"bench.py: {e}", file=sys.stderr)
            return 1

    print()
    print(text_table(results))
    for r in results:
        if r.cpu_pct:
            use = ", ".join(f"{k} {v:.0f}%" for k, v in r.cpu_pct.items())
            print(f"  CPU during {r.path} (100% = one CPU): {use}")
    print()
    for key in ("date", "kernel", "cpu", "nproc", "python", "wireguard_go", "iperf3"):
        print(f"{key:13s} {env[key]}")
    print(f"{'method':13s} iperf3, one TCP stream, {args.seconds} s, receiver's bits_per_second")
    print(f"{'':13s} ping, {args.pings} pings, {args.ping_interval} s apart, average RTT")
    for r in results:
        if r.error:
            print(f"error: {r.path}: {r.error}")
    if args.json is not None:
        data = {
            "environment": env,
            "settings": {
                "seconds": args.seconds,
                "pings": args.pings,
                "ping_interval": args.ping_interval,
            },
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown is not None:
        md = markdown_table(results, env, args)
        if args.markdown == "-":
            print()
            print(md, end="")
        else:
            Path(args.markdown).write_text(md)
    if profile is not None and args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        out = args.profile / "relay-client-to-client.txt"
        out.write_text(profile)
        print()
        print(f"profile summary ({out}):")
        print(profile, end="")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
