"""Tier 3: the full-tunnel exit (`default_route = true`) in network namespaces.

    client c1 --underlay 10.235.1.0/24--> relay --198.51.100.0/24--> inet (198.51.100.10)
                                          endpoint 10.235.200.1 (on its lo)

The client's main table holds its link and `default via 10.235.1.1`: the relay's endpoint
is reached by the default route, the very route the full tunnel overrides, so only the
firewall mark on the client's socket keeps it reachable.  Strict rp_filter is on in the
client's namespace (the mark must come back on the relay's answers).  The inet host has
no route back to the underlay: only traffic the relay masquerades gets answers, and a
small TCP server there tells each caller the address it saw.

The client's /etc/resolv.conf is /etc/netns/<ns>/resolv.conf (bind-mounted by `ip netns
exec`), made here and removed at the end; the host's own /etc/resolv.conf is checked to
be untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gtun.lab.net import PORT, GtunNet, Node
from gtun.lab.netns import Lab, Namespace
from labkit import doctor_results, run_python

pytestmark = pytest.mark.netns

UNDERLAY = 235
ENDPOINT = "10.235.200.1"
GATEWAY = "10.235.1.1"
INET = "198.51.100.10"
RELAY_INET = "198.51.100.1"
PUSHED_DNS = "198.51.100.53"
ECHO_PORT = 7070

# Tells every TCP caller the address it came from, one line, and logs it.
_ECHO_PEER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
while True:
    c, peer = s.accept()
    with c:
        c.sendall((peer[0] + "\\n").encode())
    print(peer[0], flush=True)
"""

_ASK_PEER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.settimeout(5); print(s.makefile().readline().strip())
"""


_RESOLV_IS_MOUNT = """
from pathlib import Path
from gtun.system.dns import dns_method, is_mount_point
assert is_mount_point(Path("/etc/resolv.conf")) and dns_method() == "file"
"""


@dataclass
class ExitNet:
    net: GtunNet
    client: Node
    inet: Namespace
    resolv_dir: Path
    original_resolv: str
    host_resolv: bytes | None
    before: dict[str, str]
    state_file: Path


def _host_resolv() -> bytes | None:
    try:
        return Path("/etc/resolv.conf").read_bytes()
    except FileNotFoundError:
        return None


def snapshot(ns: Namespace) -> dict[str, str]:
    """The client namespace's rules, routes in all tables, nftables, the sysctl, and its
    view of /etc/resolv.conf (contents and inode)."""
    out = {}
    for name, cmd in {
        "rules4": ["ip", "-4", "rule"],
        "rules6": ["ip", "-6", "rule"],
        "routes4": ["ip", "-4", "route", "show", "table", "all"],
        "routes6": ["ip", "-6", "route", "show", "table", "all"],
        "nft": ["nft", "list", "ruleset"],
        "src_valid_mark": ["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"],
        "resolv": ["cat", "/etc/resolv.conf"],
        "resolv_inode": ["stat", "-L", "-c", "%i", "/etc/resolv.conf"],
    }.items():
        out[name] = ns.run(cmd).stdout
    return out


# A TUN relay with a UDP client, and a TAP relay (routes via the relay's address) with a
# TCP client (whose connection must carry the mark).
SETUPS = [("tun", "udp"), ("tap", "tcp")]


@pytest.fixture(scope="module", params=SETUPS, ids=["tun-udp", "tap-tcp"])
def exitnet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExitNet]:
    mode, transport = request.param
    host_resolv = _host_resolv()
    with Lab(f"gte{secrets.token_hex(2)}") as lab:
        workdir = tmp_path_factory.mktemp("exit")
        net = GtunNet(lab, workdir, clients=1, underlay=UNDERLAY, lan=False, nat=True, mode=mode)
        relay, client = net.relay, net.clients[0]
        inet = lab.add_ns("inet")
        lab.veth(relay.ns, "rinet", f"{RELAY_INET}/24", inet, "inet0", f"{INET}/24")
        # The relay's endpoint sits on its loopback and it answers from that address.
        relay.ns.run(["ip", "addr", "add", f"{ENDPOINT}/32", "dev", "lo"])
        relay.ns.run(["ip", "route", "replace", "10.235.1.0/24", "dev", "rc1", "src", ENDPOINT])
        client.ns.add_route("default", GATEWAY)
        client.ns.sysctl("net.ipv4.conf.all.rp_filter", 1)

        relay.config.write_text(
            relay.config.read_text().replace("[server]\n", f'[server]\ndns = ["{PUSHED_DNS}"]\n')
        )
        state_dir = workdir / "c1-state"
        text = "".join(
            line
            for line in client.config.read_text().splitlines(keepends=True)
            if not line.startswith("state_dir")
        )
        client.config.write_text(
            text.replace(f"{GATEWAY}:{PORT}", f"{ENDPOINT}:{PORT}")
            + f'default_route = true\nstate_dir = "{state_dir}"\n'
        )
        net.set_transport(client, transport)

        resolv_dir = Path("/etc/netns") / client.ns.name
        original = f"# gtun exit test {client.ns.name}\nnameserver 192.0.2.53\nsearch lab.test\n"
        made_netns_dir = not resolv_dir.parent.exists()
        resolv_dir.mkdir(parents=True)
        try:
            (resolv_dir / "resolv.conf").write_text(original)
            # The client must see that file as /etc/resolv.conf, never the host's.
            seen = client.ns.run(["stat", "-L", "-c", "%i", "/etc/resolv.conf"]).stdout.strip()
            assert seen == str(os.stat(resolv_dir / "resolv.conf").st_ino)
            assert client.ns.run(["cat", "/etc/resolv.conf"]).stdout == original
            # So the client rewrites that file even where resolvconf is installed (whose
            # files are the host's).
            run_python(client.ns, _RESOLV_IS_MOUNT)

            net.start_relay()
            echo = [sys.executable, "-c", _ECHO_PEER, str(ECHO_PORT)]
            inet.spawn(echo, log_path=workdir / "echo")
            yield ExitNet(
                net,
                client,
                inet,
                resolv_dir,
                original,
                host_resolv,
                snapshot(client.ns),
                state_dir / "exit-c1.json",
            )
        finally:
            lab.cleanup()
            shutil.rmtree(resolv_dir, ignore_errors=True)
            if made_netns_dir:
                with contextlib.suppress(OSError):  # not empty: another lab uses it
                    resolv_dir.parent.rmdir()
    assert _host_resolv() == host_resolv, "the host's /etc/resolv.conf changed"


def start_full_tunnel(x: ExitNet) -> dict[str, object]:
    x.net.start_client(x.client)
    return x.net.wait_status(
        x.client, lambda s: bool(s.get("full_tunnel")), 20.0, "the full tunnel to be up"
    )


def ask_peer(x: ExitNet) -> str:
    """The address the inet host sees this client's TCP connection come from."""
    deadline = time.monotonic() + 10
    while True:
        result = x.client.ns.run(
            [sys.executable, "-c", _ASK_PEER, INET, str(ECHO_PORT)], check=False
        )
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert result.returncode == 0, result.stderr + x.net.log_tail(x.client)
    return result.stdout.strip()


def kill(x: ExitNet, sig: signal.Signals) -> int:
    proc = x.client.proc
    assert proc is not None
    proc.send_signal(sig)
    code = proc.wait(15)
    x.client.proc = None
    return code


def assert_restored(x: ExitNet) -> None:
    after = snapshot(x.client.ns)
    for key, value in x.before.items():
        assert after[key] == value, f"{key} not restored:\n{value}--- now\n{after[key]}"
    assert (x.resolv_dir / "resolv.conf").read_text() == x.original_resolv
    assert not x.state_file.exists()
    assert _host_resolv() == x.host_resolv


def test_full_tunnel_exits_through_relay_nat(exitnet: ExitNet) -> None:
    x = exitnet
    ns = x.client.ns
    # Before: no way to the internet host (it has no route back to the underlay).
    assert ns.run(["ping", "-n", "-c", "1", "-W", "1", INET], check=False).returncode != 0
    start_full_tunnel(x)
    try:
        state = json.loads(x.state_file.read_text())
        table, mark = state["table"], state["fwmark"]
        assert f"dev gtun0 table {table}" in ns.run(["ip", "route", "get", INET]).stdout
        # The relay's endpoint: into the tunnel when unmarked, by the underlay when marked.
        assert "dev gtun0" in ns.run(["ip", "route", "get", ENDPOINT]).stdout
        marked = ns.run(["ip", "route", "get", ENDPOINT, "mark", str(mark)]).stdout
        assert f"via {GATEWAY} dev up0" in marked
        rules = ns.run(["ip", "rule"]).stdout
        assert f"not from all fwmark {mark:#x} lookup {table}" in rules
        assert "lookup main suppress_prefixlength 0" in rules
        assert ns.run(["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"]).stdout.strip() == "1"

        # The internet host sees the relay's address: the traffic went through the
        # tunnel and the relay masqueraded it.
        assert ask_peer(x) == RELAY_INET
        x.net.ping(ns, INET)
        # The relay's endpoint stays reachable: the session carries traffic (its tunnel
        # address answers) and the relay sees the client at its underlay address.
        x.net.ping(ns, "10.66.0.1")
        relay_status = x.net.status(x.net.relay)
        assert relay_status is not None
        endpoints = [p["endpoint"] for p in relay_status["peers"]]
        assert any(str(e).startswith("10.235.1.2:") for e in endpoints), endpoints

        # Doctor looks the endpoint up as the client's marked packets are routed: no loop.
        _, checks = doctor_results(ns, x.client.config)
        assert "endpoint" not in checks and checks["relay"]["ok"], checks

        # IPv6 (not pushed by this relay) does not leak: it is unreachable.
        v6 = ns.run(["ip", "-6", "route", "get", "2001:db8::1"], check=False)
        assert v6.returncode != 0 or "unreachable" in v6.stdout, v6.stdout

        # The pushed DNS server, written into the namespace's own resolv.conf.
        seen = ns.run(["cat", "/etc/resolv.conf"]).stdout
        assert f"nameserver {PUSHED_DNS}" in seen and "192.0.2.53" not in seen
        assert (x.resolv_dir / "resolv.conf").read_text() == seen
        assert _host_resolv() == x.host_resolv
    finally:
        x.net.stop(x.client)
    assert_restored(x)


def test_sigterm_restores_rules_routes_and_dns(exitnet: ExitNet) -> None:
    x = exitnet
    start_full_tunnel(x)
    during = snapshot(x.client.ns)
    for key in ("rules4", "rules6", "routes4", "routes6", "resolv"):
        assert during[key] != x.before[key], f"{key} did not change with the full tunnel up"
    assert during["resolv_inode"] == x.before["resolv_inode"]  # rewritten in place
    assert kill(x, signal.SIGTERM) == 0
    assert_restored(x)


def test_next_start_recovers_after_sigkill(exitnet: ExitNet) -> None:
    x = exitnet
    start_full_tunnel(x)
    kill(x, signal.SIGKILL)
    left = snapshot(x.client.ns)
    assert "suppress_prefixlength" in left["rules4"]
    assert PUSHED_DNS in left["resolv"]
    assert x.state_file.exists()

    logged = x.client.log.stat().st_size
    start_full_tunnel(x)
    log = x.client.log.read_bytes()[logged:].decode(errors="replace")
    assert "did not exit cleanly" in log, log
    assert ask_peer(x) == RELAY_INET
    assert kill(x, signal.SIGTERM) == 0
    assert_restored(x)


_FAILING_APPLY = """
import sys
from ipaddress import IPv4Address
from pathlib import Path
from gtun.errors import RuntimeFailure
from gtun.system.fulltunnel import FullTunnel
state, resolv = Path(sys.argv[1]), Path(sys.argv[2])
tunnel = FullTunnel("nosuchdev0", 51820, state, Path("/etc/gtun/c9.toml"), resolv=resolv)
try:
    tunnel.apply([IPv4Address("10.66.0.9")], [IPv4Address("198.51.100.53")], ipv6=False)
except RuntimeFailure as exc:
    print(exc)
print("state file left" if state.exists() else "no state file")
"""


def test_failed_apply_undoes_what_it_did(exitnet: ExitNet, tmp_path: Path) -> None:
    # The sysctl and the nftables table are changed before the routes fail (no such
    # device); all of it must be taken back.
    x = exitnet
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\n")
    out = run_python(x.client.ns, _FAILING_APPLY, str(tmp_path / "exit-c9.json"), str(resolv))
    assert "nosuchdev0: the device does not exist" in out.stdout, out.stdout + out.stderr
    assert "no state file" in out.stdout
    assert resolv.read_text() == "nameserver 192.0.2.1\n"
    assert_restored(x)


NEW_DNS = "198.51.100.54"


def test_relay_config_change_reapplies_the_full_tunnel(exitnet: ExitNet) -> None:
    # The relay comes back with other DNS servers: the client takes its configuration
    # down and up again, and the full tunnel with it (rules, DNS, the state file).
    x = exitnet
    relay = x.net.relay
    original = relay.config.read_text()
    start_full_tunnel(x)
    try:
        x.net.stop(relay)
        relay.config.write_text(original.replace(PUSHED_DNS, NEW_DNS))
        x.net.start_relay()
        x.net.wait_status(
            x.client,
            lambda s: s.get("dns") == [NEW_DNS] and bool(s.get("full_tunnel")),
            45.0,
            "the client to apply the relay's new configuration",
        )
        ns = x.client.ns
        seen = ns.run(["cat", "/etc/resolv.conf"]).stdout
        assert f"nameserver {NEW_DNS}" in seen and PUSHED_DNS not in seen, seen
        assert "192.0.2.53" not in seen
        state = json.loads(x.state_file.read_text())
        assert f"dev gtun0 table {state['table']}" in ns.run(["ip", "route", "get", INET]).stdout
        assert ns.run(["ip", "-4", "rule"]).stdout.count("suppress_prefixlength 0") == 1
        assert ask_peer(x) == RELAY_INET
    finally:
        x.net.stop(x.client)
        x.net.stop(relay)
        relay.config.write_text(original)
        x.net.start_relay()
    assert_restored(x)
