#!/usr/bin/env python3
"""A relay on every core, measured: aggregate throughput of 1, 2 and 4 client pairs
through one relay with 1 and with 2 workers, in network namespaces; one table and a
line with the scaling ratio.

Run as root:

    python3 bench/workers.py [--runs 3] [--seconds 5] [--pairs 1,2,4] [--workers 1,2]
                             [--transport udp] [--markdown [FILE]] [--json FILE]

For each number of workers, one lab (gtun.lab.net's: a relay and 8 clients in
namespaces "gtmbw...", underlay 10.247.<i>.0/24 inside them; nothing in the root
namespace changes) with `workers = N`.  Pair i is client 2i-1 sending to client 2i
(client to client through the relay); for each number of pairs, every pair runs one
iperf3 TCP stream for --seconds at the same time, and the receivers' rates are added
(the aggregate), while client 1 pings client 2 every 0.2 s (RTT under load, median),
and the relay's processes' CPU seconds per GB received are counted.  With several
workers, one pair is measured twice: put on one worker, and across two (client 2
restarted until the kernel's hash places it so), which shows what handing packets
between workers costs.  --runs rounds; medians.  A client's worker is the kernel's
hash of its address and port (app/workers.py): the table says how the clients of each
row were spread ("3+1": three on worker 0, one on worker 1).

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as hub_bench  # noqa: E402  (iperf3 and the pings under load, as bench.py)
import report  # noqa: E402  (beside this script: what the table scripts share)
from gtun.lab.net import GtunNet  # noqa: E402
from gtun.lab.netns import Lab  # noqa: E402

PREFIX = "gtmbw"
UNDERLAY = 247
CONFIGURE_TIMEOUT = 30.0
PLACE_TRIES = 12  # client restarts to put a pair on one worker, or across two
HEADERS = (
    "workers",
    "pairs",
    "clients per worker",
    "aggregate Mbit/s",
    "x 1 worker",
    "RTT load",
    "relay CPU s/GB",
)


@dataclass
class Row:
    workers: int
    pairs: int
    spread: list[str] = field(default_factory=list)
    mbit: list[float] = field(default_factory=list)
    rtt_load: list[float] = field(default_factory=list)  # ms
    cpu_per_gb: list[float] = field(default_factory=list)  # relay processes, all workers
    errors: list[str] = field(default_factory=list)
    place: str = ""  # "same" or "across": one pair put on one worker or on two


def holders(net: GtunNet) -> dict[str, int]:
    st = net.status(net.relay)
    return {p["name"]: p.get("worker") or 0 for p in (st or {}).get("peers", [])}


def spread(net: GtunNet, clients: int, workers: int) -> str:
    held = holders(net)
    counts = [0] * workers
    for c in net.clients[:clients]:
        counts[held.get(c.name, 0)] += 1
    return "+".join(str(n) for n in counts)


def place(net: GtunNet, same: bool) -> None:
    """Restart client 2 until pair 1 is on one worker (`same`) or on two: a client's
    worker is the kernel's hash of its source port, drawn anew at each start."""
    src, dst = net.clients[0], net.clients[1]
    for _ in range(PLACE_TRIES):
        hub_bench.warm_up(src.ns, dst.extra["address"])
        held = holders(net)
        if (held.get(src.name) == held.get(dst.name)) == same:
            return
        net.stop(dst)
        net.start_client(dst)
        net.wait_configured(dst, timeout=CONFIGURE_TIMEOUT)
    raise RuntimeError(f"pair 1 never {'on one worker' if same else 'across workers'}")


def relay_pids(net: GtunNet) -> dict[str, int]:
    st = net.status(net.relay) or {}
    return {f"worker {w['worker']}": w["pid"] for w in st.get("workers", []) if w.get("pid")}


def one_round(net: GtunNet, row: Row, seconds: int, log_dir: Path) -> None:
    pairs = [(net.clients[2 * i], net.clients[2 * i + 1]) for i in range(row.pairs)]
    for src, dst in pairs:
        hub_bench.warm_up(src.ns, dst.extra["address"])
    row.spread.append(spread(net, 2 * row.pairs, row.workers))
    first_src, first_dst = pairs[0]
    pings = hub_bench.LoadPings(
        first_src.ns, first_dst.extra["address"], seconds, log_dir / "ping-load.log"
    )
    results: list[float] = []
    received: list[float] = []  # bytes
    errors: list[str] = []
    started = threading.Barrier(len(pairs) + 1)
    meter = hub_bench.CpuMeter(relay_pids(net))

    def run(src: Any, dst: Any) -> None:
        try:
            got = hub_bench.iperf(
                src.ns,
                dst.ns,
                dst.extra["address"],
                seconds,
                log_dir,
                on_start=started.wait,
            )
            results.append(got["end"]["sum_received"]["bits_per_second"] / 1e6)
            received.append(got["end"]["sum_received"]["bytes"])
        except Exception as exc:  # one pair's failure is the row's, not the run's
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            started.abort()

    threads = [threading.Thread(target=run, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    try:
        started.wait(timeout=30)
        pings.start()
        meter.start()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(seconds + 60)
    meter.stop()
    rtts = pings.stop()
    if errors:
        raise RuntimeError(errors[0])
    row.mbit.append(sum(results))
    if received:
        row.cpu_per_gb.append(sum(meter.seconds.values()) / (sum(received) / 1e9))
    if rtts:
        row.rtt_load.append(statistics.median(rtts))


def measure(args: argparse.Namespace, workdir: Path, workers: int) -> list[Row]:
    rows = [Row(workers, n) for n in args.pairs]
    if workers > 1 and 1 in args.pairs:
        # One pair on one worker and across two: what a handoff costs.
        rows = [Row(workers, 1, place="same"), Row(workers, 1, place="across")]
        rows += [Row(workers, n) for n in args.pairs if n != 1]
    clients = 2 * max(args.pairs)
    with Lab(PREFIX) as lab:
        net = GtunNet(
            lab,
            workdir / f"w{workers}",
            clients=clients,
            underlay=UNDERLAY,
            lan=False,
            nat=False,
            workers=workers,
        )
        for c in net.clients:
            net.set_transport(c, args.transport)
        net.start_all(timeout=CONFIGURE_TIMEOUT)
        log_dir = workdir / f"w{workers}"
        for _ in range(args.runs):
            for row in rows:
                try:
                    if row.place:
                        place(net, row.place == "same")
                    one_round(net, row, args.seconds, log_dir)
                except report.ERRORS as exc:
                    row.errors.append(str(exc).splitlines()[0])
    return rows


def cells(rows: list[Row]) -> list[list[str]]:
    base = {r.pairs: statistics.median(r.mbit) for r in rows if r.workers == 1 and r.mbit}
    out = []
    for r in rows:
        mbit = statistics.median(r.mbit) if r.mbit else None
        ratio = f"{mbit / base[r.pairs]:.2f}" if mbit and r.pairs in base else "-"
        pairs = str(r.pairs) + (
            f" ({r.place} worker{'s' if r.place == 'across' else ''})" if r.place else ""
        )
        out.append(
            [
                str(r.workers),
                pairs,
                ", ".join(sorted(set(r.spread))) or "-",
                f"{mbit:.0f}" if mbit is not None else "FAILED: " + "; ".join(r.errors[:1]),
                ratio,
                f"{statistics.median(r.rtt_load):.2f} ms" if r.rtt_load else "-",
                f"{statistics.median(r.cpu_per_gb):.1f}" if r.cpu_per_gb else "-",
            ]
        )
    return out


def scaling_line(rows: list[Row]) -> str:
    by = {(r.workers, r.pairs): statistics.median(r.mbit) for r in rows if r.mbit}
    most = max((r.workers for r in rows), default=1)
    top = max((r.pairs for r in rows), default=1)
    if (1, top) in by and (most, top) in by and most > 1:
        return (
            f"Scaling: {top} pairs move {by[(most, top)]:.0f} Mbit/s with {most} workers "
            f"against {by[(1, top)]:.0f} with one: {by[(most, top)] / by[(1, top)]:.2f}x "
            f"on {os.cpu_count()} CPUs shared by the relay, {2 * top} clients and iperf3."
        )
    return "Scaling: not measured (one number of workers only, or a row failed)."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    def ints(v: str) -> list[int]:
        return [int(x) for x in v.split(",") if x.strip()]

    p.add_argument("--pairs", type=ints, default=[1, 2, 4], help="client pairs (1,2,4)")
    p.add_argument("--workers", type=ints, default=[1, 2], help="relay workers (1,2)")
    p.add_argument("--transport", default="udp", choices=("udp", "tcp"))
    p.add_argument("--runs", type=int, default=3, help="rounds (3)")
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run (5)")
    report.add_output_args(p)
    args = p.parse_args(argv)
    if args.runs < 1 or args.seconds < 1 or not args.pairs or min(args.pairs) < 1:
        p.error("--runs, --seconds and --pairs must be at least 1")
    if not args.workers or min(args.workers) < 1 or max(args.workers) > 64:
        p.error("--workers must be 1 to 64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refused = report.preflight("workers.py", PREFIX)
    if refused is not None:
        return refused
    with report.workdir(args, "gtun-workers-") as workdir:
        rows = report.each(
            args.workers,
            lambda n: f"{n} worker(s) ...",
            lambda n: measure(args, workdir, n),
            lambda n, error: [Row(n, p, errors=[error]) for p in args.pairs],
        )
    if rows is None:
        return 130
    report.emit(HEADERS, cells(rows), rows, args)
    print()
    print(scaling_line(rows))
    print(
        f"\niperf3 one TCP stream per pair ({args.transport} tunnels), {args.seconds} s a run, "
        f"the receivers' rates added; RTT load: pair 1's pings every "
        f"{hub_bench.LOAD_PING_INTERVAL} s, median; medians over {args.runs} runs.  "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
