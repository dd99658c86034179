"""The `gtun` command as a user runs it: exit codes and one-line errors.

Bad input exits 2 with one line naming the file, the key and what is wrong; no
traceback.  Commands that would touch the network run inside a lab namespace.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.lab.netns import Lab, python_env
from labkit import hold_port

GTUN = [sys.executable, "-m", "gtun"]


def run(*args: str, input: str | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GTUN, *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=30,
        env=python_env(),
        **kw,  # type: ignore[call-overload]
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def write_key(path: Path, mode: int = 0o600) -> bytes:
    key = generate_private_key()
    path.write_text(encode_key(key) + "\n")
    path.chmod(mode)
    return key


def server_toml(tmp: Path, body: str = "", peers: str = "", listen: str = "0.0.0.0:9621") -> Path:
    cfg = tmp / "server.toml"
    cfg.write_text(
        "[server]\n"
        f'listen = "{listen}"\n'
        'private_key_file = "server.key"\n'
        'network = "10.66.0.0/24"\n'
        f'state_dir = "{tmp / "state"}"\n'
        f'control_socket = "{tmp / "server.sock"}"\n' + body + peers
    )
    return cfg


def test_help_for_every_command() -> None:
    for cmd in ([], ["genkey"], ["pubkey"], ["server"], ["client"], ["peer", "add"], ["status"]):
        result = run(*cmd, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout
    assert run("demo", "--help").returncode == 0


def test_bad_usage_exits_2() -> None:
    result = run("frobnicate")
    assert result.returncode == 2
    assert run("server").returncode == 2  # -c is required


def test_genkey_pubkey_match_wireguard_tools() -> None:
    private = run("genkey").stdout.strip()
    ours = run("pubkey", input=private + "\n").stdout.strip()
    assert len(private) == 44 and len(ours) == 44
    if shutil.which("wg"):
        theirs = subprocess.run(
            ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert ours == theirs
        wg_private = subprocess.run(
            ["wg", "genkey"], capture_output=True, text=True, check=True
        ).stdout
        wg_public = subprocess.run(
            ["wg", "pubkey"], input=wg_private, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert run("pubkey", input=wg_private).stdout.strip() == wg_public


def test_pubkey_rejects_garbage() -> None:
    result = run("pubkey", input="not a key\n")
    assert result.returncode == 2
    assert "malformed key" in one_line_error(result)


@pytest.mark.parametrize(
    ("setup", "expect"),
    [
        ("missing_key", ["server.key", "private_key_file"]),
        ("open_key", ["server.key", "chmod 600"]),
        ("bad_key", ["server.key", "malformed"]),
        ("syntax", ["server.toml:3"]),
        ("unknown", ["server.toml", "colour"]),
        ("cidr", ["server.toml", "network"]),
        ("outside", ["server.toml", "address", "10.99.0.5", "outside"]),
        ("mtu", ["server.toml", "mtu"]),
    ],
)
def test_server_config_errors(tmp_path: Path, setup: str, expect: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the server checks for root before reading its config")
    key = tmp_path / "server.key"
    if setup != "missing_key":
        write_key(key, 0o644 if setup == "open_key" else 0o600)
    if setup == "bad_key":
        key.write_text("c2hvcnQ=\n")
    peer = encode_key(public_key(generate_private_key()))
    body, peers = "", ""
    if setup == "syntax":
        cfg = tmp_path / "server.toml"
        cfg.write_text('[server]\nlisten = "0.0.0.0:9621"\nnetwork = 10.66.0.0/24\n')
    else:
        if setup == "unknown":
            body = 'colour = "blue"\n'
        if setup == "cidr":
            body = ""
        if setup == "mtu":
            body = "mtu = 12\n"
        if setup == "outside":
            peers = f'\n[[peers]]\nname = "a"\npublic_key = "{peer}"\naddress = "10.99.0.5"\n'
        cfg = server_toml(tmp_path, body, peers)
        if setup == "cidr":
            cfg.write_text(cfg.read_text().replace("10.66.0.0/24", "10.66.0.0/33"))
    result = run("server", "-c", str(cfg))
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    for word in expect:
        assert word in line, line


def test_client_config_errors(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the client checks for root before reading its config")
    write_key(tmp_path / "c.key")
    cfg = tmp_path / "client.toml"
    cfg.write_text(
        '[client]\nserver = "10.0.0.1:9621"\nserver_public_key = "AAAA"\n'
        'private_key_file = "c.key"\n'
    )
    result = run("client", "-c", str(cfg))
    assert result.returncode == 2
    line = one_line_error(result)
    assert "client.toml" in line and "server_public_key" in line


def test_not_root_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gtun import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for role in ("server", "client"):
        assert cli.main([role, "-c", str(tmp_path / "x.toml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "root" in err[0]


def test_missing_config_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    result = run("server", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in one_line_error(result)


@pytest.mark.netns
def test_listen_port_in_use(tmp_path: Path) -> None:
    write_key(tmp_path / "server.key")
    cfg = server_toml(tmp_path, listen="127.0.0.1:9621")
    with Lab("gtc" + os.urandom(2).hex()) as lab:
        ns = lab.add_ns("a")
        hold_port(ns, "udp", 9621, tmp_path / "holder.log")
        result = ns.run([*GTUN, "server", "-c", str(cfg)], check=False, env=python_env())
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "server.listen" in line and "9621" in line and "in use" in line
    assert not (tmp_path / "server.sock").exists()


def test_status_without_a_running_gtun(tmp_path: Path) -> None:
    result = run("status", "-s", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "none.sock" in one_line_error(result)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    result = run("status", "-s", str(stale))
    assert result.returncode == 1 and "stale" in one_line_error(result)


def test_peer_add_prints_wg_quick_config(tmp_path: Path) -> None:
    key = write_key(tmp_path / "server.key")
    cfg = server_toml(tmp_path, 'routes = ["192.168.77.0/24"]\ndns = ["10.66.0.1"]\n')
    result = run("peer", "add", "phone", "-c", str(cfg), "--endpoint", "203.0.113.5:9621")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "[Interface]" in text and "[Peer]" in text
    assert f"PublicKey = {encode_key(public_key(key))}" in text
    assert "Address = 10.66.0.2/24" in text
    assert "Endpoint = 203.0.113.5:9621" in text
    assert "AllowedIPs = 10.66.0.0/24, 192.168.77.0/24" in text
    assert "not running" in result.stderr
    # The peer was stored: a second one gets the next address, the same name is refused.
    second = run("peer", "add", "laptop", "-c", str(cfg), "--endpoint", "203.0.113.5:9621")
    assert "Address = 10.66.0.3/24" in second.stdout
    again = run("peer", "add", "phone", "-c", str(cfg), "--endpoint", "203.0.113.5:9621")
    assert again.returncode == 2 and "phone" in one_line_error(again)
