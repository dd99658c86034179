#!/usr/bin/env python3
"""gtun under faults, measured beside a wireguard-go hub where one exists: one table.

Run as root:

    python3 bench/faults.py [--scenarios loss,relay-kill,...] [--rounds 3] [--size-mb 20]
                            [--markdown [FILE]] [--json FILE] [--workdir DIR]

Every scenario builds its own lab (namespaces "gtfl<tag>...", underlay addresses
10.235.<i>.0/24 and the wireguard-go hub's 10.240.111-113.0/24 inside them; nothing in
the root namespace changes), runs, removes everything, and gives rows: the scenario,
what was done, what held, the figure.  Scenarios (`--scenarios` takes these keys):

  loss        client to client transfers of --size-mb random bytes (SHA-256 checked)
              through gtun's relay and through a wireguard-go hub, while an nftables
              rule in the relay's (the hub's) namespace drops 0, 5, 10 and 20% of the
              UDP datagrams arriving there at random (`numgen random`; this kernel has
              no netem), so each direction loses that much; --rounds interleaved
              rounds, the median time of each (the lab's veths cut UDP GSO trains
              into datagrams, so that a drop takes one datagram, as on a real path)
  relay-kill  the relay is killed (SIGKILL) and started again while a UDP and a TCP
              client ping it: the time from the restart to each client's first answered
              ping, and whether each kept its address

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as hub_bench  # noqa: E402  (the wireguard-go hub, as bench.py builds it)
from gtun.lab.net import GtunNet  # noqa: E402
from gtun.lab.netns import Lab, Namespace, list_namespaces  # noqa: E402

PREFIX = "gtfl"  # every namespace of this script starts with it
UNDERLAY = 235  # client i's underlay: 10.235.<i>.0/24 (inside the lab only)
RELAY = "10.66.0.1"  # the relay's tunnel address (GtunNet's default network)
LOSSES = tuple(int(x) for x in os.environ.get("GTUN_FAULTS_LOSSES", "0,5,10,20").split(","))
TRANSFER_TIMEOUT = 300.0
CONFIGURE_TIMEOUT = 40.0
HEAL_TIMEOUT = 60.0
RUN_BEFORE_KILL = 3.0  # seconds the relay serves its clients before it is killed
HEADERS = ("scenario", "what was done", "what held", "figure")


@dataclass
class Row:
    scenario: str
    done: str
    held: str
    figure: str
    data: dict[str, Any] | None = None  # every number, for --json


class Faults:
    """What scenarios share: the settings and the working directory."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.rounds: int = args.rounds
        self.size = args.size_mb << 20
        self.workdir = workdir

    @contextlib.contextmanager
    def net(self, lab: Lab, tag: str, *, clients: int, transports: list[str]) -> Iterator[GtunNet]:
        """A relay and `clients` clients (transports "udp"/"tcp"), started, configured."""
        net = GtunNet(lab, self.workdir / tag, clients=clients, underlay=UNDERLAY, lan=False)
        net.start_relay()
        for c, t in zip(net.clients, transports, strict=True):
            net.start_client(c, t)
        for c in net.clients:
            net.wait_configured(c, timeout=CONFIGURE_TIMEOUT)
        yield net


def set_loss(ns: Namespace, percent: int) -> None:
    """Drop `percent`% of the UDP datagrams arriving in `ns`, at random (0: no rule):
    each direction of a client to client path crosses one such loss.  The table is this
    namespace's own and goes with it."""
    ns.run(["nft", "delete", "table", "inet", "gtfloss"], check=False)
    if not percent:
        return
    rules = (
        "table inet gtfloss {\n"
        " chain in { type filter hook input priority 0; policy accept;\n"
        f"  meta l4proto udp numgen random mod 100 < {percent} drop\n }}\n"
        "}\n"
    )
    ns.run(["nft", "-f", "-"], input=rules)


# --- scenarios ------------------------------------------------------------------------------


def loss(f: Faults) -> list[Row]:
    times: dict[tuple[str, int], list[float]] = {}
    bad: list[str] = []
    wg = hub_bench.WireGuardGo(f.workdir)
    with Lab(f"{PREFIX}l") as lab:
        try:
            hub = hub_bench.setup_wireguard_go_hub(lab, wg)
            hub_ns = next(ns for ns in lab.namespaces if ns.name.endswith("wh"))
            net = GtunNet(lab, f.workdir / "gtun", clients=2, underlay=UNDERLAY, lan=False)
            net.start_all(timeout=CONFIGURE_TIMEOUT)
            for ns in lab.namespaces:  # a drop takes one datagram, as on a real path
                ns.datagrams_on_the_wire()
            c1, c2 = net.clients
            paths: dict[str, tuple[Namespace, Namespace, str, Namespace]] = {
                "gtun": (c1.ns, c2.ns, c2.extra["address"], net.relay.ns),
                "wireguard-go hub": (hub.src, hub.dst, hub.address, hub_ns),
            }
            for src, _, address, _ in paths.values():
                hub_bench.warm_up(src, address)
            for _ in range(f.rounds):
                for percent in LOSSES:
                    for name, (src, dst, address, middle) in paths.items():
                        set_loss(middle, percent)
                        try:
                            sent, got, seconds = net.transfer(
                                src, dst, address, f.size, timeout=TRANSFER_TIMEOUT
                            )
                        except (RuntimeError, subprocess.TimeoutExpired) as e:
                            lines = str(e).strip().splitlines()
                            bad.append(f"{name} {percent}%: {lines[-1] if lines else e}")
                            continue
                        finally:
                            set_loss(middle, 0)
                        if sent != got:
                            bad.append(f"{name} {percent}%: checksum mismatch")
                            continue
                        times.setdefault((name, percent), []).append(seconds)
        finally:
            wg.remove_sockets()
    rows = []
    for percent in LOSSES:
        gt = times.get(("gtun", percent), [])
        wg_t = times.get(("wireguard-go hub", percent), [])
        if not gt or not wg_t:
            rows.append(Row(f"loss {percent}%", "-", "FAILED: " + "; ".join(bad[-2:]), "-"))
            continue
        g, w = statistics.median(gt), statistics.median(wg_t)
        mb = f.size >> 20
        rows.append(
            Row(
                f"loss {percent}% (udp)",
                f"{mb} MB client to client, {len(gt)} rounds, random drops at the relay",
                f"checksums match; gtun {g / w:.2f}x wireguard-go's time",
                f"gtun {g:.2f} s ({mb * 8 / g:.0f} Mbit/s); wireguard-go hub {w:.2f} s "
                f"({mb * 8 / w:.0f} Mbit/s)",
                {"gtun": gt, "wireguard-go hub": wg_t, "errors": bad},
            )
        )
    return rows


def _first_answer(ns: Namespace, address: str, deadline: float) -> float | None:
    """Ping `address` every 0.1 s until one answer; the time it came (monotonic)."""
    while time.monotonic() < deadline:
        if ns.run(["ping", "-n", "-c", "1", "-W", "0.2", address], check=False).returncode == 0:
            return time.monotonic()
        time.sleep(0.05)
    return None


def relay_kill(f: Faults) -> list[Row]:
    with Lab(f"{PREFIX}k") as lab, f.net(lab, "k", clients=2, transports=["udp", "tcp"]) as net:
        before = {c.name: net.wait_configured(c) for c in net.clients}
        for c in net.clients:
            hub_bench.warm_up(c.ns, RELAY)
        time.sleep(RUN_BEFORE_KILL)  # a relay that has run a moment (saved endpoints)
        proc = net.relay.proc
        assert proc is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        time.sleep(1.0)  # the clients' next packets go nowhere
        restarted = time.monotonic()  # the restart: from the new process's spawn
        net.start_relay()
        with concurrent.futures.ThreadPoolExecutor(len(net.clients)) as pool:
            waits = {
                c.name: pool.submit(_first_answer, c.ns, RELAY, restarted + HEAL_TIMEOUT)
                for c in net.clients
            }
            healed = {name: w.result() for name, w in waits.items()}
        after = {c.name: net.wait_configured(c) for c in net.clients}
    rows = []
    for c, transport in zip(("c1", "c2"), ("udp", "tcp"), strict=True):
        at = healed.get(c)
        same = "same address" if before.get(c) == after.get(c) else "address changed"
        rows.append(
            Row(
                f"relay SIGKILL ({transport})",
                "relay killed 3 s after the clients joined, restarted 1 s later; the "
                "client pings the relay",
                f"flows again; {same}" if at is not None else f"no answer in {HEAL_TIMEOUT:.0f} s",
                f"{at - restarted:.2f} s from the restart (spawn) to the first answer"
                if at is not None
                else "-",
                {"seconds": None if at is None else at - restarted, "same_address": same},
            )
        )
    return rows


SCENARIOS: dict[str, Callable[[Faults], list[Row]]] = {
    "loss": loss,
    "relay-kill": relay_kill,
}


# --- output -------------------------------------------------------------------------------


def text_table(rows: list[Row]) -> str:
    cells = [list(HEADERS)] + [[r.scenario, r.done, r.held, r.figure] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|---|---|---|"]
    lines += [f"| {r.scenario} | {r.done} | {r.held} | {r.figure} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--scenarios",
        type=lambda s: s.split(","),
        default=list(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (all)",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of loss (3)")
    p.add_argument("--size-mb", type=int, default=20, help="bytes per loss transfer, MB (20)")
    p.add_argument(
        "--markdown", nargs="?", const="-", metavar="FILE",
        help="also print the table as Markdown (or write it to FILE)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.add_argument("--workdir", type=Path, help="keep configs and logs here (default: temporary)")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.rounds < 1 or args.size_mb < 1:
        p.error("--rounds and --size-mb must be at least 1")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("faults.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    stale = [n for n in list_namespaces() if n.startswith(PREFIX)]
    if stale:
        print(f"faults.py: namespaces {', '.join(stale)} exist (another run?)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gtun-faults-")))
        f = Faults(args, workdir)
        for key in args.scenarios:
            print(f"{key} ...", file=sys.stderr, flush=True)
            try:
                rows += SCENARIOS[key](f)
            except KeyboardInterrupt:
                print("interrupted; namespaces removed", file=sys.stderr)
                return 130
            except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired) as e:
                rows.append(Row(key, "-", f"FAILED: {str(e).splitlines()[0]}", "-"))
    print()
    print(text_table(rows))
    if args.markdown is not None:
        md = markdown_table(rows)
        if args.markdown == "-":
            print()
            print(md, end="")
        else:
            Path(args.markdown).write_text(md)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
