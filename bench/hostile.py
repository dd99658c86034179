#!/usr/bin/env python3
"""gtun's relay under hostile traffic: measured scenarios in network namespaces, one table.

Run as root:

    python3 bench/hostile.py [--seconds 10] [--scenarios flood-udp,...] [--markdown [FILE]]
                             [--json FILE] [--workdir DIR]

Each scenario builds its own lab (namespaces "gth<scenario tag>...", underlay addresses
10.227.<i>.0/24 inside them, nothing in the root namespace changes), starts a real relay
and clients, does something hostile while a well-behaved client's traffic is watched,
removes everything, and gives one row: the scenario, what was sent, what held (or did
not), and the figure.  Scenarios (`--scenarios` takes these keys):

  flood-udp   client c1 floods c2 through the relay (iperf3, TCP, 4 streams) while c3
              pings the relay's tunnel address: c3's RTT idle and during the flood
              (avg and max), all over UDP
  flood-tcp   the same with every client on the TCP transport
  flood-udp-pinned, flood-tcp-pinned
              the same with the relay's threads on CPU 0 and the flooding peers and
              iperf3 on the others (taskset), as if the relay had a machine of its own;
              unpinned, five busy processes share two CPUs with the relay
  garbage     a sender in c1's namespace (no gtun there) sprays the relay's UDP port
              with garbage at the rate GSO sends allow (transport-message shaped:
              type 4, random receiver index and counter) while c2 pings the relay
  garbage-plain
              the same, one datagram per send (no GSO: the relay reads each on its own)
  handshake-flood
              initiations from 8 keys the relay does not know, as fast as one process
              makes them, from one address (tests/scripts/hs_flood.py: without mac2,
              then with a cookie the relay sent, reused) while client c1 starts and
              pings: its time to be configured, the DH the relay did for the flood
  slowloris   600 TCP connections to the relay's port (more than it accepts), each
              idle or trickling one byte, reopened whenever closed, while c2 starts
              on the TCP transport: the time until it is configured, and its pings

Adding a scenario: write `def my_case(h: Hostile) -> Row` and add it to SCENARIOS.  `h`
builds labs (`h.net(...)`), runs programs in them, and measures pings (`h.ping`).

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402  (beside this script: what the table scripts share)
from gtun.lab.net import GARBAGE, PORT, GtunNet  # noqa: E402
from gtun.lab.netns import Lab, Namespace  # noqa: E402

PREFIX = "gth"  # every namespace of this script starts with it
UNDERLAY = 227  # client i's underlay: 10.227.<i>.0/24 (inside the lab only)
RELAY = "10.66.0.1"  # the relay's tunnel address (GtunNet's default network)
PING_INTERVAL = 0.1
CONFIGURE_TIMEOUT = 40.0
HEADERS = ("scenario", "what was sent", "what held", "figure")


@dataclass
class Row:
    scenario: str
    sent: str
    held: str
    figure: str
    data: dict[str, Any] | None = None  # every number, for --json


@dataclass
class Pings:
    sent: int
    rtts: list[float]

    @property
    def lost(self) -> int:
        return self.sent - len(self.rtts)

    def text(self) -> str:
        if not self.rtts:
            return "no reply"
        return f"avg {statistics.fmean(self.rtts):.2f} / max {max(self.rtts):.2f} ms"


_RTT = re.compile(r"time[=<]([0-9.]+) ms")


class Hostile:
    """What scenarios share: the settings, the working directory, and labs."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.seconds: int = args.seconds
        self.workdir = workdir

    @contextlib.contextmanager
    def net(
        self, tag: str, *, clients: int = 3, transports: list[str] | None = None
    ) -> Iterator[GtunNet]:
        """A relay and `clients` clients in a fresh lab ("gth<tag>..."), all started and
        configured; `transports` per client ("udp", "tcp"; None: not started)."""
        transports = transports or ["udp"] * clients
        with Lab(f"{PREFIX}{tag}") as lab:
            net = GtunNet(
                lab, self.workdir / tag, clients=clients, underlay=UNDERLAY, lan=False, nat=False
            )
            net.start_relay()
            started = [c for c, t in zip(net.clients, transports, strict=True) if t]
            for c, t in zip(net.clients, transports, strict=True):
                if t:
                    net.start_client(c, t)
            for c in started:
                net.wait_configured(c, timeout=CONFIGURE_TIMEOUT)
            yield net

    def ping(self, ns: Namespace, address: str, count: int) -> Pings:
        out = ns.run(
            ["ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "2", address],
            check=False,
            timeout=count * PING_INTERVAL + 20,
        )
        return Pings(count, [float(m) for m in _RTT.findall(out.stdout)])

    def ping_during(
        self,
        proc: subprocess.Popen[bytes],
        ns: Namespace,
        address: str,
        count: int,
        settle: float,
        control: str,
    ) -> tuple[Pings, Pings]:
        """`count` pings from `ns` to `address` once `proc` (the attack) has run `settle`
        seconds, and at the same time as many to `control`, an address the kernel answers
        without gtun (the relay's underlay address): what the lab itself adds under the
        attack (its shared CPUs and veth queues).  Then waits for `proc` to end (stopping
        it if it does not)."""
        try:
            time.sleep(settle)
            log = self.workdir / "control-ping.out"
            ctl = ns.spawn(
                ["ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "2", control],
                log_path=log,
            )
            try:
                pings = self.ping(ns, address, count)
                ctl.wait(count * PING_INTERVAL + 20)
            finally:
                stop(ctl)
            text = log.read_text(errors="replace") if log.exists() else ""
            baseline = Pings(count, [float(m) for m in _RTT.findall(text)])
            proc.wait(self.seconds + 20)
            return pings, baseline
        finally:
            stop(proc)

    def pin_apart(self, relay: list[Any], others: list[Any]) -> None:
        """The relay's threads on CPU 0, the attack's processes on the others, as if the
        relay had a machine of its own (the watching client is not pinned)."""
        if os.cpu_count() in (None, 1):
            return
        rest = f"1-{(os.cpu_count() or 2) - 1}"
        for procs, cpus in ((relay, "0"), (others, rest)):
            for proc in procs:
                if proc is not None and proc.poll() is None:
                    subprocess.run(
                        ["taskset", "-a", "-p", "-c", cpus, str(proc.pid)],
                        check=False,
                        capture_output=True,
                    )

    def warm(self, ns: Namespace, address: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ns.run(["ping", "-n", "-c", "1", "-W", "1", address], check=False).returncode == 0:
                return
        raise RuntimeError(f"no ping reply from {address} in {ns.name}")

    def python(self, ns: Namespace, code: str, *args: str, log: str) -> subprocess.Popen[bytes]:
        """Run `code` with this checkout's gtun importable, in `ns`."""
        return ns.spawn([sys.executable, "-c", code, *args], log_path=self.workdir / log)

    def relay_drops(self, net: GtunNet) -> dict[str, int]:
        st = net.status(net.relay) or {}
        drops = st.get("drops") or {}
        return {k: v for k, v in drops.items() if v}


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_port(ns: Namespace, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f":{port}" in ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} in {ns.name}")


def mbits(log: Path) -> str:
    """iperf3's receiver rate from its text output (the [SUM] line with -P)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [line for line in text.splitlines() if line.rstrip().endswith("receiver")]
    lines.sort(key=lambda line: "[SUM]" not in line)
    for line in lines[:1]:
        parts = line.split()
        for i, word in enumerate(parts):
            if word.endswith("bits/sec"):
                return f"{parts[i - 1]} {word.replace('bits/sec', 'bit/s')}"
    return "? Mbit/s"


# --- scenarios ------------------------------------------------------------------------------


def _flood(h: Hostile, transport: str, pinned: bool = False) -> Row:
    tag = f"f{transport[0]}" + ("p" if pinned else "")
    with h.net(tag, transports=[transport] * 3) as net:
        c1, c2, c3 = net.clients
        h.warm(c3.ns, RELAY)
        h.warm(c1.ns, c2.extra["address"])
        idle = h.ping(c3.ns, RELAY, 50)
        server = c2.ns.spawn(
            ["iperf3", "-s", "-1", "-B", c2.extra["address"]], log_path=h.workdir / "s.log"
        )
        if pinned:
            h.pin_apart([net.relay.proc], [c1.proc, c2.proc, server])
        log = h.workdir / f"flood-{transport}.log"
        log.unlink(missing_ok=True)
        try:
            wait_port(c2.ns, 5201)
            client = c1.ns.spawn(
                ["iperf3", "-c", c2.extra["address"], "-t", str(h.seconds), "-P", "4"],
                log_path=log,
            )
            if pinned:
                h.pin_apart([], [client])
            loaded, control = h.ping_during(
                client, c3.ns, RELAY, int((h.seconds - 3) / PING_INTERVAL), 1.5, c3.underlay
            )
        finally:
            stop(server)
        drops = h.relay_drops(net)
    held = "all pings answered" if not loaded.lost else f"{loaded.lost} of {loaded.sent} lost"
    ratio = (
        statistics.fmean(loaded.rtts) / statistics.fmean(idle.rtts)
        if loaded.rtts and idle.rtts
        else float("nan")
    )
    return Row(
        f"flood ({transport}" + (", relay on a core of its own)" if pinned else ")"),
        f"c1->c2 iperf3 -P 4 ({mbits(log)}), c3 pings the relay",
        f"{held}; {ratio:.1f}x idle",
        f"idle {idle.text()}; flood {loaded.text()}; underlay {control.text()}",
        {"idle": idle.rtts, "loaded": loaded.rtts, "control": control.rtts, "drops": drops},
    )


def flood_udp(h: Hostile) -> Row:
    return _flood(h, "udp")


def flood_tcp(h: Hostile) -> Row:
    return _flood(h, "tcp")


def garbage(h: Hostile, gso: bool = True) -> Row:
    with h.net("g" if gso else "gp", clients=2, transports=["", "udp"]) as net:
        c1, c2 = net.clients
        h.warm(c2.ns, RELAY)
        idle = h.ping(c2.ns, RELAY, 50)
        log = h.workdir / "garbage.out"
        log.unlink(missing_ok=True)
        how = "gso" if gso else "plain"
        sender = c1.ns.spawn(
            [sys.executable, GARBAGE, c1.underlay, str(PORT), str(h.seconds), how],
            log_path=log,
        )
        loaded, control = h.ping_during(
            sender, c2.ns, RELAY, int((h.seconds - 2) / PING_INTERVAL), 1.0, c2.underlay
        )
        drops = h.relay_drops(net)
    try:
        count = int(log.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        count = 0
    held = "all pings answered" if not loaded.lost else f"{loaded.lost} of {loaded.sent} lost"
    return Row(
        "garbage (udp)" if gso else "garbage (udp, one per send)",
        f"{count / h.seconds / 1000:.0f}k datagrams/s of 148 random bytes (type 4)"
        + (", 64 per GSO send" if gso else ""),
        f"{held}; relay dropped {sum(drops.values())}",
        f"idle {idle.text()}; garbage {loaded.text()}; underlay {control.text()}",
        {
            "idle": idle.rtts,
            "loaded": loaded.rtts,
            "control": control.rtts,
            "sent": count,
            "drops": drops,
        },
    )


SLOWLORIS = """
import selectors, socket, sys, time
host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
opened = refused = 0
def connect():
    global opened
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    sel.register(s, selectors.EVENT_READ)
    opened += 1
    return s
socks = [connect() for _ in range(n)]
end = time.monotonic() + seconds
last = time.monotonic()
while time.monotonic() < end:
    for key, _ in sel.select(0.2):
        s = key.fileobj
        try:
            gone = s.recv(1) == b""
        except OSError:
            gone = True
        if gone:
            sel.unregister(s); s.close(); refused += 1
            socks.remove(s); socks.append(connect())
    if time.monotonic() - last > 2:  # half the socks trickle one byte of a frame header
        last = time.monotonic()
        for s in socks[::2]:
            try: s.send(b"\\x00")
            except OSError: pass
        print(opened, refused, flush=True)  # the last line counts: it is stopped, not ended
"""


def slowloris(h: Hostile) -> Row:
    with h.net("s", clients=2, transports=["", ""]) as net:
        c1, c2 = net.clients
        n = 600
        log = h.workdir / "slowloris.out"
        log.unlink(missing_ok=True)
        attacker = h.python(
            c1.ns, SLOWLORIS, c1.underlay, str(PORT), str(n), str(h.seconds + 30),
            log="slowloris.out",
        )  # fmt: skip
        try:
            time.sleep(2.0)
            started = time.monotonic()
            net.start_client(c2, "tcp")
            try:
                net.wait_configured(c2, timeout=CONFIGURE_TIMEOUT)
                connect = time.monotonic() - started
            except (TimeoutError, RuntimeError):
                connect = None
            loaded = (
                h.ping(c2.ns, RELAY, int(h.seconds / PING_INTERVAL))
                if connect is not None
                else Pings(0, [])
            )
            st = net.status(net.relay) or {}
        finally:
            stop(attacker)
        drops = {k: v for k, v in (st.get("drops") or {}).items() if v}
    try:
        opened, closed = (int(x) for x in log.read_text().split()[-2:])
    except (OSError, ValueError):
        opened = closed = 0
    if connect is None:
        held = f"c2 NOT configured within {CONFIGURE_TIMEOUT:.0f} s"
        figure = "-"
    else:
        tcp = ", ".join(f"{k} {v}" for k, v in drops.items() if k.startswith("tcp_"))
        held = (
            f"c2 configured in {connect:.1f} s; "
            + ("all pings answered" if not loaded.lost else f"{loaded.lost} of {loaded.sent} lost")
            + (f"; relay: {tcp}" if tcp else "")
        )
        figure = f"ping {loaded.text()}"
    return Row(
        "slowloris (tcp)",
        f"{n} idle/1-byte TCP connections, {opened} opened, {closed} closed by the relay",
        held,
        figure,
        {"connect_s": connect, "loaded": loaded.rtts, "opened": opened, "drops": drops},
    )


HS_FLOOD = Path(__file__).resolve().parent.parent / "tests" / "scripts" / "hs_flood.py"
HS_FLOOD_KEYS = 8


def handshake_flood(h: Hostile) -> Row:
    """Initiations from keys the relay does not know, as fast as one process makes them,
    from one address: without mac2 at first, then with the cookie the relay answered
    with (reused for as long as it lasts); a real client starts one second into it."""
    from gtun.app.keys import encode_key, public_key

    with h.net("h", clients=2, transports=["", ""]) as net:
        c1, attacker = net.clients
        log = h.workdir / "hs_flood.out"
        log.unlink(missing_ok=True)
        seconds = max(h.seconds, 8)
        flood = attacker.ns.spawn(
            [
                sys.executable,
                str(HS_FLOOD),
                attacker.underlay,
                str(PORT),
                encode_key(public_key(net.relay.key)),
                str(seconds),
                str(HS_FLOOD_KEYS),
            ],
            log_path=log,
        )
        try:
            time.sleep(1.0)
            started = time.monotonic()
            net.start_client(c1)
            net.wait_configured(c1, timeout=CONFIGURE_TIMEOUT)
            joined = time.monotonic() - started
            pings = h.ping(c1.ns, RELAY, 30)
            flood.wait(seconds + 20)
        finally:
            stop(flood)
        drops = h.relay_drops(net)
    try:
        counts = json.loads(log.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        counts = {}
    sent = counts.get("sent", 0)
    dh = drops.get("unknown_peer", 0)
    held = (
        f"client configured in {joined:.1f} s, {len(pings.rtts)}/{pings.sent} pings; "
        f"{counts.get('responses', 0)} responses to the flood"
    )
    return Row(
        "handshake flood (udp)",
        f"{sent / seconds / 1000:.1f}k initiations/s from {HS_FLOOD_KEYS} unknown keys, one "
        f"address, {counts.get('with_mac2', 0)} with a reused cookie",
        held,
        f"DH done for the flood {dh} ({dh / seconds:.0f}/s); refused before DH "
        f"{drops.get('handshake_ratelimited', 0)}; cookie replies {drops.get('cookie', 0)}; "
        f"client ping {pings.text()}",
        {"counts": counts, "drops": drops, "joined_s": joined, "pings": pings.rtts},
    )


SCENARIOS: dict[str, Callable[[Hostile], Row]] = {
    "handshake-flood": handshake_flood,
    "flood-udp": flood_udp,
    "flood-tcp": flood_tcp,
    "flood-udp-pinned": lambda h: _flood(h, "udp", pinned=True),
    "flood-tcp-pinned": lambda h: _flood(h, "tcp", pinned=True),
    "garbage": garbage,
    "garbage-plain": lambda h: garbage(h, gso=False),
    "slowloris": slowloris,
}


# --- output -------------------------------------------------------------------------------


def cells(rows: list[Row]) -> list[list[str]]:
    return [[r.scenario, r.sent, r.held, r.figure] for r in rows]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="length of each attack (10)")
    p.add_argument(
        "--scenarios",
        type=lambda s: s.split(","),
        default=list(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (all)",
    )
    report.add_output_args(p)
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.seconds < 4:
        p.error("--seconds must be at least 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refused = report.preflight("hostile.py", PREFIX)
    if refused is not None:
        return refused
    with report.workdir(args, "gtun-hostile-") as workdir:
        h = Hostile(args, workdir)
        rows = report.each(
            args.scenarios,
            lambda key: f"{key} ...",
            lambda key: [SCENARIOS[key](h)],
            lambda key, error: [Row(key, "-", f"FAILED: {error}", "-")],
        )
    if rows is None:
        return 130
    report.emit(HEADERS, cells(rows), rows, args)
    return 1 if any(r.held.startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
