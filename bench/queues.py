"""Where a ping waits under load, client to client: one iperf3 stream from client c1 to
client c2 through the relay, pings from c1 to c2 every 0.2 s alongside, and meanwhile,
every few milliseconds, the UDP socket queues of the three gtun processes (the receive
and send queue of /proc/PID/net/udp, which counts the kernel's truesize of what waits,
not payload) and, at the end, how long each process waited for a CPU per run
(/proc/PID/task/*/schedstat: on a small machine the scheduler can be most of the delay).

    sudo env PYTHONPATH=src python bench/queues.py --seconds 10 [--congestion cubic]

Like bench.py, run it alone (under the shared benchmark lock where several people
measure on one machine): it makes namespaces of its own, prefix "gtq" (--prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

from gtun.lab.net import GtunNet
from gtun.lab.netns import Lab

PREFIX = "gtq"
PING_INTERVAL = 0.2


def udp_queues(pid: int) -> list[tuple[int, int]]:
    """(send queue, receive queue) bytes of each UDP socket in `pid`'s namespace."""
    out = []
    for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
        tx, rx = line.split()[4].split(":")
        out.append((int(tx, 16), int(rx, 16)))
    return out


def schedstat(pid: int) -> tuple[int, int, int]:
    """Nanoseconds run, nanoseconds waited for a CPU, and runs, over `pid`'s threads."""
    run = wait = slices = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            a, b, c = (int(x) for x in f.read().split()[:3])
        run, wait, slices = run + a, wait + b, slices + c
    return run, wait, slices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="iperf3 duration (10)")
    parser.add_argument("--congestion", default="", help="the iperf3 sender's congestion control")
    parser.add_argument("--every", type=float, default=0.005, help="seconds between samples")
    parser.add_argument("--prefix", default=PREFIX, help=f"namespace prefix ({PREFIX})")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Lab(args.prefix) as lab:
        work = Path(tmp)
        net = GtunNet(lab, work, clients=2, underlay=243, network="10.68.0.0/24", lan=False)
        net.start_all()
        c1, c2 = net.clients
        address = c2.extra["address"]
        net.ping(c1.ns, address)
        pids = {n.name: n.proc.pid for n in (c1, net.relay, c2) if n.proc is not None}
        samples: dict[str, list[list[tuple[int, int]]]] = {name: [] for name in pids}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for name, pid in pids.items():
                    samples[name].append(udp_queues(pid))
                time.sleep(args.every)

        server = c2.ns.spawn(["iperf3", "-s", "-1"], log_path=work / "iperf3-s.log")
        time.sleep(0.5)
        before = {name: schedstat(pid) for name, pid in pids.items()}
        sampler = threading.Thread(target=sample)
        sampler.start()
        ping_log = work / "ping.log"
        pinger = c1.ns.spawn(
            ["ping", "-n", "-i", str(PING_INTERVAL), "-w", str(args.seconds), address],
            log_path=ping_log,
        )
        cc = ["-C", args.congestion] if args.congestion else []
        iperf = c1.ns.run(
            ["iperf3", "-c", address, "-t", str(args.seconds), "-J", *cc], timeout=args.seconds + 30
        )
        stop.set()
        sampler.join()
        pinger.wait(args.seconds + 10)
        server.wait(10)
        end = json.loads(iperf.stdout)["end"]
        print(f"iperf3: {end['sum_received']['bits_per_second'] / 1e6:.0f} Mbit/s", end=", ")
        print(f"{end['sum_sent'].get('retransmits')} retransmits")
        rtts = sorted(float(x) for x in re.findall(r"time=([\d.]+)", ping_log.read_text()))
        if rtts:
            p90 = rtts[int(len(rtts) * 0.9)]
            print(f"ping: {len(rtts)}, median {statistics.median(rtts):.2f} ms, p90 {p90:.2f}")
        for name, pid in pids.items():
            run, wait, slices = (a - b for a, b in zip(schedstat(pid), before[name], strict=True))
            print(
                f"{name}: ran {run / 1e9:.2f} s in {slices} runs ({run / max(1, slices) / 1e3:.0f}"
                f" us each), waited for a CPU {wait / max(1, slices) / 1e3:.0f} us per run"
            )
            for i in range(min(len(s) for s in samples[name])):
                tx = [s[i][0] for s in samples[name]]
                rx = [s[i][1] for s in samples[name]]
                print(
                    f"  socket {i}: receive queue mean {statistics.mean(rx) / 1e3:.1f} KB,"
                    f" max {max(rx) / 1e3:.1f}; send queue mean {statistics.mean(tx) / 1e3:.1f}"
                    f" KB, max {max(tx) / 1e3:.1f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
