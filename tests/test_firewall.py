"""Forwarding and NAT: files in a temporary directory, and nftables inside namespaces."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from gtun.errors import ConfigError, RuntimeFailure
from gtun.lab.netns import Lab, Namespace
from gtun.system.nft import Forwarding, Nat, table_name
from labkit import run_python


@pytest.fixture
def lab_prefix() -> str:
    return "gta"


# -- without privileges ---------------------------------------------------------------


def _fake_proc(tmp_path: Path, v4: str, v6: str) -> Path:
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / "net/ipv6/conf/all").mkdir(parents=True)
    (tmp_path / "net/ipv4/ip_forward").write_text(v4 + "\n")
    (tmp_path / "net/ipv6/conf/all/forwarding").write_text(v6 + "\n")
    return tmp_path


def test_forwarding_enable_restore_files(tmp_path: Path) -> None:
    root = _fake_proc(tmp_path, "0", "1")
    fwd = Forwarding(root)
    fwd.enable(ipv6=True)
    assert (root / "net/ipv4/ip_forward").read_text().strip() == "1"
    assert (root / "net/ipv6/conf/all/forwarding").read_text().strip() == "1"
    fwd.enable(ipv6=True)  # again: still remembers the first values
    fwd.restore()
    assert (root / "net/ipv4/ip_forward").read_text().strip() == "0"
    assert (root / "net/ipv6/conf/all/forwarding").read_text().strip() == "1"
    fwd.restore()  # idempotent


def test_forwarding_failure_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match=r"cannot read .*/net/ipv4/ip_forward"):
        Forwarding(tmp_path).enable()


def test_nat_ruleset_and_names() -> None:
    nat = Nat("gtun-0.x", [ip_network("10.66.0.0/24"), ip_network("fd66::/64")])
    assert nat.table == table_name("gtun-0.x") == "gtun_gtun_0_x"
    text = nat.ruleset()
    assert 'ip saddr { 10.66.0.0/24 } oifname != "gtun-0.x" masquerade' in text
    assert 'ip6 saddr { fd66::/64 } oifname != "gtun-0.x" masquerade' in text
    assert text.index("delete table inet gtun_gtun_0_x") < text.index("chain postrouting")
    with pytest.raises(ConfigError):
        Nat('x" ; flush ruleset', [])


def test_nft_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gtun.system.nft.NFT", "/nonexistent/nft")
    nat = Nat("gtun0", [ip_network("10.66.0.0/24")])
    with pytest.raises(RuntimeFailure, match="nft is not installed"):
        nat.active()


# -- inside namespaces ----------------------------------------------------------------

NAT_SCRIPT = """
import sys
from ipaddress import ip_network
from gtun.system.nft import Nat
nat = Nat(sys.argv[2], [ip_network(n) for n in sys.argv[3:]])
getattr(nat, sys.argv[1])()
print("active" if nat.active() else "inactive")
"""


def _nat(ns: Namespace, action: str, device: str, *networks: str) -> str:
    return run_python(ns, NAT_SCRIPT, action, device, *networks).stdout.strip()


@pytest.mark.netns
def test_nat_table_apply_replace_remove(lab: Lab) -> None:
    ns = lab.add_ns("n")
    table = "gtun_gtat0"
    # A stale table from a crashed run, with a chain gtun would never make.
    ns.run(["nft", "add", "table", "inet", table])
    ns.run(["nft", "add", "chain", "inet", table, "stale"])

    assert _nat(ns, "apply", "gtat0", "10.201.8.0/24", "fd20:1:8::/64") == "active"
    assert f"table inet {table}" in ns.run(["nft", "list", "tables"]).stdout
    listing = ns.run(["nft", "list", "table", "inet", table]).stdout
    assert "stale" not in listing
    assert "type nat hook postrouting" in listing
    assert 'ip saddr 10.201.8.0/24 oifname != "gtat0" masquerade' in listing
    assert 'ip6 saddr fd20:1:8::/64 oifname != "gtat0" masquerade' in listing

    assert _nat(ns, "apply", "gtat0", "10.201.9.0/24") == "active"  # applied twice: replaced
    listing = ns.run(["nft", "list", "table", "inet", table]).stdout
    assert "10.201.9.0/24" in listing and "10.201.8.0/24" not in listing

    assert _nat(ns, "remove", "gtat0") == "inactive"
    assert table not in ns.run(["nft", "list", "tables"]).stdout
    assert _nat(ns, "remove", "gtat0") == "inactive"  # not there: fine


FORWARDING_SCRIPT = """
from pathlib import Path
from gtun.system.nft import Forwarding
v4 = Path("/proc/sys/net/ipv4/ip_forward")
v6 = Path("/proc/sys/net/ipv6/conf/all/forwarding")
def show():
    return v4.read_text().strip() + v6.read_text().strip()
fwd = Forwarding()
before = show()
fwd.enable(ipv6=True)
during = show()
fwd.restore()
print(before, during, show())
"""


@pytest.mark.netns
def test_forwarding_in_a_namespace(lab: Lab) -> None:
    ns = lab.add_ns("w")
    ns.sysctl("net.ipv4.ip_forward", 0)
    ns.sysctl("net.ipv6.conf.all.forwarding", 0)
    assert run_python(ns, FORWARDING_SCRIPT).stdout.split() == ["00", "11", "00"]


@pytest.mark.netns
def test_masquerade_lets_the_server_answer(lab: Lab) -> None:
    # client 10.201.10.2 -- 10.201.10.1 router 10.201.11.1 -- 10.201.11.2 server
    # The server has no route back to 10.201.10.0/24: only NAT on the router helps.
    client, router, server = lab.add_ns("c"), lab.add_ns("r"), lab.add_ns("s")
    lab.veth(client, "gtac", "10.201.10.2/24", router, "gtarc", "10.201.10.1/24")
    lab.veth(router, "gtars", "10.201.11.1/24", server, "gtas", "10.201.11.2/24")
    client.add_route("10.201.11.0/24", "10.201.10.1")
    router.sysctl("net.ipv4.ip_forward", 1)
    ping = ["ping", "-c", "1", "-W", "1", "10.201.11.2"]

    assert router.run(["ping", "-c", "1", "-W", "1", "10.201.11.2"]).returncode == 0
    assert client.run(ping, check=False).returncode != 0

    # "gtarc" plays the tunnel device: traffic from it leaving by gtars is masqueraded.
    assert _nat(router, "apply", "gtarc", "10.201.10.0/24") == "active"
    result = client.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.201.11.2"], check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    assert _nat(router, "remove", "gtarc") == "inactive"
    assert client.run(ping, check=False).returncode != 0
