#!/usr/bin/env python3
"""gtun's relay with many peers: measured in network namespaces, one table.

Run as root:

    python3 bench/scale.py [--sizes 200,1000,5000,10000] [--generators 2] [--steady 20]
                           [--markdown [FILE]] [--json FILE] [--workdir DIR] [--src DIR]

For each size N, a lab (namespaces "gtsc<hex>relay" and "gtsc<hex>c1", underlay
10.233.1.0/24 inside them; nothing in the root namespace changes) gets a real relay
(`gtun server`) configured with N [[peers]] in server.toml plus one real gtun client, c1.
In c1's namespace, `--generators` processes of bench/scale_peers.py play the N peers:
real WireGuard handshakes over real UDP sockets (one socket per peer, from 235 source
addresses), each followed by gtun's configuration request, then PINGs every 10 s.
Measured:

  start-up       from `gtun server` to its control socket answering (the peers leased)
  handshakes/s   N over the time until every peer was configured (wall clock), and N
                 over the relay's CPU seconds in that time ("per core": one core's rate)
  RSS/peer       the relay's RSS growth from start-up to all peers in session, over N
                 (its RSS with N peers configured and no session is given too)
  steady CPU     the relay's CPU use with all peers keeping alive, over `--steady` s
  status         the time `status` takes over the control socket, while c1 pings the
                 relay every 10 ms: the largest RTT less the average is the stall of the
                 relay's event loop
  reload         the same for a reload (one peer added to server.toml)

`--src DIR` runs the relay from another gtun source tree (e.g. an older checkout, for
before/after figures); the generator always uses this checkout.  This is a script that
prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _src() -> Path:
    """The gtun tree to import: `--src DIR`, else this checkout's (read before import)."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--src" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if a.startswith("--src="):
            return Path(a.split("=", 1)[1]).resolve()
    return Path(__file__).resolve().parent.parent / "src"


sys.path.insert(0, str(_src()))

from gtun.app.control import query  # noqa: E402
from gtun.app.keys import encode_key, generate_private_key, public_key  # noqa: E402
from gtun.errors import GtunError  # noqa: E402
from gtun.lab.net import PORT, GtunNet  # noqa: E402
from gtun.lab.netns import Lab, python_env  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (beside this script: what the table scripts share)

PREFIX = "gtsc"  # every namespace of this script starts with it
UNDERLAY = 233  # c1's underlay: 10.233.1.0/24 (inside the lab only)
NETWORK = "10.64.0.0/18"  # room for 16,381 peers
RELAY = "10.64.0.1"  # the relay's tunnel address
SOURCES = "10.233.1.16+235"  # the generator's source addresses: .16 to .250
GENERATOR = Path(__file__).resolve().with_name("scale_peers.py")
HEADERS = (
    "peers",
    "start-up",
    "handshakes/s (per core)",
    "RSS/peer",
    "steady CPU",
    "status (stall)",
    "reload (stall)",
)


@dataclass
class Row:
    peers: int
    cells: list[str]
    data: dict[str, Any] = field(default_factory=dict)  # every number, for --json


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def last_line(path: Path) -> dict[str, Any] | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


def ping_stats(out: str, tail: int = 50) -> tuple[int, int, float, float]:
    """(sent, received, avg ms, max ms) from ping's output, leaving out the last `tail`
    echoes (still in flight when ping was stopped); zeros when there is no summary."""
    m = re.search(r"(\d+) packets transmitted", out)
    if m is None:
        return 0, 0, 0.0, 0.0
    sent = max(0, int(m.group(1)) - tail)
    rtts = {
        int(seq): float(ms)
        for seq, ms in re.findall(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms", out)
        if int(seq) <= sent
    }
    if not rtts:
        return sent, 0, 0.0, 0.0
    return sent, len(rtts), sum(rtts.values()) / len(rtts), max(rtts.values())


class Scale:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        biggest = max(args.sizes)
        print(f"making {biggest} keys ...", file=sys.stderr, flush=True)
        self.keys = [generate_private_key() for _ in range(biggest)]
        self.publics = [encode_key(public_key(k)) for k in self.keys]
        self.keys_file = workdir / "keys.txt"
        self.keys_file.write_text("".join(encode_key(k) + "\n" for k in self.keys))

    def run(self, n: int) -> Row:
        args = self.args
        d = self.workdir / f"n{n}"
        peers = "".join(
            f'\n[[peers]]\nname = "p{i:05d}"\npublic_key = "{self.publics[i]}"\n' for i in range(n)
        )
        with Lab(f"{PREFIX}{secrets.token_hex(2)}") as lab:
            net = GtunNet(
                lab,
                d,
                clients=1,
                underlay=UNDERLAY,
                network=NETWORK,
                lan=False,
                nat=False,
                extra_peers=peers,
            )
            (c1,) = net.clients
            batch = "".join(f"address add 10.233.1.{h}/24 dev up0\n" for h in range(16, 251))
            c1.ns.run(["ip", "-batch", "-"], input=batch)
            begun = time.monotonic()
            net.start_relay(timeout=max(60.0, n / 20))
            startup = time.monotonic() - begun
            relay = net.relay.proc
            assert relay is not None
            cpu0, rss0 = proc_stat(relay.pid)
            # The generators.
            gens: list[tuple[subprocess.Popen[bytes], Path]] = []
            share = -(-n // args.generators)
            for g in range(args.generators):
                first, count = g * share, min(share, n - g * share)
                if count <= 0:
                    break
                out = d / f"gen{g}.jsonl"
                log = out.open("wb")
                gens.append(
                    (
                        subprocess.Popen(
                            [
                                *c1.ns.exec_prefix(),
                                sys.executable,
                                str(GENERATOR),
                                str(self.keys_file),
                                str(first),
                                str(count),
                                net.relay.public,
                                f"{c1.underlay}:{PORT}",
                                "--sources",
                                SOURCES,
                            ],
                            stdin=subprocess.PIPE,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=python_env(),
                            start_new_session=True,
                        ),
                        out,
                    )
                )
                log.close()
            try:
                return self._measure(n, net, relay.pid, gens, startup, cpu0, rss0)
            finally:
                for proc, _ in gens:
                    with contextlib.suppress(OSError):
                        assert proc.stdin is not None
                        proc.stdin.close()
                    proc.terminate()
                for proc, _ in gens:
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(5)
                net.stop(net.relay)
                for c in net.clients:
                    net.stop(c)

    def _measure(
        self,
        n: int,
        net: GtunNet,
        pid: int,
        gens: list[tuple[subprocess.Popen[bytes], Path]],
        startup: float,
        cpu0: float,
        rss0: int,
    ) -> Row:
        args = self.args
        begun = time.monotonic()
        limit = max(60.0, n / 10)
        while True:
            lines = [last_line(path) for _, path in gens]
            if all(line is not None and line.get("all") for line in lines):
                break
            for proc, path in gens:
                if proc.poll() is not None:
                    raise RuntimeError(f"generator exited: {path.read_text()[-500:]}")
            if time.monotonic() - begun > limit:
                done = sum(int(line["configured"]) for line in lines if line)
                raise TimeoutError(f"only {done} of {n} peers configured after {limit:g}s")
            time.sleep(0.2)
        handshake_time = max(float(line["done_at"]) for line in lines if line)
        cpu1, rss1 = proc_stat(pid)
        gen_cpu = sum(float(line["cpu"]) for line in lines if line)
        time.sleep(2.0)  # the last configurations answered, the PINGs spread out
        cpu2, _ = proc_stat(pid)
        time.sleep(args.steady)
        cpu3, rss3 = proc_stat(pid)
        steady = (cpu3 - cpu2) / args.steady

        (c1,) = net.clients
        net.start_client(c1)
        net.wait_configured(c1, timeout=30)
        status_time, status_ping = self._during_ping(
            net, lambda: query(net.relay.socket, {"command": "status"}, timeout=120.0)
        )
        with net.relay.config.open("a") as f:
            f.write(f'\n[[peers]]\nname = "late"\npublic_key = "{encode_key(os.urandom(32))}"\n')
        reload_time, reload_ping = self._during_ping(
            net, lambda: query(net.relay.socket, {"command": "reload"}, timeout=120.0)
        )
        data = {
            "peers": n,
            "startup_s": startup,
            "handshake_s": handshake_time,
            "handshakes_per_s": n / handshake_time,
            "relay_cpu_handshakes_s": cpu1 - cpu0,
            "handshakes_per_core_s": n / max(cpu1 - cpu0, 1e-9),
            "generator_cpu_s": gen_cpu,
            "rss_start_bytes": rss0,
            "rss_steady_bytes": rss3,
            "rss_per_peer_bytes": (rss1 - rss0) / n,
            "steady_cpu": steady,
            "status_s": status_time,
            "status_ping": status_ping,
            "reload_s": reload_time,
            "reload_ping": reload_ping,
        }
        cells = [
            f"{startup:.1f} s",
            f"{n / handshake_time:.0f} ({n / max(cpu1 - cpu0, 1e-9):.0f})",
            f"{(rss1 - rss0) / n / 1024:.1f} KiB (at start {rss0 / 2**20:.0f} MiB)",
            f"{steady * 100:.1f}%",
            _op_cell(status_time, status_ping),
            _op_cell(reload_time, reload_ping),
        ]
        return Row(n, cells, data)

    def _during_ping(self, net: GtunNet, op: Any) -> tuple[float, dict[str, Any]]:
        """Run `op` while c1 pings the relay every 10 ms: its time and the pings."""
        (c1,) = net.clients
        ping = subprocess.Popen(
            [*c1.ns.exec_prefix(), "ping", "-n", "-i", "0.01", "-W", "5", "-w", "12", RELAY],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            time.sleep(1.0)
            begun = time.monotonic()
            try:
                answer = op()
            except GtunError as exc:
                answer = {"error": str(exc)}
            took = time.monotonic() - begun
            if "error" in answer:
                raise RuntimeError(f"control request failed: {answer['error']}")
            time.sleep(0.5)
            ping.send_signal(signal.SIGINT)
            out, _ = ping.communicate(timeout=20)
        finally:
            if ping.poll() is None:
                ping.kill()
                ping.wait(5)
        sent, got, avg, top = ping_stats(out)
        return took, {"sent": sent, "received": got, "avg_ms": avg, "max_ms": top}


def _op_cell(took: float, ping: dict[str, Any]) -> str:
    lost = ping["sent"] - ping["received"]
    stall = max(0.0, ping["max_ms"] - ping["avg_ms"])
    return f"{took:.2f} s ({stall:.0f} ms, {lost} lost)"


def cells(rows: list[Row]) -> list[list[str]]:
    return [[str(r.peers), *r.cells] for r in rows]


def text_table(rows: list[Row]) -> str:
    return report.text_table(HEADERS, cells(rows))


def markdown_table(rows: list[Row]) -> str:
    return report.markdown_table(HEADERS, cells(rows))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[200, 1000, 5000, 10000],
        help="numbers of peers, comma-separated (200,1000,5000,10000)",
    )
    p.add_argument("--generators", type=int, default=2, help="generator processes (2)")
    p.add_argument("--steady", type=float, default=20.0, help="seconds of steady state (20)")
    report.add_output_args(p)
    p.add_argument("--src", type=Path, help="run the relay from this gtun source tree")
    args = p.parse_args(argv)
    if any(n < 1 or n > 16000 for n in args.sizes):
        p.error("sizes must be between 1 and 16000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refused = report.preflight("scale.py", PREFIX)
    if refused is not None:
        return refused
    with report.workdir(args, "gtun-scale-") as workdir:
        s = Scale(args, workdir)
        rows = report.each(
            args.sizes,
            lambda n: f"{n} peers ...",
            lambda n: [s.run(n)],
            lambda n, error: [Row(n, [f"FAILED: {error}"] + ["-"] * (len(HEADERS) - 2))],
        )
    if rows is None:
        return 130
    report.emit(HEADERS, cells(rows), rows, args)
    return 1 if any(r.cells[0].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
