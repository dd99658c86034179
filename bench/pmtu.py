#!/usr/bin/env python3
"""An MTU black hole healed by gtun's client, measured in network namespaces.

Run as root:

    python3 bench/pmtu.py [--runs 3] [--limit 1400] [--raise-interval 2] [--workdir DIR]

One lab (namespaces "gtmb...", underlay 10.233.<i>.0/24 inside them; nothing in the
root namespace changes): a relay and one client (offload off, so that the rule sees
each datagram rather than a GSO aggregate).  Each run, while the client pings the
relay's tunnel address with 1400-byte packets every 0.2 s (traffic the client notices),
an nftables rule in the relay's namespace starts dropping tunnel datagrams over
`--limit` bytes with no ICMP; the script measures the time until the client's device
MTU is lowered and until a 1400-byte ping gets through again, then removes the rule and
measures the time until the MTU is back at the relay's 1420.

This is a script that prints figures, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gtun.lab.net import PORT, GtunNet  # noqa: E402
from gtun.lab.netns import Lab, Namespace  # noqa: E402

TABLE = "gtmbblack"
LIMIT = 1400  # the largest underlay datagram the black hole lets through
POLL = 0.05


def device_mtu(ns: Namespace) -> int:
    return int(json.loads(ns.run(["ip", "-j", "link", "show", "gtun0"]).stdout)[0]["mtu"])


def big_ping(ns: Namespace) -> bool:
    out = ns.run(
        ["ping", "-n", "-c", "1", "-W", "1", "-s", str(1400 - 28), "10.66.0.1"],
        check=False,
        timeout=5,
    )
    return out.returncode == 0


def until(cond: object, timeout: float) -> float | None:
    """Seconds until `cond()` is true, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(POLL)
    return None


@dataclass
class Run:
    """One black hole: seconds until the MTU was lowered, until a 1400-byte ping passed
    (from the black hole's start), until the MTU was raised after its end; the MTU found."""

    lowered: float | None
    through: float | None
    raised: float | None
    found: int


def measure(
    workdir: Path,
    *,
    runs: int = 3,
    limit: int = LIMIT,
    raise_interval: int = 2,
    prefix: str | None = None,
    underlay: int = 233,
) -> list[Run]:
    """The measurement, in its own lab (namespaces `prefix`..., default "gtmb<hex>")."""
    done: list[Run] = []
    with Lab(prefix or f"gtmb{secrets.token_hex(2)}") as lab:
        net = GtunNet(lab, workdir, clients=1, underlay=underlay, lan=False)
        c1 = net.clients[0]
        text = c1.config.read_text().replace(
            "[client]\n",
            f"[client]\noffload = false\npmtu_raise_interval = {raise_interval}\n",
        )
        c1.config.write_text(text)
        net.start_all()
        net.wait_configured(c1)
        traffic = c1.ns.spawn(
            ["ping", "-n", "-q", "-i", "0.2", "-s", str(1400 - 28), "10.66.0.1"],
            log_path=workdir / "traffic.log",
        )
        try:
            for _ in range(runs):
                until(lambda: device_mtu(c1.ns) == 1420, 30)
                net.relay.ns.run(
                    ["nft", "-f", "-"],
                    input=f"table inet {TABLE} {{\n chain input {{\n"
                    "  type filter hook input priority 0;\n"
                    f"  udp dport {PORT} ip length > {limit} drop\n }}\n}}\n",
                )
                lowered = until(lambda: device_mtu(c1.ns) < 1420, 60)
                passes = until(lambda: big_ping(c1.ns), 60)
                found = device_mtu(c1.ns)
                net.relay.ns.run(["nft", "delete", "table", "inet", TABLE], check=False)
                raised = until(lambda: device_mtu(c1.ns) == 1420, 120)
                through = None if passes is None or lowered is None else lowered + passes
                done.append(Run(lowered, through, raised, found))
                print(
                    f"run: lowered to {found} after {lowered} s; large ping through after "
                    f"{through} s; raised after {raised} s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            traffic.kill()
            traffic.wait(5)
            net.relay.ns.run(["nft", "delete", "table", "inet", TABLE], check=False)
    return done


def fmt(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    return f"{statistics.median(got):.1f} s (min {min(got):.1f}, max {max(got):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=LIMIT, help="largest datagram that passes")
    ap.add_argument("--raise-interval", type=int, default=2, help="pmtu_raise_interval")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gtun-pmtu-"))
    rows = measure(workdir, runs=args.runs, limit=args.limit, raise_interval=args.raise_interval)
    print(
        f"\nblack hole at {args.limit} bytes, {len(rows)} runs, "
        f"raise interval {args.raise_interval} s"
    )
    print(f"| MTU found | {', '.join(str(r.found) for r in rows)} |")
    print(f"| lowered after | {fmt([r.lowered for r in rows])} |")
    print(f"| 1400-byte ping through after | {fmt([r.through for r in rows])} |")
    print(f"| raised after the rule's removal | {fmt([r.raised for r in rows])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
