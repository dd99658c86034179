#!/usr/bin/env python3
"""Several relays on one PostgreSQL store (the relay mesh, one hop), measured in network
namespaces: one table.

Run as root:

    python3 bench/mesh.py [--runs 3] [--seconds 5] [--pings 20] [--transports udp,tcp]
                          [--parts paths,failover] [--markdown [FILE]] [--json FILE]
                          [--workdir DIR]

Every lab is gtun.lab.mesh's: relays r1.. and clients in namespaces "gtmbm...", all
routed through a "wan" namespace (underlay addresses 10.246.<i>.0/24 inside them; nothing
in the root namespace changes), on a PostgreSQL of the script's own (a Unix socket in a
temporary folder, gtun.lab.postgres; a fresh database per lab).  Parts (`--parts`):

  paths     client to client on ONE relay (c1 and c3, both at r1) beside client to
            client ACROSS two relays (c1 at r1, c2 at r2: one hop over the mesh), in one
            lab: iperf3 with one TCP stream for --seconds (the receiver's rate), ping
            RTT idle (--pings pings 0.1 s apart) and under load (every 0.2 s during the
            iperf3 run), medians; --runs rounds, the two paths interleaved in each, for
            each of --transports (the clients restarted on it)
  failover  three relays, c1 at r1 and c2 at r2; c1 pings c2 (every 0.1 s or so, each
            ping given 0.2 s) and r1 is killed (SIGKILL): the time from the kill to the
            first answer, over --runs kills (a fresh lab each), median and max; where c1
            went and whether it kept its tunnel address

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as hub_bench  # noqa: E402  (iperf3, ping and the pings under load, as bench.py)
import report  # noqa: E402  (beside this script: what the table scripts share)
from gtun.app.pgstore import migrate  # noqa: E402
from gtun.lab.mesh import MeshNet  # noqa: E402
from gtun.lab.net import Node  # noqa: E402
from gtun.lab.netns import Lab  # noqa: E402
from gtun.lab.postgres import PostgresServer  # noqa: E402

# Every namespace of this script starts with it ("gtmb", and "m": pmtu.py's labs are
# "gtmb<hex>", so that the two never take each other's for their own).
PREFIX = "gtmbm"
UNDERLAY = 246  # 10.246.0.0/16, inside the labs only
TRANSPORTS = ("udp", "tcp")
CONFIGURE_TIMEOUT = 30.0
LEARNT_TIMEOUT = 15.0  # for a client to keep the relays its relay pushed
FAILOVER_TIMEOUT = 60.0  # from the kill; no answer by then is a failed kill
IDLE_PING_INTERVAL = 0.1
HEADERS = ("case", "transport", "runs", "Mbit/s", "RTT idle", "RTT load", "failover", "note")
ERRORS = (*report.ERRORS, KeyError)


@dataclass
class Row:
    case: str
    transport: str
    what: str
    mbit: list[float] = field(default_factory=list)
    rtt_idle: list[float] = field(default_factory=list)  # ms
    rtt_load: list[float] = field(default_factory=list)  # ms
    failover: list[float] = field(default_factory=list)  # seconds
    note: str = ""
    errors: list[str] = field(default_factory=list)


class Sitting:
    """What the parts share: the settings, the working directory and the store's server."""

    def __init__(self, args: argparse.Namespace, workdir: Path, pg: PostgresServer) -> None:
        self.runs: int = args.runs
        self.seconds: int = args.seconds
        self.pings: int = args.pings
        self.transports: list[str] = args.transports
        self.workdir = workdir
        self.pg = pg
        self.labs = 0

    def mesh(self, lab: Lab, tag: str, relays: int, clients: dict[str, str]) -> MeshNet:
        """A MeshNet on a new database of the sitting's server (migrated), not started."""
        self.labs += 1
        dsn = self.pg.create_database(f"mesh{self.labs}")
        migrate(dsn)
        return MeshNet(
            lab,
            self.workdir / f"{tag}{self.labs}",
            dsn,
            relays=relays,
            clients=clients,
            underlay=UNDERLAY,
            debug=False,
        )


def start_clients(net: MeshNet, transport: str) -> None:
    """(Re)start every client on `transport`; wait until each is configured and every
    relay sees it at its home relay."""
    for c in net.clients:
        net.stop(c)
        net.start_client(c, transport)
    for c in net.clients:
        net.wait_configured(c, timeout=CONFIGURE_TIMEOUT)
    for c in net.clients:
        net.wait_presence(c, net.home[c.name])


# --- parts ------------------------------------------------------------------------------


def measure(s: Sitting, row: Row, src: Node, dst: Node, log_dir: Path) -> None:
    """One round of one path into `row`: idle pings, then one iperf3 stream with pings
    alongside."""
    address = dst.extra["address"]
    hub_bench.warm_up(src.ns, address)
    row.rtt_idle.append(hub_bench.ping(src.ns, address, s.pings, IDLE_PING_INTERVAL))
    pings = hub_bench.LoadPings(src.ns, address, s.seconds, log_dir / "ping-load.log")
    try:
        got = hub_bench.iperf(src.ns, dst.ns, address, s.seconds, log_dir, on_start=pings.start)
    finally:
        rtts = pings.stop()
    row.mbit.append(got["end"]["sum_received"]["bits_per_second"] / 1e6)
    if rtts:
        row.rtt_load.append(statistics.median(rtts))


def paths(s: Sitting) -> list[Row]:
    rows: list[Row] = []
    with Lab(f"{PREFIX}p") as lab:
        net = s.mesh(lab, "paths", 2, {"c1": "r1", "c2": "r2", "c3": "r1"})
        c1, c2, c3 = net.clients
        cases = (
            ("one relay", "c1 -> c3, both at r1", c3),
            ("across two relays", "c1 at r1 -> c2 at r2, one mesh hop", c2),
        )
        try:
            net.start_relays()
            for transport in s.transports:
                start_clients(net, transport)
                these = [Row(case, transport, what) for case, what, _ in cases]
                for _ in range(s.runs):
                    for row, (_, _, dst) in zip(these, cases, strict=True):
                        try:
                            measure(s, row, c1, dst, net.dir)
                        except ERRORS as e:
                            row.errors.append(_first_line(e))
                one, across = these
                if one.mbit and across.mbit:
                    ratio = statistics.median(across.mbit) / statistics.median(one.mbit)
                    across.note = f"{ratio:.2f}x one relay's throughput"
                rows += these
        finally:
            net.stop_all()
    return rows


def one_failover(s: Sitting, transport: str) -> tuple[float, str, bool]:
    """A fresh lab, r1 killed under c1: (seconds from the kill to c1's first answer
    from c2, the relay c1 is at then, whether it kept its address)."""
    with Lab(f"{PREFIX}f") as lab:
        net = s.mesh(lab, "failover", 3, {"c1": "r1", "c2": "r2"})
        c1, c2 = net.clients
        r1 = net.relays[0]
        try:
            net.start_relays()
            start_clients(net, transport)
            a1, a2 = c1.extra["address"], c2.extra["address"]
            hub_bench.warm_up(c1.ns, a2)
            net.wait_learnt(c1, LEARNT_TIMEOUT)
            assert r1.proc is not None
            killed = time.monotonic()
            r1.proc.kill()
            at = hub_bench.first_answer(c1.ns, a2, killed + FAILOVER_TIMEOUT)
            if at is None:
                raise RuntimeError(f"c1 did not reach c2 within {FAILOVER_TIMEOUT:g} s")
            st = net.status(c1) or {}
            key = st["peers"][0]["public_key"]
            now_at = next((r.name for r in net.relays if r.public == key), "?")
            return at - killed, now_at, str(st["address"]).split("/")[0] == a1
        finally:
            net.stop_all()


def failover(s: Sitting) -> list[Row]:
    rows = []
    for transport in s.transports:
        row = Row("failover, relay SIGKILL", transport, "c1 at r1 pings c2 at r2; r1 killed")
        went: collections.Counter[str] = collections.Counter()
        kept = 0
        for _ in range(s.runs):
            try:
                took, now_at, same = one_failover(s, transport)
            except ERRORS as e:
                row.errors.append(_first_line(e))
                continue
            row.failover.append(took)
            went[now_at] += 1
            kept += same
        if row.failover:
            to = ", ".join(f"{name} x{n}" for name, n in sorted(went.items()))
            row.note = f"moved to {to}; address kept {kept}/{len(row.failover)}"
        rows.append(row)
    return rows


PARTS: dict[str, Callable[[Sitting], list[Row]]] = {"paths": paths, "failover": failover}


# --- output -------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _median(values: list[float], fmt: str) -> str:
    return format(statistics.median(values), fmt) if values else "-"


def cells(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        runs = len(r.failover) if r.failover else max(len(r.mbit), len(r.rtt_idle))
        failover = (
            f"{statistics.median(r.failover):.2f} s (max {max(r.failover):.2f})"
            if r.failover
            else "-"
        )
        note = r.note
        if r.errors:
            note = "; ".join(filter(None, [note, f"{len(r.errors)} failed: {r.errors[-1]}"]))
        out.append(
            [
                f"{r.case} ({r.what})",
                r.transport,
                str(runs),
                _median(r.mbit, ".0f"),
                _median(r.rtt_idle, ".2f") + (" ms" if r.rtt_idle else ""),
                _median(r.rtt_load, ".2f") + (" ms" if r.rtt_load else ""),
                failover,
                note,
            ]
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--parts",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=list(PARTS),
        help=f"comma-separated, of: {', '.join(PARTS)} (all)",
    )
    p.add_argument(
        "--transports",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=list(TRANSPORTS),
        help="the clients' transports, comma-separated (udp,tcp)",
    )
    p.add_argument("--runs", type=int, default=3, help="rounds of each path; kills (3)")
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run (5)")
    p.add_argument("--pings", type=int, default=20, help="idle pings per path and run (20)")
    report.add_output_args(p)
    args = p.parse_args(argv)
    unknown = [x for x in args.parts if x not in PARTS]
    unknown += [x for x in args.transports if x not in TRANSPORTS]
    if unknown:
        p.error(f"unknown part(s) or transport(s) {', '.join(unknown)}")
    if args.runs < 1 or args.seconds < 1 or args.pings < 1:
        p.error("--runs, --seconds and --pings must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refused = report.preflight("mesh.py", PREFIX)
    if refused is not None:
        return refused
    with report.workdir(args, "gtun-mesh-") as workdir:
        pg = PostgresServer()
        try:
            pg.start()
            s = Sitting(args, workdir, pg)
            rows = report.each(
                args.parts,
                lambda key: f"{key} ...",
                lambda key: PARTS[key](s),
                lambda key, error: [Row(key, "-", "-", errors=[error])],
            )
        finally:
            pg.close()
    if rows is None:
        return 130
    report.emit(HEADERS, cells(rows), rows, args)
    print(
        f"\niperf3 one TCP stream, {args.seconds} s a run, the receiver's rate; RTT idle: "
        f"median of {args.pings} pings {IDLE_PING_INTERVAL} s apart; RTT load: median of "
        f"pings every {hub_bench.LOAD_PING_INTERVAL} s during the iperf3 run; medians over "
        f"the runs.  Failover: from the SIGKILL to c1's first answered ping to c2.  "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}, Python {platform.python_version()}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
