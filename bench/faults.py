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
  client-kill a UDP client is killed (SIGKILL) and started again: the time from the
              restart (spawn) to its first answered ping to the relay and to the other
              client, and whether it kept its address
  roam        a client's underlay address changes on its veth: once while it only
              receives (the other client pings it), once while it only sends (it pings
              the other client): the time until a ping is answered again
  nat         a client behind a NAT (nftables masquerade in a router namespace) whose
              mapping changes (a new port range, conntrack flushed), while it only
              receives and while it only sends: the time until a ping is answered again
  pmtu        bench/pmtu.py's measurement: a black hole for datagrams over 1400 bytes
              (no ICMP): the time until the client lowers its MTU, until a 1400-byte
              ping passes, and until the MTU is raised once the black hole is gone
  state       the relay's state directory read-only, full (a tmpfs in the relay's own
              mount namespace), garbage or truncated at start (exit code and message),
              and read-only or full while it runs when a new peer needs a lease (the
              log line; whether the clients kept their addresses and the stored leases)

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as hub_bench  # noqa: E402  (the wireguard-go hub, as bench.py builds it)
import pmtu as pmtu_bench  # noqa: E402  (the MTU black hole, as bench/pmtu.py measures it)
import report  # noqa: E402  (beside this script: what the table scripts share)
from gtun.app.keys import encode_key, generate_private_key, public_key  # noqa: E402
from gtun.lab import statedir  # noqa: E402
from gtun.lab.net import GTUN, GtunNet  # noqa: E402
from gtun.lab.netns import Lab, Namespace  # noqa: E402

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
                        middle.drop_at_random(percent)
                        try:
                            sent, got, seconds = net.transfer(
                                src, dst, address, f.size, timeout=TRANSFER_TIMEOUT
                            )
                        except (RuntimeError, subprocess.TimeoutExpired) as e:
                            lines = str(e).strip().splitlines()
                            bad.append(f"{name} {percent}%: {lines[-1] if lines else e}")
                            continue
                        finally:
                            middle.drop_at_random(0)
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
                c.name: pool.submit(hub_bench.first_answer, c.ns, RELAY, restarted + HEAL_TIMEOUT)
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


def _answers(pairs: dict[str, tuple[Namespace, str]], since: float) -> dict[str, float | None]:
    """For each name, (from namespace, to address): the seconds from `since` to the first
    answered ping, pinging in parallel (None: no answer within HEAL_TIMEOUT)."""
    with concurrent.futures.ThreadPoolExecutor(len(pairs)) as pool:
        waits = {
            name: pool.submit(hub_bench.first_answer, ns, address, since + HEAL_TIMEOUT)
            for name, (ns, address) in pairs.items()
        }
        done = {name: w.result() for name, w in waits.items()}
    return {name: None if at is None else at - since for name, at in done.items()}


def _secs(value: float | None) -> str:
    return "no answer" if value is None else f"{value:.2f} s"


def client_kill(f: Faults) -> list[Row]:
    with Lab(f"{PREFIX}c") as lab, f.net(lab, "c", clients=2, transports=["udp", "udp"]) as net:
        c1, c2 = net.clients
        before = net.wait_configured(c1)
        other = c2.extra["address"]
        hub_bench.warm_up(c1.ns, other)
        time.sleep(RUN_BEFORE_KILL)
        assert c1.proc is not None
        os.killpg(c1.proc.pid, signal.SIGKILL)
        c1.proc.wait(10)
        time.sleep(1.0)
        restarted = time.monotonic()
        net.start_client(c1)
        took = _answers({"relay": (c1.ns, RELAY), "client": (c1.ns, other)}, restarted)
        after = net.wait_configured(c1)
    same = "same address" if before == after else f"address changed ({before} to {after})"
    flows = all(v is not None for v in took.values())
    return [
        Row(
            "client SIGKILL (udp)",
            "a client killed 3 s after joining, restarted 1 s later; it pings the relay "
            "and the other client",
            f"flows again; {same}" if flows else f"no answer in {HEAL_TIMEOUT:.0f} s; {same}",
            f"from the restart (spawn): {_secs(took['relay'])} to the relay, "
            f"{_secs(took['client'])} to the other client",
            {"seconds": took, "same_address": before == after},
        )
    ]


def _move(ns: Namespace, ifname: str, old: str, new: str) -> None:
    """The interface's address replaced by another of the same prefix (a roam); the
    secondary is promoted, so that the routes through the link survive."""
    ns.sysctl(f"net.ipv4.conf.{ifname}.promote_secondaries", 1)
    ns.run(["ip", "addr", "add", new, "dev", ifname])
    ns.run(["ip", "addr", "del", old, "dev", ifname])


def roam(f: Faults) -> list[Row]:
    rows = []
    with Lab(f"{PREFIX}r") as lab, f.net(lab, "r", clients=2, transports=["udp", "udp"]) as net:
        c1, c2 = net.clients
        a1, a2 = c1.extra["address"], c2.extra["address"]
        hub_bench.warm_up(c2.ns, a1)
        base = f"10.{UNDERLAY}.1"
        cases = (
            ("receives", f"{base}.2/24", f"{base}.3/24", c2.ns, a1, "the other client pings it"),
            ("sends", f"{base}.3/24", f"{base}.4/24", c1.ns, a2, "it pings the other client"),
        )
        for what, old, new, src, dst, how in cases:
            time.sleep(2.0)  # quiet: the moving client neither sends nor receives
            moved = time.monotonic()
            _move(c1.ns, "up0", old, new)
            took = _answers({"x": (src, dst)}, moved)["x"]
            rows.append(
                Row(
                    f"roam, only {what} (udp)",
                    f"the client's underlay address changes on its veth; {how}",
                    "flows again" if took is not None else f"no answer in {HEAL_TIMEOUT:.0f} s",
                    f"{_secs(took)} from the change to the first answer",
                    {"seconds": took},
                )
            )
    return rows


NAT_INSIDE = f"10.{UNDERLAY}.102"  # the NATed client's own network, behind its router


def _nat_rules(ports: str) -> str:
    return (
        "table ip gtflnat {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
        f'  oifname "wan0" meta l4proto udp masquerade to :{ports}\n'
        '  oifname "wan0" masquerade\n }\n}\n'
    )


FLUSH_CONNTRACK = "from pyroute2 import Conntrack\nConntrack().flush()\n"


def nat(f: Faults) -> list[Row]:
    rows = []
    with Lab(f"{PREFIX}n") as lab:
        net = GtunNet(lab, f.workdir / "n", clients=2, underlay=UNDERLAY, lan=False)
        c1, c2 = net.clients
        # c2 moves behind a router: relay <-> router (wan0, c2's old underlay) <-> c2.
        router = lab.add_ns("nat")
        net.relay.ns.run(["ip", "link", "del", "rc2"])
        lab.veth(
            net.relay.ns, "rc2", f"10.{UNDERLAY}.2.1/24", router, "wan0", f"10.{UNDERLAY}.2.2/24"
        )
        c2.ns.run(["ip", "link", "del", "up0"], check=False)
        lab.veth(router, "lan0", f"{NAT_INSIDE}.1/24", c2.ns, "up0", f"{NAT_INSIDE}.2/24")
        c2.ns.add_route("default", f"{NAT_INSIDE}.1")
        router.sysctl("net.ipv4.ip_forward", 1)
        router.run(["nft", "-f", "-"], input=_nat_rules("30000-30999"))
        net.start_all(timeout=CONFIGURE_TIMEOUT)
        a1, a2 = c1.extra["address"], c2.extra["address"]
        hub_bench.warm_up(c1.ns, a2)
        cases = (
            ("receives", "31000-31999", c1.ns, a2, "the other client pings it"),
            ("sends", "32000-32999", c2.ns, a1, "it pings the other client"),
        )
        for what, ports, src, dst, how in cases:
            time.sleep(2.0)
            changed = time.monotonic()
            router.run(["nft", "delete", "table", "ip", "gtflnat"])
            router.run(["nft", "-f", "-"], input=_nat_rules(ports))
            router.run([sys.executable, "-c", FLUSH_CONNTRACK])
            took = _answers({"x": (src, dst)}, changed)["x"]
            peer = next(p for p in (net.status(net.relay) or {})["peers"] if p["name"] == "c2")
            rows.append(
                Row(
                    f"NAT rebinding, only {what} (udp)",
                    f"the NAT in front of the client maps it to a new port (conntrack "
                    f"flushed, ports {ports}); {how}",
                    f"flows again; the relay sends to {peer['endpoint']}"
                    if took is not None
                    else f"no answer in {HEAL_TIMEOUT:.0f} s",
                    f"{_secs(took)} from the change to the first answer",
                    {"seconds": took, "endpoint": peer["endpoint"]},
                )
            )
    return rows


def mtu_black_hole(f: Faults) -> list[Row]:
    runs = pmtu_bench.measure(
        f.workdir / "m", runs=f.rounds, prefix=f"{PREFIX}m", underlay=UNDERLAY
    )
    found = sorted({r.found for r in runs})
    healed = all(r.lowered is not None and r.through is not None for r in runs)
    raised = all(r.raised is not None for r in runs)
    return [
        Row(
            "MTU black hole (udp)",
            f"datagrams over {pmtu_bench.LIMIT} bytes dropped without ICMP at the relay "
            f"while the client pings 1400-byte packets, then the drop removed; {len(runs)} runs",
            (f"MTU lowered to {', '.join(map(str, found))} by itself" if healed else "NOT healed")
            + ("; raised to 1420 again" if raised else "; NOT raised again"),
            f"lowered in {pmtu_bench.fmt([r.lowered for r in runs])}; 1400-byte ping "
            f"through in {pmtu_bench.fmt([r.through for r in runs])}; raised in "
            f"{pmtu_bench.fmt([r.raised for r in runs])} (medians)",
            {"runs": [asdict(r) for r in runs]},
        )
    ]


def _last_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("gtun:")]
    return lines[-1] if lines else (text.strip().splitlines() or ["(nothing)"])[-1]


def _new_peer(net: GtunNet) -> str:
    """A new [[peers]] in the relay's config (no client): reloading needs a new lease."""
    key = generate_private_key()
    text = net.relay.config.read_text()
    net.relay.config.write_text(
        text + f'\n[[peers]]\nname = "newcomer"\npublic_key = "{encode_key(public_key(key))}"\n'
    )
    return "newcomer"


def state(f: Faults) -> list[Row]:
    rows = []
    with Lab(f"{PREFIX}s") as lab:
        net = GtunNet(lab, f.workdir / "s", clients=2, underlay=UNDERLAY, lan=False)
        st = net.dir / "state"
        db = st / "gtun.sqlite"
        net.start_all(timeout=CONFIGURE_TIMEOUT)
        addresses = {c.name: c.extra["address"] for c in net.clients}
        net.stop(net.relay)
        saved = net.dir / "state.saved"
        subprocess.run(["cp", "-a", str(st), str(saved)], check=True)
        stored = statedir.leases_seen_by(None, db)
        good = db.read_bytes()
        server = [*GTUN, "server", "-c", str(net.relay.config)]

        def at_start(case: str, wrap: list[str], damage: bytes | None = None) -> None:
            if damage is not None:
                db.write_bytes(damage)
            try:
                out = net.relay.ns.run([*wrap, *server], check=False, timeout=60)
            finally:
                db.write_bytes(good)
            rows.append(
                Row(
                    f"state dir {case} at start",
                    "the relay started",
                    f"exit {out.returncode}: {_last_error(out.stderr)}",
                    "-",
                    {"exit": out.returncode, "stderr": out.stderr},
                )
            )

        at_start("read-only", statedir.bind_wrap(st, readonly=True))
        at_start("full", statedir.tmpfs_wrap(st, saved, size_kb=256, full=True))
        at_start("garbage gtun.sqlite", [], os.urandom(len(good)))
        at_start("truncated gtun.sqlite", [], good[: len(good) // 2])
        for case in ("read-only", "full"):
            config = net.relay.config.read_text()
            wrap = (
                statedir.bind_wrap(st)
                if case == "read-only"
                else statedir.tmpfs_wrap(st, saved, size_kb=256)
            )
            for c in net.clients:
                net.stop(c)
            net.start_relay(wrap=wrap)
            for c in net.clients:
                net.start_client(c)
            for c in net.clients:
                net.wait_configured(c, timeout=CONFIGURE_TIMEOUT)
            pid = net.relay.proc.pid  # type: ignore[union-attr]
            if case == "read-only":
                statedir.make_readonly(pid, st)
            else:
                statedir.fill(pid, st)
            mark = len(net.relay.log.read_text(errors="replace"))
            _new_peer(net)
            os.kill(pid, signal.SIGHUP)
            time.sleep(2.0)
            log = net.relay.log.read_text(errors="replace")[mark:]
            said = next((ln for ln in log.splitlines() if "reload" in ln), "(no reload line)")
            kept = {c.name: net.wait_configured(c) for c in net.clients} == addresses
            flows = all(
                hub_bench.first_answer(c.ns, RELAY, time.monotonic() + 10) is not None
                for c in net.clients
            )
            leases = statedir.leases_seen_by(pid, db)
            net.stop(net.relay)
            net.relay.config.write_text(config)
            lost = {k: a for k, a in stored.items() if leases.get(k) != a}
            rows.append(
                Row(
                    f"state dir {case} while running",
                    "a new peer in the config, then SIGHUP (it needs a new lease)",
                    f"log: {said.split('server: ', 1)[-1]}; clients "
                    + ("kept their addresses" if kept else "CHANGED addresses")
                    + (" and flow" if flows else ", NOT flowing")
                    + ("; no stored lease lost" if not lost else f"; LOST {len(lost)} leases"),
                    "-",
                    {"log": said, "kept": kept, "flows": flows, "lost": lost},
                )
            )
    return rows


SCENARIOS: dict[str, Callable[[Faults], list[Row]]] = {
    "loss": loss,
    "relay-kill": relay_kill,
    "client-kill": client_kill,
    "roam": roam,
    "nat": nat,
    "pmtu": mtu_black_hole,
    "state": state,
}


# --- output -------------------------------------------------------------------------------


def cells(rows: list[Row]) -> list[list[str]]:
    return [[r.scenario, r.done, r.held, r.figure] for r in rows]


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
    report.add_output_args(p)
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.rounds < 1 or args.size_mb < 1:
        p.error("--rounds and --size-mb must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    refused = report.preflight("faults.py", PREFIX)
    if refused is not None:
        return refused
    with report.workdir(args, "gtun-faults-") as workdir:
        f = Faults(args, workdir)
        rows = report.each(
            args.scenarios,
            lambda key: f"{key} ...",
            lambda key: SCENARIOS[key](f),
            lambda key, error: [Row(key, "-", f"FAILED: {error}", "-")],
        )
    if rows is None:
        return 130
    report.emit(HEADERS, cells(rows), rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
