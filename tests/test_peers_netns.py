"""Tier 3: `gtun peer ...` against a running relay in namespaces, with a stock WireGuard
peer (wireguard-go) and gtun clients.

    test_qr_code_and_preshared_keys   `peer add --qr --qr-png`: the PNG decoded with
                                      zbarimg configures wireguard-go (`wg setconf`);
                                      with a wrong PresharedKey it never connects (the
                                      relay counts and logs it, and serves on), with the
                                      right one it pings the relay and a gtun client; a
                                      gtun client with the relay's PSK connects, one with
                                      another PSK never does
    test_peer_commands_live           list, disable, enable and remove while a SHA-256-
                                      checked transfer between two gtun clients runs:
                                      the transfer and its sessions are untouched; the
                                      disabled wireguard-go peer is cut off and comes
                                      back after enable

    underlay: gtun.lab.net's, 10.247.x.x (the phone: 10.247.100.0/24)
    overlay:  10.66.0.0/24

Namespaces start with "gtp"; wireguard-go's interface is "wgp" + 4 random hex digits
(its control socket, /var/run/wireguard/NAME.sock, is shared by every namespace)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtun.app.keys import encode_key
from gtun.lab.net import PORT, GtunNet, Node
from gtun.lab.netns import Lab
from labkit import (
    apply_wg_quick,
    ping_count,
    run_gtun,
    split_wg_quick,
    start_wireguard_go,
    wait_until,
)

pytestmark = pytest.mark.netns

UNDERLAY = 247
PHONE_NET = f"10.{UNDERLAY}.100"
RELAY_ADDRESS = "10.66.0.1"
WG_RUN = Path("/var/run/wireguard")
JOIN_BOUND = 25.0  # seconds for wireguard-go to handshake (it retries every 5 s)
SIZE = 12 * 1024 * 1024  # bytes of the checked transfer
THROTTLE = "10mbit"  # c1's uplink while it runs: about 10 s, to overlap the commands
DIGEST = len(hashlib.sha256().hexdigest())


@pytest.fixture
def lab_prefix() -> str:
    return "gtp"


class Phone:
    """A namespace behind the relay running wireguard-go, configured as wg-quick would."""

    def __init__(self, lab: Lab, net: GtunNet, workdir: Path) -> None:
        self.ns = lab.add_ns("phone")
        lab.veth(net.relay.ns, "rph", f"{PHONE_NET}.1/24", self.ns, "up0", f"{PHONE_NET}.2/24")
        self.ifname = f"wgp{secrets.token_hex(2)}"
        self.dir = workdir
        self.log = workdir / "wireguard-go.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wg_quick: str) -> None:
        self.proc = start_wireguard_go(self.ns, self.ifname, self.log)
        apply_wg_quick(self.ns, self.ifname, wg_quick, self.dir / "phone.setconf")

    def pings(self, address: str, count: int = 3, deadline: int = 4) -> int:
        return ping_count(self.ns, address, count, deadline=deadline)

    def log_tail(self) -> str:
        if not self.log.exists():
            return "(no wireguard-go log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        (WG_RUN / f"{self.ifname}.sock").unlink(missing_ok=True)


@pytest.fixture
def tools() -> None:
    missing = [t for t in ("wireguard-go", "wg", "zbarimg", "tc") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"these tests need {missing} (scripts/setup installs them)")


def peer_add(net: GtunNet, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_gtun(
        net.relay.ns,
        "peer",
        "add",
        name,
        "-c",
        str(net.relay.config),
        "--endpoint",
        f"{PHONE_NET}.1:{PORT}",
        *args,
    )


def relay_peer(net: GtunNet, name: str) -> dict[str, Any] | None:
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    return next((p for p in st["peers"] if p["name"] == name), None)


def set_psk_file(node: Node, path: Path, key: bytes) -> None:
    """Write `key` to `path` (0600) and name it in `node`'s config, in the table that
    ends the file ([client], or the relay's last [[peers]])."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(encode_key(key) + "\n")
    node.config.write_text(node.config.read_text() + f'preshared_key_file = "{path}"\n')


@pytest.fixture
def net(lab: Lab, tmp_path: Path) -> Iterator[GtunNet]:
    the_net = GtunNet(lab, tmp_path / "net", clients=2, underlay=UNDERLAY, lan=False)
    yield the_net
    for node in [the_net.relay, *the_net.clients]:
        the_net.stop(node)


def test_qr_code_and_preshared_keys(net: GtunNet, lab: Lab, tmp_path: Path, tools: None) -> None:
    c1, c2 = net.clients
    relay_toml = net.relay.config
    # c2 is the relay's last [[peers]] entry: it gets a PSK, and c1's config the same;
    # c2's own config another.  So c1 cannot connect and c2 can.
    psk = secrets.token_bytes(32)
    set_psk_file(net.relay, tmp_path / "c2.psk", psk)
    set_psk_file(c2, tmp_path / "c2-client.psk", psk)
    set_psk_file(c1, tmp_path / "c1-client.psk", secrets.token_bytes(32))
    assert 'preshared_key_file = "' in relay_toml.read_text()
    phone = Phone(lab, net, tmp_path)
    try:
        net.start_relay()
        for c in (c1, c2):
            net.start_client(c)
        c2_address = net.wait_configured(c2)

        png = tmp_path / "phone.png"
        added = peer_add(net, "phone", "--qr", "--qr-png", str(png))
        assert added.returncode == 0, added.stderr
        assert set(added.stdout.replace("\n", "")) <= set("█▀▄ ")  # the code, no text
        decoded = subprocess.run(
            ["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True, timeout=30
        )
        assert decoded.returncode == 0, decoded.stderr
        text = decoded.stdout
        setconf, iface, _ = split_wg_quick(text)
        right = next(v for k, v in (line.split(" = ", 1) for line in setconf.splitlines()
                                    if " = " in line) if k == "PresharedKey")  # fmt: skip
        assert iface["address"] == ["10.66.0.4/24"], text  # c1 .2, c2 .3, the phone .4

        # A wrong PresharedKey: wireguard-go never completes a handshake.
        wrong = encode_key(secrets.token_bytes(32))
        phone.start(text.replace(f"PresharedKey = {right}", f"PresharedKey = {wrong}"))
        assert phone.pings(RELAY_ADDRESS) == 0
        wait_until(
            lambda: (relay_peer(net, "phone") or {}).get("drops", {}).get("unconfirmed", 0) >= 1,
            JOIN_BOUND,
            "the relay to count the phone's unconfirmed sessions",
        )
        show = phone.ns.run(["wg", "show", phone.ifname, "latest-handshakes"]).stdout
        assert show.split()[-1] == "0", show  # wireguard-go: never
        assert "initiated again without using the session" in net.relay.log.read_text()
        assert net.relay.proc is not None and net.relay.proc.poll() is None

        # The right one, as the code said: it joins.
        fd = os.open(tmp_path / "right.psk", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(right + "\n")
        relay_key = net.relay.public
        phone.ns.run(
            [
                "wg",
                "set",
                phone.ifname,
                "peer",
                relay_key,
                "preshared-key",
                str(tmp_path / "right.psk"),
            ]
        )
        started = time.monotonic()
        wait_until(lambda: phone.pings(RELAY_ADDRESS, 1, 2) == 1, JOIN_BOUND, "the phone's ping")
        print(f"wireguard-go joined {time.monotonic() - started:.1f} s after its PSK was set")
        assert phone.pings(c2_address) == 3  # through the relay to a gtun client
        assert ping_count(c2.ns, "10.66.0.4", 3) == 3

        # The gtun client with another PSK never connected; the relay counted it.
        st = net.status(c1)
        assert st is not None and st.get("address") is None, st
        c1_at_relay = relay_peer(net, "c1")
        assert c1_at_relay is not None and c1_at_relay["rx_bytes"] == 0
    except BaseException:
        print(f"--- relay\n{net.log_tail(net.relay)}\n--- c1\n{net.log_tail(c1)}")
        print(f"--- wireguard-go\n{phone.log_tail()}")
        raise
    finally:
        phone.stop()


def gtun_ok(net: GtunNet, *args: str) -> str:
    out = run_gtun(net.relay.ns, *args, "-c", str(net.relay.config))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_peer_commands_live(net: GtunNet, lab: Lab, tmp_path: Path, tools: None) -> None:
    c1, c2 = net.clients
    phone = Phone(lab, net, tmp_path)
    result: dict[str, Any] = {}

    def transfer() -> None:
        try:
            result["digests"] = net.transfer(c1.ns, c2.ns, result["to"], SIZE, port=5300)
        except BaseException as exc:  # reported by the test's thread
            result["error"] = exc
        result["ended"] = time.monotonic()

    try:
        net.start_all()
        added = peer_add(net, "phone")
        assert added.returncode == 0, added.stderr
        phone.start(added.stdout)
        wait_until(lambda: phone.pings(RELAY_ADDRESS, 1, 2) == 1, JOIN_BOUND, "the phone")
        assert peer_add(net, "tablet", "--no-psk").returncode == 0  # stored, never started
        before = {n: relay_peer(net, n) for n in ("c1", "c2")}

        c1.ns.run(["tc", "qdisc", "add", "dev", "up0", "root", "tbf", "rate", THROTTLE,
                   "burst", "32kb", "latency", "400ms"])  # fmt: skip
        result["to"] = c2.extra["address"]
        runner = threading.Thread(target=transfer)
        started = time.monotonic()
        runner.start()
        time.sleep(0.5)  # under way

        listed = gtun_ok(net, "peer", "list")
        rows = {line.split()[0]: line for line in listed.splitlines()[1:]}
        assert set(rows) == {"c1", "c2", "phone", "tablet"}, listed
        assert "config" in rows["c1"] and "stored" in rows["phone"]

        gtun_ok(net, "peer", "disable", "phone")
        assert relay_peer(net, "phone") is None
        assert phone.pings(RELAY_ADDRESS, 3, 3) == 0  # cut off
        assert "disabled" in gtun_ok(net, "peer", "list").split("phone", 1)[1].splitlines()[0]

        gtun_ok(net, "peer", "remove", "tablet")
        assert "tablet" not in gtun_ok(net, "peer", "list")
        gtun_ok(net, "peer", "enable", "phone")
        commands_done = time.monotonic()
        print(f"list, disable, remove, enable: {commands_done - started:.1f} s into the transfer")

        back = time.monotonic()
        wait_until(lambda: phone.pings(RELAY_ADDRESS, 1, 2) == 1, JOIN_BOUND, "the phone again")
        print(f"the phone answered {time.monotonic() - back:.1f} s after enable")

        runner.join(120)
        assert not runner.is_alive(), "the transfer did not end in 120 s"
        if "error" in result:
            raise result["error"]
        sent, received, seconds = result["digests"]
        print(
            f"transfer c1 -> c2: {SIZE} bytes in {seconds:.1f} s, {SIZE / seconds / 1e6:.1f} MB/s"
        )
        assert len(sent) == DIGEST and sent == received
        # The commands ran while the transfer did, and its sessions were not touched.
        assert commands_done < result["ended"], "the transfer ended before the commands"
        for name, was in before.items():
            now = relay_peer(net, name)
            assert was is not None and now is not None
            assert now["last_handshake"] == was["last_handshake"], (name, was, now)
            assert now["endpoint"] == was["endpoint"]
    except BaseException:
        print(f"--- relay\n{net.log_tail(net.relay)}\n--- wireguard-go\n{phone.log_tail()}")
        raise
    finally:
        phone.stop()
