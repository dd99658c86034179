#!/usr/bin/env python3
"""How long a relay takes to build `wg show`'s answer for many peers, and how long the
event loop waits at most meanwhile (app/uapi.py builds it STATUS_CHUNK peers between
yields, as `gtun status`).

    python3 bench/uapi_bench.py [--peers 10000] [--trials 5]

A relay core with `--peers` client peers, each with an endpoint, a handshake and
counters, frozen out of the collector's sight as the daemon freezes what start-up built;
a task that notes the time between its turns runs beside the answer.  A
script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import secrets
import statistics
import sys
from ipaddress import IPv4Network
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gtun.app import uapi  # noqa: E402
from gtun.app.keys import public_key  # noqa: E402
from gtun.core.relay import PeerSpec, Relay, RelaySettings  # noqa: E402


def relay_with(peers: int) -> Relay:
    network = IPv4Network("10.64.0.0/16")
    relay = Relay(
        secrets.token_bytes(32),
        RelaySettings(network=network, relay_address=network.network_address + 1, mtu=1420),
        wall_offset=1_700_000_000.0,
    )
    relay.set_peers(
        [
            PeerSpec(f"p{i}", public_key(secrets.token_bytes(32)), network.network_address + 2 + i)
            for i in range(peers)
        ]
    )
    for i, peer in enumerate(relay.wg.peers.values()):
        peer.endpoint = (f"198.18.{i // 250}.{i % 250 + 1}", 40000 + i % 20000)
        peer.last_handshake = 100.0 + i
        peer.rx_bytes, peer.tx_bytes = 1_000_000 + i, 2_000_000 + i
    return relay


async def one(relay: Relay) -> tuple[float, float, int]:
    """(seconds for the answer, the longest wait of the loop, bytes)."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = perf_counter()
    body = await uapi.relay_answer(relay, secrets.token_bytes(32), 9621)
    took = perf_counter() - started
    done = True
    await task
    return took, max(gaps), sum(len(part) for part in body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    relay = relay_with(args.peers)
    gc.freeze()  # as the daemon after start-up: a collection does not walk the peers
    results = [asyncio.run(one(relay)) for _ in range(args.trials)]
    took = statistics.median(r[0] for r in results)
    stall = statistics.median(r[1] for r in results)
    worst = max(r[1] for r in results)
    size = results[0][2]
    print(f"peers {args.peers}, chunk {uapi.STATUS_CHUNK}, answer {size / 1e6:.1f} MB")
    print(f"answer built in {took * 1000:.1f} ms (median of {args.trials})")
    print(
        f"longest wait of the event loop {stall * 1000:.2f} ms (median of the trials' "
        f"longest; the worst {worst * 1000:.2f} ms, other processes included)"
    )


if __name__ == "__main__":
    main()
