"""An in-memory relay of several workers (tier 1): N relay cores with one key, gtun
clients at their names, and what the kernel and app/workers.py do between them:

- a client's datagram goes to the worker io/steering.py's program names (run by
  testing/cbpf.py on the datagram's bytes), or, where the program leaves it to the
  kernel's hash, to the worker `placement` names for that client (the hash's stand-in:
  a client keeps its worker while it keeps its address);
- a worker's SessionHeld, InitiationSeen and CapsLearned are told to every other
  worker (`held_by`, `seen_initiation`, `learned_caps`), and what a
  worker hands over (`handoffs()`) is handed to its worker (`handed()`);
- a packet "from the TUN" may be given to any worker, as a queue of a multiqueue device
  would."""

from __future__ import annotations

from typing import Any

from gtun.core.client import ClientCore
from gtun.core.relay import CapsLearned, InitiationSeen, Relay, RelaySettings, SessionHeld
from gtun.io.steering import encode, program
from gtun.testing import cbpf

RELAY = "R"


class WorkersLink:
    def __init__(self, private_key: bytes, settings: RelaySettings, workers: int, now: float):
        self.workers = [
            Relay(private_key, settings, worker=w, workers=workers) for w in range(workers)
        ]
        self.code = encode(program(workers))
        self.now = now
        self.clients: dict[str, ClientCore] = {}
        self.placement: dict[str, int] = {}  # the kernel hash's choice per client
        self.got: dict[str, list[Any]] = {}  # what each client wrote to its device
        self.tun_in: list[list[Any]] = [[] for _ in range(workers)]  # per worker
        self.received: list[int] = [0] * workers  # datagrams each worker got
        self.handed: list[int] = [0] * workers  # items each worker was handed

    def add_client(self, name: str, client: ClientCore, worker: int) -> None:
        self.clients[name] = client
        self.placement[name] = worker
        self.got[name] = []

    def steer(self, name: str, data: bytes) -> int:
        verdict = cbpf.run(self.code, data)
        return verdict if verdict < len(self.workers) else self.placement[name]

    def pump(self) -> None:
        for _ in range(50):
            moved = False
            for name, client in self.clients.items():
                for data, _ in client.datagrams_to_send():
                    moved = True
                    w = self.steer(name, data)
                    self.received[w] += 1
                    self.workers[w].receive_datagram(data, name, self.now)
                while client.next_event() is not None:
                    pass
                self.got[name].extend(client.tun_writes())
            for w, relay in enumerate(self.workers):
                for data, addr in relay.datagrams_to_send():
                    moved = True
                    dest = self.clients.get(addr)
                    if dest is not None:  # else to an address no client has
                        dest.receive_datagram(data, RELAY, self.now)
                for item in relay.handoffs():
                    moved = True
                    to, peer, packet = item
                    self.handed[to] += 1
                    key = None if peer is None else peer.public_key
                    self.workers[to].handed(w, key, [packet], self.now)
                self.tun_in[w].extend(relay.tun_writes())
                while (event := relay.next_event()) is not None:
                    for other in self.workers:
                        if other is relay:
                            continue
                        if isinstance(event, InitiationSeen):
                            other.seen_initiation(event.peer.public_key, event.timestamp)
                        elif isinstance(event, SessionHeld):
                            other.held_by(event.peer.public_key, w, event.since)
                        elif isinstance(event, CapsLearned):
                            other.learned_caps(event.peer.public_key, event.caps)
            if not moved:
                return
        raise AssertionError("link did not settle")
