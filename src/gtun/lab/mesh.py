"""Several relays of one network sharing a PostgreSQL store, each in a namespace, with
gtun clients that can reach every relay (so that they can fail over), running real
`gtun` processes.  Used by the multi-relay tests and the benchmark.

    underlay: a router namespace "wan" (forwarding on, inside it only) with a veth to
              each relay (10.<u>.<i>.0/24, relay i at .2) and to each client
              (10.<u>.<100+j>.0/24, client j at .2): every node reaches every other.
    overlay:  one network (and optionally network6) on every relay's TUN; the leases are
              the store's, so unique across relays; optionally a LAN behind one relay,
              NATed there, pushed to every relay's clients through the mesh.

Every address lives inside the lab's namespaces.  The store's PostgreSQL listens on a
Unix socket in the host's file system, which the namespaces share.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from pathlib import Path

from gtun.app.keys import generate_private_key
from gtun.app.relays import load_relays, relays_file
from gtun.lab.net import LAN_NET, PORT, GtunNet, Node, write_key
from gtun.lab.netns import Lab


class MeshNet(GtunNet):
    """`relays` relays named r1.. sharing `dsn`; `clients` maps each client's name to its
    home relay's (the one its configuration names).  `peers`: the clients every relay's
    [[peers]] lists (None: all of them; one left out joins only once added to the store,
    e.g. by `gtun peer add`).  `lan_at`: the relay with a LAN host behind it
    (192.168.77.0/24 in namespace "lan", NAT on at that relay)."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        dsn: str,
        *,
        relays: int = 3,
        clients: dict[str, str] | None = None,
        peers: Collection[str] | None = None,
        underlay: int = 243,
        network: str = "10.66.0.0/24",
        network6: str | None = None,
        lan_at: str | None = None,
        debug: bool = True,
    ) -> None:
        self.lab = lab
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dsn = dsn
        self.network = network
        self.network6 = network6
        self.debug = debug
        self.metrics = False
        self.lan = None
        self.wan = lab.add_ns("wan")
        self.wan.sysctl("net.ipv4.ip_forward", 1)
        self.relays: list[Node] = []
        for i in range(1, relays + 1):
            ns = lab.add_ns(f"r{i}")
            lab.veth(
                self.wan, f"wr{i}", f"10.{underlay}.{i}.1/24", ns, "up0", f"10.{underlay}.{i}.2/24"
            )
            ns.add_route("default", f"10.{underlay}.{i}.1")
            self.relays.append(
                Node(
                    ns,
                    f"r{i}",
                    generate_private_key(),
                    self.dir / f"r{i}.toml",
                    self.dir / f"r{i}.sock",
                    self.dir / f"r{i}.log",
                    underlay=f"10.{underlay}.{i}.2",
                )
            )
        self.relay = self.relays[0]
        by_name = {r.name: r for r in self.relays}
        if lan_at is not None:
            self.lan = lab.add_ns("lan")
            lab.veth(
                by_name[lan_at].ns, "rlan", f"{LAN_NET}.1/24", self.lan, "lan0", f"{LAN_NET}.10/24"
            )
        self.home: dict[str, Node] = {}
        self.clients: list[Node] = []
        for j, (name, home) in enumerate((clients or {"c1": "r1", "c2": "r2"}).items(), 1):
            ns = lab.add_ns(name)
            lab.veth(
                self.wan,
                f"wc{j}",
                f"10.{underlay}.{100 + j}.1/24",
                ns,
                "up0",
                f"10.{underlay}.{100 + j}.2/24",
            )
            ns.add_route("default", f"10.{underlay}.{100 + j}.1")
            node = Node(
                ns,
                name,
                generate_private_key(),
                self.dir / f"{name}.toml",
                self.dir / f"{name}.sock",
                self.dir / f"{name}.log",
                underlay=by_name[home].underlay,  # what it dials, as GtunNet's clients
            )
            node.extra["own"] = f"10.{underlay}.{100 + j}.2"
            self.clients.append(node)
            self.home[name] = by_name[home]
        self._write_mesh_configs(lan_at, peers)

    def _write_mesh_configs(self, lan_at: str | None, listed: Collection[str] | None) -> None:
        peers = "".join(
            f'\n[[peers]]\nname = "{c.name}"\npublic_key = "{c.public}"\n'
            for c in self.clients
            if listed is None or c.name in listed
        )
        for r in self.relays:
            write_key(self.dir / f"{r.name}.key", r.key)
            lan = r.name == lan_at
            r.config.write_text(
                "[server]\n"
                f'store = "{self.dsn}"\n'
                f'listen = "0.0.0.0:{PORT}"\n'
                f'endpoint = "{r.underlay}:{PORT}"\n'
                f'private_key_file = "{r.name}.key"\n'
                f'network = "{self.network}"\n'
                + (f'network6 = "{self.network6}"\n' if self.network6 else "")
                + 'device = "gtun0"\n'
                + (f'routes = ["{LAN_NET}.0/24"]\nnat = true\n' if lan else "nat = false\n")
                + f'state_dir = "{self.dir / ("state-" + r.name)}"\n'
                f'control_socket = "{r.socket}"\n' + peers
            )
        for c in self.clients:
            self.write_client_config(c, self.home[c.name])

    def write_client_config(self, c: Node, relay: Node) -> None:
        """`c`'s configuration naming `relay` (its endpoint and key)."""
        write_key(self.dir / f"{c.name}.key", c.key)
        c.config.write_text(
            "[client]\n"
            + (f'transport = "{c.extra["transport"]}"\n' if "transport" in c.extra else "")
            + f'server = "{relay.underlay}:{PORT}"\n'
            f'server_public_key = "{relay.public}"\n'
            f'private_key_file = "{c.name}.key"\n'
            'device = "gtun0"\n'
            f'control_socket = "{c.socket}"\n'
            f'state_dir = "{self.dir / c.name}"\n'
        )

    def relay_named(self, name: str) -> Node:
        return next(r for r in self.relays if r.name == name)

    def start_relays(self, timeout: float = 20.0) -> None:
        """Start every relay and wait until each has every other as its mesh."""
        for r in self.relays:
            self._gtun(r, "server")
        for r in self.relays:
            others = sorted(o.name for o in self.relays if o is not r)
            self.wait_status(
                r,
                lambda s, o=others: sorted(m["name"] for m in s.get("mesh", [])) == o,
                timeout,
                f"{r.name}'s mesh",
            )

    def wait_presence(
        self,
        client: Node,
        relay: Node,
        timeout: float = 15.0,
        among: Sequence[Node] | None = None,
    ) -> None:
        """Wait until every relay (of `among`: default all) but `relay` sees `client`'s
        session at `relay`, and `relay` holds it itself."""
        for r in self.relays if among is None else among:
            want = None if r is relay else relay.name
            self.wait_status(
                r,
                lambda s, n=client.name, w=want: any(
                    p["name"] == n and p.get("relay") == w and (w or p.get("last_handshake"))
                    for p in s["peers"]
                ),
                timeout,
                f"{r.name} to see {client.name} at {relay.name}",
            )

    def wait_learnt(self, client: Node, timeout: float = 15.0) -> None:
        """Wait until `client` keeps every other relay than its home one in its state
        directory (app/relays.py): pushed by its relay, so that it can fail over."""
        want = {r.name for r in self.relays if r is not self.home[client.name]}
        path = relays_file(self.dir / client.name, client.config)
        deadline = time.monotonic() + timeout
        while {r.name for r in load_relays(path)} != want:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout:g}s waiting for {client.name} to keep "
                    f"relays {', '.join(sorted(want))}:\n{self.log_tail(client)}"
                )
            time.sleep(0.2)

    def stop_all(self) -> None:
        for node in (*self.clients, *self.relays):
            self.stop(node)

    def logs(self) -> str:
        return "\n".join(
            f"--- {n.name}\n{self.log_tail(n, 40)}" for n in (*self.relays, *self.clients)
        )
