"""`gtun demo`: a relay, a LAN host behind it and two clients, in namespaces on this
machine, with real gtun processes; shows ping and transfers across the tunnel, prints
what it measured, removes everything, and exits 0 only if traffic flowed."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from gtun.errors import ConfigError, RuntimeFailure
from gtun.lab.net import LAN_NET, GtunNet
from gtun.lab.netns import Lab

TRANSFER_BYTES = 16 * 1024 * 1024


def say(text: str) -> None:
    print(text, flush=True)


def run_demo(keep_logs: Path | None = None) -> int:
    if os.geteuid() != 0:
        raise ConfigError("gtun demo must run as root (it creates network namespaces)")
    for tool in ("ip", "ping", "ss"):
        if shutil.which(tool) is None:
            raise ConfigError(f"gtun demo needs `{tool}`; install iproute2 and iputils-ping")
    if not os.path.exists("/dev/net/tun"):
        raise ConfigError("/dev/net/tun is missing: load the tun module (modprobe tun)")
    failures = 0
    workdir = Path(tempfile.mkdtemp(prefix="gtun-demo-"))
    try:
        with Lab(f"gtdemo{secrets.token_hex(2)}") as lab:
            say("Building the lab: namespaces relay, lan (192.168.77.10), c1, c2 ...")
            net = GtunNet(lab, workdir)
            net.start_relay()
            say(f"  relay up: 10.66.0.1/24 on gtun0, UDP+TCP port 9621, LAN {LAN_NET}.0/24, NAT on")
            transports = {"c1": "udp", "c2": "tcp"}  # one of each
            for c in net.clients:
                net.start_client(c, transports.get(c.name, "udp"))
            for c in net.clients:
                address = net.wait_configured(c)
                how = transports.get(c.name, "udp").upper()
                say(f"  {c.name} joined over {how}: the relay pushed {address}/24 and its routes")
            c1, c2 = net.clients
            checks = [
                ("c1 -> c2 (client to client)", c1.ns, c2.extra["address"]),
                ("c2 -> c1", c2.ns, c1.extra["address"]),
                ("c1 -> relay 10.66.0.1", c1.ns, "10.66.0.1"),
                (f"c1 -> LAN host {LAN_NET}.10 (NAT)", c1.ns, f"{LAN_NET}.10"),
            ]
            say("\nPing across the tunnel:")
            for label, ns, address in checks:
                try:
                    rtt = net.ping(ns, address, count=5)
                    say(f"  OK       {label:38} avg rtt {rtt:.2f} ms")
                except RuntimeError:
                    failures += 1
                    say(f"  FAILED   {label:38} no reply")
            say(f"\nTransfer of {TRANSFER_BYTES // (1024 * 1024)} MiB (SHA-256 checked):")
            assert net.lan is not None
            for label, src, dst, address in (
                ("c1 -> c2", c1.ns, c2.ns, c2.extra["address"]),
                ("c2 -> LAN host", c2.ns, net.lan, f"{LAN_NET}.10"),
            ):
                try:
                    sent, received, seconds = net.transfer(src, dst, address, TRANSFER_BYTES)
                except (RuntimeError, OSError) as exc:
                    failures += 1
                    say(f"  FAILED   {label:20} {exc}")
                    continue
                if sent and sent == received:
                    rate = TRANSFER_BYTES * 8 / seconds / 1e6
                    say(f"  OK       {label:20} {rate:8.1f} Mbit/s  sha256 {sent[:16]}...")
                else:
                    failures += 1
                    say(f"  FAILED   {label:20} checksum mismatch ({sent[:12]} vs {received[:12]})")
            say("\ngtun status on the relay:")
            status = net.relay.ns.run(
                [sys.executable, "-m", "gtun", "status", "-s", str(net.relay.socket)],
                check=False,
            )
            say("\n".join("  " + line for line in status.stdout.splitlines()))
            for c in (*net.clients, net.relay):
                net.stop(c)
            if keep_logs is not None:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for log in workdir.glob("*.log"):
                    shutil.copy(log, keep_logs / log.name)
            if failures:
                say("\nRelay log (tail):\n" + net.log_tail(net.relay))
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise RuntimeFailure(f"demo failed: {exc}") from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say("\nRemoved every namespace and process the demo made.")
    if failures:
        say(f"{failures} check(s) failed.")
        return 1
    say("All traffic flowed.")
    return 0
