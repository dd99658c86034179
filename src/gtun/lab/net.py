"""A gtun network in namespaces: a relay with a LAN host behind it and gtun clients,
each in its own namespace, running real `gtun` processes.  Used by `gtun demo`, the
tests and the benchmark; what only the tests need is in tests/labkit.py.

    underlay: client i  <-- veth 10.<u>.<i>.0/24 -->  relay  <-- veth 192.168.77.0/24 --> lan
    overlay:  10.66.0.0/24 on the relay's TUN; the LAN is pushed as a route, NAT on.

Every address lives inside the lab's namespaces.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtun.app.control import query
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.errors import GtunError
from gtun.lab.netns import Lab, Namespace

PORT = 9621
GTUN = (sys.executable, "-m", "gtun")  # the command, run from this checkout
METRICS_PORT = 9622  # the relay's metrics_listen (127.0.0.1) when GtunNet(metrics=True)
CLIENT_METRICS_PORT = 9623  # each client's, on its own namespace's loopback
LAN_NET = "192.168.77"
TRANSFER = str(Path(__file__).with_name("transfer.py"))  # the program at both ends of transfer()
GARBAGE = str(Path(__file__).with_name("garbage.py"))  # a UDP garbage sender


@dataclass
class Node:
    ns: Namespace
    name: str
    key: bytes
    config: Path
    socket: Path
    log: Path
    underlay: str = ""
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def public(self) -> str:
        return encode_key(public_key(self.key))


def write_key(path: Path, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(encode_key(key) + "\n")


class GtunNet:
    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        *,
        clients: int = 2,
        underlay: int = 250,
        network: str = "10.66.0.0/24",
        lan: bool = True,
        nat: bool = True,
        extra_peers: str = "",
        debug: bool = False,
        metrics: bool = False,
        mode: str | None = None,
        network6: str | None = None,
        devices: Mapping[str, str] | None = None,
        workers: int | None = 1,
    ) -> None:
        """`workers`: the relay's `workers` key (None: left out, one per core).
        `devices`: the device name of a node by its name ("relay", "c1", ...);
        "gtun0" for any not named (each node has its own namespace, but a device's `wg`
        socket, /var/run/wireguard/DEVICE.sock, is shared by all of them)."""
        self.lab = lab
        self.devices = dict(devices or {})
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network = network
        self.network6 = network6  # the relay's "network6" (IPv6 inside the tunnel), if set
        self.debug = debug
        self.metrics = metrics
        self.workers = workers
        r = lab.add_ns("relay")
        self.relay = Node(
            r,
            "relay",
            generate_private_key(),
            self.dir / "server.toml",
            self.dir / "server.sock",
            self.dir / "server.log",
        )
        self.lan: Namespace | None = None
        if lan:
            self.lan = lab.add_ns("lan")
            lab.veth(r, "rlan", f"{LAN_NET}.1/24", self.lan, "lan0", f"{LAN_NET}.10/24")
            # No route back to the virtual network: replies reach clients only through NAT.
        self.clients: list[Node] = []
        for i in range(1, clients + 1):
            ns = lab.add_ns(f"c{i}")
            lab.veth(r, f"rc{i}", f"10.{underlay}.{i}.1/24", ns, "up0", f"10.{underlay}.{i}.2/24")
            node = Node(
                ns,
                f"c{i}",
                generate_private_key(),
                self.dir / f"c{i}.toml",
                self.dir / f"c{i}.sock",
                self.dir / f"c{i}.log",
                underlay=f"10.{underlay}.{i}.1",
            )
            self.clients.append(node)
        self._write_configs(nat=nat, lan=lan, extra_peers=extra_peers)
        if mode is not None:  # the relay's "mode" key ("tun" or "tap")
            text = self.relay.config.read_text()
            self.relay.config.write_text(
                text.replace("[server]\n", f'[server]\nmode = "{mode}"\n', 1)
            )

    def device(self, node: Node) -> str:
        """The name of `node`'s device."""
        return self.devices.get(node.name, "gtun0")

    def _write_configs(self, *, nat: bool, lan: bool, extra_peers: str) -> None:
        r = self.relay
        write_key(self.dir / "server.key", r.key)
        routes = f'["{LAN_NET}.0/24"]' if lan else "[]"
        peers = "".join(
            f'\n[[peers]]\nname = "{c.name}"\npublic_key = "{c.public}"\n' for c in self.clients
        )
        r.config.write_text(
            "[server]\n"
            f'listen = "0.0.0.0:{PORT}"\n'
            'private_key_file = "server.key"\n'
            f'network = "{self.network}"\n'
            + (f'network6 = "{self.network6}"\n' if self.network6 else "")
            + f'device = "{self.device(r)}"\n'
            + (f"workers = {self.workers}\n" if self.workers is not None else "")
            + f"routes = {routes}\n"
            f"nat = {'true' if nat else 'false'}\n"
            f'state_dir = "{self.dir / "state"}"\n'
            f'control_socket = "{r.socket}"\n'
            + (f'metrics_listen = "127.0.0.1:{METRICS_PORT}"\n' if self.metrics else "")
            + peers
            + extra_peers
        )
        for c in self.clients:
            write_key(self.dir / f"{c.name}.key", c.key)
            c.config.write_text(
                "[client]\n"
                f'server = "{c.underlay}:{PORT}"\n'
                f'server_public_key = "{r.public}"\n'
                f'private_key_file = "{c.name}.key"\n'
                f'device = "{self.device(c)}"\n'
                f'control_socket = "{c.socket}"\n'
                f'state_dir = "{self.dir / c.name}"\n'
                + (f'metrics_listen = "127.0.0.1:{CLIENT_METRICS_PORT}"\n' if self.metrics else "")
            )

    # --- processes ---------------------------------------------------------------------

    def _gtun(self, node: Node, role: str, wrap: Sequence[str] = ()) -> None:
        cmd = [*wrap, *GTUN]
        if self.debug:
            cmd.append("--debug")
        cmd += [role, "-c", str(node.config)]
        node.proc = node.ns.spawn(cmd, log_path=node.log)

    def start_relay(self, timeout: float = 10.0, wrap: Sequence[str] = ()) -> None:
        """Start the relay (the command after the prefix `wrap`, which must exec it:
        lab/statedir.py's) and wait until it answers on its control socket."""
        self._gtun(self.relay, "server", wrap)
        self.wait_status(self.relay, lambda s: True, timeout, "relay to start")

    def start_all(self, clients: list[Node] | None = None, timeout: float = 20.0) -> None:
        """Start the relay, then `clients` (default: all), and wait until each client is
        configured."""
        clients = self.clients if clients is None else clients
        self.start_relay()
        for c in clients:
            self.start_client(c)
        for c in clients:
            self.wait_configured(c, timeout=timeout)

    def start_client(self, node: Node, transport: str | None = None) -> None:
        """Start `node`'s client; `transport` ("udp", "tcp", "auto") is written into its
        config first (None: leave the config as it is, UDP unless set before)."""
        if transport is not None:
            self.set_transport(node, transport)
        self._gtun(node, "client")

    def set_transport(self, node: Node, transport: str) -> None:
        lines = [
            line
            for line in node.config.read_text().splitlines()
            if not line.startswith("transport =")
        ]
        at = lines.index("[client]") + 1
        lines.insert(at, f'transport = "{transport}"')
        node.config.write_text("\n".join(lines) + "\n")
        node.extra["transport"] = transport

    def stop(self, node: Node, timeout: float = 10.0) -> int | None:
        proc = node.proc
        if proc is None:
            return None
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return None
        finally:
            node.proc = None

    def status(self, node: Node) -> dict[str, Any] | None:
        try:
            return query(node.socket, {"command": "status"}, timeout=2.0)
        except GtunError:
            return None

    def wait_status(self, node: Node, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.name} exited ({node.proc.returncode}) waiting for {what}:\n"
                    + self.log_tail(node)
                )
            st = self.status(node)
            if st is not None and cond(st):
                return st
            time.sleep(0.2)
        raise TimeoutError(
            f"timed out after {timeout:g}s waiting for {what}:\n{self.log_tail(node)}"
        )

    def wait_configured(self, node: Node, timeout: float = 20.0) -> str:
        st = self.wait_status(
            node, lambda s: s.get("address") is not None, timeout, f"{node.name} configured"
        )
        address = str(st["address"]).split("/")[0]
        node.extra["address"] = address
        if st.get("address6"):
            node.extra["address6"] = str(st["address6"]).split("/")[0]
        return address

    def log_tail(self, node: Node, lines: int = 30) -> str:
        try:
            text = node.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- traffic ------------------------------------------------------------------------

    def ping(self, ns: Namespace, address: str, count: int = 3, timeout: float = 30) -> float:
        """Average RTT in ms; raises RuntimeError when no reply came."""
        out = ns.run(
            ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", address],
            check=False,
            timeout=timeout,
        )
        for line in out.stdout.splitlines():
            if "min/avg/max" in line:
                return float(line.split("=")[1].split("/")[1])
        raise RuntimeError(f"ping {address} from {ns.name} failed:\n{out.stdout}{out.stderr}")

    def transfer(
        self,
        src: Namespace,
        dst: Namespace,
        address: str,
        size: int,
        port: int = 5201,
        timeout: float = 120,
    ) -> tuple[str, str, float]:
        """Send `size` random bytes over TCP to `address` (IPv4 or IPv6) within `timeout`
        seconds; (sent sha256, received sha256, seconds)."""
        bind = "::" if ":" in address else "0.0.0.0"
        wait = str(max(60.0, timeout / 2))  # what one socket call may wait, at each end
        receiver = dst.spawn(
            [sys.executable, TRANSFER, "receive", str(port), bind, wait],
            log_path=self.dir / "receiver.out",
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ss = dst.run(["ss", "-ltn", f"sport = :{port}"], check=False).stdout
                if f":{port}" in ss:
                    break
                time.sleep(0.1)
            started = time.monotonic()
            sent = src.run(
                [sys.executable, TRANSFER, "send", address, str(port), str(size), wait],
                timeout=timeout,
            ).stdout.strip()
            receiver.wait(float(wait))
            elapsed = time.monotonic() - started
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait(5)
        got = (self.dir / "receiver.out").read_text().strip().splitlines()
        received = got[-1] if got else ""
        return sent, received, elapsed
