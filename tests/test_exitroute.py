"""The full-tunnel exit's pieces without a network: the plan of rules and routes, the
state file, the nftables script (exitroute.py), and the in-place rewrite and restore of
resolv.conf (dnsconf.py).
(Routing itself is tested in namespaces, tests/test_exit.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from gtun.errors import RuntimeFailure
from gtun.system import dns as dnsconf
from gtun.system import fulltunnel as exitroute
from gtun.system.dns import (
    DnsChange,
    apply_dns,
    is_mount_point,
    plan_dns,
    restore_dns,
    write_in_place,
)
from gtun.system.fulltunnel import (
    ExitState,
    Route,
    Rule,
    load_state,
    plan,
    recover,
    save_state,
)

DNS = [IPv4Address("10.66.0.1"), IPv6Address("fd66::1")]


def test_plan_covers_both_families_and_blocks_ipv6_without_it() -> None:
    rules, routes = plan("gtun0", 51821, 51821, ipv6=False)
    assert [str(r) for r in rules] == [
        "IPv4 rule 32764: lookup main suppress_prefixlength 0",
        "IPv4 rule 32765: not fwmark 0xca6d lookup 51821",
        "IPv6 rule 32764: lookup main suppress_prefixlength 0",
        "IPv6 rule 32765: not fwmark 0xca6d lookup 51821",
    ]
    assert routes == [Route(4, 51821, "gtun0"), Route(6, 51821, None)]
    assert str(routes[1]) == "IPv6 default route unreachable in table 51821"
    _, routes6 = plan("gtun0", 51821, 51821, ipv6=True)
    assert routes6[1] == Route(6, 51821, "gtun0")


def test_rule_and_route_netlink_arguments() -> None:
    tunnel = Rule(6, 32765, 51820, fwmark=51820)
    assert tunnel.netlink() == {
        "family": socket.AF_INET6,
        "priority": 32765,
        "table": 51820,
        "fwmark": 51820,
        "flags": exitroute.FIB_RULE_INVERT,
    }
    suppress = Rule(4, 32764, exitroute.RT_TABLE_MAIN, suppress_prefixlength=0)
    assert suppress.netlink()["suppress_prefixlen"] == 0
    assert "fwmark" not in suppress.netlink()
    assert Route(4, 51820, "gtun0").netlink(7) == {
        "family": socket.AF_INET,
        "dst": "0.0.0.0/0",
        "table": 51820,
        "type": "unicast",
        "oif": 7,
    }
    assert Route(6, 51820, None).netlink()["type"] == "unreachable"


def test_nft_ruleset_keeps_the_mark_and_guards_the_tunnel_addresses() -> None:
    script = exitroute.nft_ruleset(
        "gtun_exit_gtun0", "gtun0", 51820, [IPv4Address("10.66.0.2"), IPv6Address("fd66::2")]
    )
    assert script.startswith("table inet gtun_exit_gtun0\ndelete table inet gtun_exit_gtun0\n")
    assert 'iifname != "gtun0" ip daddr 10.66.0.2 fib saddr type != local drop' in script
    assert 'iifname != "gtun0" ip6 daddr fd66::2 fib saddr type != local drop' in script
    assert "meta mark 51820 ct mark set meta mark" in script
    assert "ct mark 51820 meta mark set ct mark" in script
    assert exitroute.nft_table_name("gt-1.x") == "gtun_exit_gt_1_x"


def _state(**changes: object) -> ExitState:
    rules, routes = plan("gtun0", 51820, 51820, ipv6=False)
    state = ExitState(
        pid=123,
        config="/etc/gtun/alice.toml",
        device="gtun0",
        table=51820,
        fwmark=51820,
        rules=rules,
        routes=routes,
        src_valid_mark_old="0",
        nft_table="gtun_exit_gtun0",
        dns=DnsChange("file", path="/etc/resolv.conf", original="nameserver 1.1.1.1\n"),
    )
    for key, value in changes.items():
        setattr(state, key, value)
    return state


def test_state_round_trip(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "sub" / "exit-alice.json"
    save_state(path, state)
    assert load_state(path) == state
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["exit-alice.json"]  # no temp left
    # Bytes that are not UTF-8 survive (resolv.conf is stored byte for byte).
    odd = _state(dns=DnsChange("file", path="/x", original="\xff\xfe# caf\xe9\n"))
    save_state(path, odd)
    assert load_state(path) == odd
    assert load_state(tmp_path / "missing.json") is None
    assert exitroute.state_file(Path("/var/lib/gtun"), Path("/etc/gtun/alice.toml")) == Path(
        "/var/lib/gtun/exit-alice.json"
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[]",
        '{"version": 99}',
        '{"version": 1, "pid": 1}',
        '{"version": 1, "pid": "1", "config": "c", "device": "d", "table": 1, "fwmark": 1,'
        ' "rules": [], "routes": []}',
        '{"version": 1, "pid": 1, "config": "c", "device": "d", "table": 1, "fwmark": 1,'
        ' "rules": [{"family": 5, "priority": 1, "table": 1}], "routes": []}',
        '{"version": 1, "pid": 1, "config": "c", "device": "d", "table": 1, "fwmark": 1,'
        ' "rules": [{"bogus": 1}], "routes": []}',
        '{"version": 1, "pid": 1, "config": "c", "device": "d", "table": 1, "fwmark": 1,'
        ' "rules": [], "routes": [], "nft_table": "filter"}',
    ],
)
def test_damaged_state_file_is_one_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "exit-c.json"
    path.write_text(text)
    with pytest.raises(RuntimeFailure) as info:
        load_state(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_write_in_place_keeps_the_file(tmp_path: Path) -> None:
    target = tmp_path / "real.conf"
    target.write_text("nameserver 192.0.2.1\nsearch a.very.long.search.domain.example\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    inode = os.stat(target).st_ino
    write_in_place(link, "nameserver 10.66.0.1\n")
    assert link.is_symlink()
    assert os.stat(target).st_ino == inode
    assert target.read_text() == "nameserver 10.66.0.1\n"  # truncated, nothing left over
    with pytest.raises(RuntimeFailure, match="cannot write"):
        write_in_place(tmp_path / "no-dir" / "resolv.conf", "x")


def _no_resolvconf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnsconf.shutil, "which", lambda name: None)


def _file_dns_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, DnsChange]:
    """DNS applied by rewriting a resolv.conf that held "nameserver 192.0.2.1"."""
    _no_resolvconf(monkeypatch)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\n")
    change = plan_dns(DNS, "gtun0", "alice.toml", resolv)
    assert change is not None
    apply_dns(change, DNS)
    return resolv, change


def test_dns_file_applied_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_resolvconf(monkeypatch)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\n")
    assert plan_dns([], "gtun0", "alice.toml", resolv) is None
    change = plan_dns(DNS, "gtun0", "alice.toml", resolv)
    assert change is not None and change.method == "file"
    assert change.original == "nameserver 192.0.2.1\n"
    assert resolv.read_text() == "nameserver 192.0.2.1\n"  # planning changes nothing
    apply_dns(change, DNS)
    text = resolv.read_text()
    assert "nameserver 10.66.0.1\nnameserver fd66::1\n" in text and "192.0.2.1" not in text
    assert restore_dns(change) == f"restored {resolv}"
    assert resolv.read_text() == "nameserver 192.0.2.1\n"
    assert restore_dns(change) == f"{resolv} was unchanged"


def test_dns_changed_by_someone_else_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolv, change = _file_dns_applied(tmp_path, monkeypatch)
    resolv.write_text("nameserver 203.0.113.9\n")  # say, a DHCP client
    assert "left as changed" in restore_dns(change)
    assert resolv.read_text() == "nameserver 203.0.113.9\n"


def test_dns_file_that_did_not_exist_is_removed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_resolvconf(monkeypatch)
    resolv = tmp_path / "resolv.conf"
    change = plan_dns(DNS, "gtun0", "alice.toml", resolv)
    assert change is not None and change.original is None
    apply_dns(change, DNS)
    assert resolv.exists()
    restore_dns(change)
    assert not resolv.exists()


def test_resolvconf_preferred_unless_resolv_conf_is_a_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dnsconf.shutil, "which", lambda name: "/sbin/resolvconf")
    resolv = tmp_path / "resolv.conf"
    change = plan_dns(DNS, "gtun0", "alice.toml", resolv)
    assert change == DnsChange("resolvconf", interface="tun.gtun0")
    monkeypatch.setattr(dnsconf, "is_mount_point", lambda path: path == resolv)
    assert dnsconf.dns_method(resolv) == "file"


def test_is_mount_point_reads_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 8:1 /etc/netns/x/resolv.conf /etc/resolv.conf rw - ext4 /dev/sda1 rw\n"
        "41 22 0:5 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
    )
    assert is_mount_point(Path("/etc/resolv.conf"), info)
    assert is_mount_point(Path("/mnt/with space"), info)
    assert not is_mount_point(Path("/etc/hosts"), info)
    assert not is_mount_point(Path("/etc/resolv.conf"), tmp_path / "missing")


def test_recover_restores_dns_and_removes_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A state with nothing but a DNS change: recovery needs no netlink for it.
    resolv, change = _file_dns_applied(tmp_path, monkeypatch)
    path = tmp_path / "exit-alice.json"
    bare = _state(rules=[], routes=[], src_valid_mark_old=None, nft_table=None, dns=change)
    save_state(path, bare)
    assert recover(path) is True
    assert resolv.read_text() == "nameserver 192.0.2.1\n"
    assert not path.exists()
    assert "did not exit cleanly" in caplog.text
    assert recover(path) is False


def test_recover_refuses_while_the_owner_runs(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "gtun"])
    try:
        path = tmp_path / "exit-alice.json"
        # Nothing in it that could touch this (root) namespace, should the check fail.
        bare = _state(pid=owner.pid, rules=[], routes=[], src_valid_mark_old=None, nft_table=None)
        bare.dns = None
        save_state(path, bare)
        with pytest.raises(RuntimeFailure, match=f"another gtun client \\(pid {owner.pid}"):
            recover(path)
        assert path.exists()
    finally:
        owner.kill()
        owner.wait()


def test_mark_socket_errors_are_one_line() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()
    with pytest.raises(RuntimeFailure, match="cannot set firewall mark 51820"):
        exitroute.mark_socket(sock, 51820)


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")
def test_mark_socket_sets_the_mark() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        exitroute.mark_socket(sock, 51820)
        assert sock.getsockopt(socket.SOL_SOCKET, exitroute.SO_MARK) == 51820
