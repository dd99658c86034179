#!/usr/bin/env python3
"""Many real WireGuard peers in one process, for bench/scale.py: each a sans-IO gtun
client core (gtun.core.client.ClientCore: handshake, configuration request, PING every
`--ping` seconds) on its own UDP socket, all driven by one epoll loop.

    python3 bench/scale_peers.py KEYS_FILE FIRST COUNT RELAY_PUBLIC_KEY HOST:PORT
            [--sources A.B.C.D+COUNT] [--window 256] [--ping 10]

KEYS_FILE holds one base64 private key a line; this process plays lines FIRST to
FIRST+COUNT-1.  The sockets are bound to the COUNT addresses from A.B.C.D on, in turn (the
relay limits handshakes per source address, as WireGuard does, and 10,000 peers do not
come from one address).  At most `--window` handshakes are under way at once.  A peer
that gets a cookie reply (the relay is under load) initiates again at once with the
cookie, instead of after WireGuard's 5 s retry timer, so that the figure is the relay's
rate, not the timer's.

On standard output, one JSON line a second: {"t": seconds since start, "configured":
n, "cpu": this process's CPU seconds}; the line with "all": true when every peer is
configured.  Runs until standard input closes or SIGTERM.  Uses one file descriptor per
peer (RLIMIT_NOFILE is raised to its hard limit).
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun.app.keys import decode_key  # noqa: E402
from gtun.core.client import ClientCore, ConfigReceived  # noqa: E402

COOKIE_REPLY = 3  # WireGuard message type (whitepaper 5.4.7)


def main() -> int:
    args = sys.argv[1:]
    opts = {"--sources": "", "--window": "256", "--ping": "10"}
    positional = []
    while args:
        a = args.pop(0)
        if a in opts:
            opts[a] = args.pop(0)
        else:
            positional.append(a)
    keys_file, first, count, relay_key, relay = positional
    host, port = relay.rsplit(":", 1)
    endpoint = (host, int(port))
    lines = Path(keys_file).read_text().split()[int(first) : int(first) + int(count)]
    sources = ["0.0.0.0"]
    if opts["--sources"]:
        base, many = opts["--sources"].split("+")
        sources = [str(ipaddress.IPv4Address(base) + k) for k in range(int(many))]
    window = int(opts["--window"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if len(lines) + 16 > hard:
        print(f"scale_peers: {len(lines)} peers need more than {hard} descriptors", file=sys.stderr)
        return 2
    server = decode_key(relay_key)
    sel = selectors.DefaultSelector()
    cores: list[ClientCore] = []
    socks: list[socket.socket] = []
    for i, text in enumerate(lines):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((sources[i % len(sources)], 0))
        s.connect(endpoint)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, i)
        cores.append(
            ClientCore(decode_key(text), server, endpoint, ping_interval=float(opts["--ping"]))
        )
    start = time.monotonic()
    deadline: list[float | None] = [None] * len(cores)
    timers: list[tuple[float, int]] = []
    configured = [False] * len(cores)
    n_configured = 0
    done_at: float | None = None  # when the last peer was configured
    waiting = list(range(len(cores) - 1, -1, -1))  # not yet started, as a stack
    in_flight = 0
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sel.register(sys.stdin, selectors.EVENT_READ, -1)

    def after(i: int, now: float) -> None:
        nonlocal n_configured, in_flight, done_at
        core = cores[i]
        while (event := core.next_event()) is not None:
            if isinstance(event, ConfigReceived) and not configured[i]:
                configured[i] = True
                n_configured += 1
                in_flight -= 1
                if n_configured == len(cores):
                    done_at = now - start
        s = socks[i]
        for data, _ in core.datagrams_to_send():
            try:
                s.send(data)
            except OSError:
                pass  # a full buffer is loss; WireGuard's timers cover it
        t = core.get_timer()
        if t is not None and t != deadline[i]:
            deadline[i] = t
            heapq.heappush(timers, (t, i))

    last_report = 0.0
    while not stop:
        now = time.monotonic()
        while waiting and in_flight < window:
            i = waiting.pop()
            in_flight += 1
            cores[i].start(now)
            after(i, now)
        timeout = 1.0
        if timers:
            timeout = max(0.0, min(timeout, timers[0][0] - now))
        for key, _ in sel.select(timeout):
            i = key.data
            if i == -1:
                if not os.read(sys.stdin.fileno(), 4096):
                    stop = True
                continue
            s = socks[i]
            core = cores[i]
            now = time.monotonic()
            for _ in range(16):
                try:
                    data = s.recv(2048)
                except OSError:
                    break
                core.receive_datagram(data, endpoint, now)
                if data[:1] == bytes([COOKIE_REPLY]) and not configured[i]:
                    core.new_path(endpoint, now)
            after(i, now)
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            t, i = heapq.heappop(timers)
            if deadline[i] != t:
                continue  # re-armed since
            deadline[i] = None
            cores[i].handle_timer(now)
            after(i, now)
        if now - last_report >= 1.0:
            last_report = now
            cpu = time.process_time()
            line: dict[str, object] = {
                "t": round(now - start, 3),
                "configured": n_configured,
                "cpu": cpu,
            }
            if done_at is not None:
                line["all"] = True
                line["done_at"] = round(done_at, 3)
            print(json.dumps(line), flush=True)
    for s in socks:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
