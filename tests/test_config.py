from __future__ import annotations

import os
import textwrap
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path

import pytest

from gtun.app import config, keys
from gtun.app.config import (
    ClientConfig,
    ServerConfig,
    load_client_config,
    load_server_config,
    parse_host_port,
)
from gtun.errors import ConfigError

ALICE = keys.encode_key(keys.public_key(keys.generate_private_key()))
BOB = keys.encode_key(keys.public_key(keys.generate_private_key()))


def _key_file(directory: Path, name: str, mode: int = 0o600) -> tuple[Path, bytes]:
    private = keys.generate_private_key()
    path = directory / name
    path.write_text(keys.encode_key(private) + "\n")
    os.chmod(path, mode)
    return path, private


def _write(directory: Path, text: str, name: str = "gtun.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


SERVER_HEAD = """\
[server]
private_key_file = "server.key"
network = "10.66.0.0/24"
"""


def _server(tmp_path: Path, body: str = "", head: str = SERVER_HEAD) -> Path:
    if not (tmp_path / "server.key").exists():
        _key_file(tmp_path, "server.key")
    return _write(tmp_path, head + textwrap.dedent(body))


def _server_error(tmp_path: Path, body: str = "", head: str = SERVER_HEAD) -> ConfigError:
    path = _server(tmp_path, body, head)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}")
    return info.value


# ---------------------------------------------------------------------------
# The relay


def test_full_server_config(tmp_path: Path) -> None:
    _, private = _key_file(tmp_path, "server.key")
    path = _write(
        tmp_path,
        f"""\
        [server]
        listen = "[::]:5000"
        private_key_file = "server.key"
        network = "10.66.0.0/24"
        device = "vpn7"
        mode = "tap"
        mtu = 1380
        routes = ["192.168.77.0/24", "2001:db8::/48"]
        nat = true
        dns = ["10.66.0.1", "2001:db8::53"]
        network6 = "fd66::/64"
        metrics_listen = "127.0.0.1:9622"
        state_dir = "state"
        control_socket = "/tmp/gtun-test.sock"
        endpoint = "vpn.example.com:5000"

        [[peers]]
        name = "alice"
        public_key = "{ALICE}"
        address = "10.66.0.10"
        subnets = ["192.168.88.0/24"]

        [[peers]]
        name = "bob.laptop"
        public_key = "{BOB}"
        """,
    )
    cfg = load_server_config(path)
    assert isinstance(cfg, ServerConfig)
    assert cfg.path == path
    assert cfg.listen == ("::", 5000)
    assert cfg.private_key == private
    assert cfg.public_key == keys.public_key(private)
    assert cfg.private_key_file == tmp_path / "server.key"
    assert cfg.network == IPv4Network("10.66.0.0/24")
    assert cfg.relay_address == IPv4Address("10.66.0.1")
    assert cfg.device == "vpn7"
    assert cfg.mode == "tap"
    assert cfg.mtu == 1380
    assert cfg.routes == (ip_network("192.168.77.0/24"), ip_network("2001:db8::/48"))
    assert cfg.nat is True
    assert cfg.dns == (IPv4Address("10.66.0.1"), IPv6Address("2001:db8::53"))
    assert cfg.network6 == IPv6Network("fd66::/64")
    assert cfg.metrics_listen == ("127.0.0.1", 9622)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.control_socket == Path("/tmp/gtun-test.sock")
    assert cfg.endpoint == ("vpn.example.com", 5000)
    alice, bob = cfg.peers
    assert alice == config.PeerConfig(
        name="alice",
        public_key=keys.decode_key(ALICE),
        address=IPv4Address("10.66.0.10"),
        subnets=(IPv4Network("192.168.88.0/24"),),
    )
    assert bob.name == "bob.laptop"
    assert bob.address is None
    assert bob.subnets == ()


def test_server_defaults(tmp_path: Path) -> None:
    cfg = load_server_config(_server(tmp_path))
    assert cfg.listen == ("0.0.0.0", 9621)
    assert cfg.device == "gtun0"
    assert cfg.mode == "tun"
    assert cfg.mtu == 1420
    assert cfg.routes == ()
    assert cfg.nat is False
    assert cfg.dns == ()
    assert cfg.network6 is None
    assert cfg.metrics_listen is None
    assert cfg.state_dir == Path("/var/lib/gtun")
    assert cfg.control_socket == Path("/run/gtun/server.sock")
    assert cfg.endpoint is None
    assert cfg.peers == ()
    assert cfg.offload is True
    assert load_server_config(_server(tmp_path, "offload = false\n")).offload is False


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_server_config(_server(tmp_path))
    with pytest.raises(AttributeError):
        cfg.mtu = 1000  # type: ignore[misc]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_server_config(tmp_path / "nope.toml")
    assert "does not exist" in str(info.value)
    assert "nope.toml" in str(info.value)


def test_missing_key_file(tmp_path: Path) -> None:
    path = _write(tmp_path, SERVER_HEAD)
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: server.private_key_file: ")
    assert str(tmp_path / "server.key") in message
    assert "does not exist" in message


def test_key_file_readable_by_others(tmp_path: Path) -> None:
    key_path, _ = _key_file(tmp_path, "server.key", mode=0o644)
    err = _server_error(tmp_path)
    assert err.key == "server.private_key_file"
    assert f"key file {key_path} is readable by others (mode 0644)" in str(err)
    assert f"chmod 600 {key_path}" in str(err)


def test_a_home_directory_of_no_user_is_a_config_error(tmp_path: Path) -> None:
    # Found by fuzz/config_files.py: Path.expanduser() raised RuntimeError.
    head = SERVER_HEAD.replace('"server.key"', '"~no-such-user-gtun/server.key"')
    err = _server_error(tmp_path, head=head)
    assert err.key == "server.private_key_file"
    assert "no-such-user-gtun" in str(err)


def test_malformed_key_file(tmp_path: Path) -> None:
    key_path = tmp_path / "server.key"
    key_path.write_text("hello\n")
    os.chmod(key_path, 0o600)
    err = _server_error(tmp_path)
    assert err.key == "server.private_key_file"
    assert "malformed key" in str(err)
    assert str(key_path) in str(err)


def test_malformed_peer_key(tmp_path: Path) -> None:
    err = _server_error(tmp_path, '[[peers]]\nname = "a"\npublic_key = "abc"\n')
    assert err.key == "peers[0].public_key"
    assert "malformed key" in str(err)


def test_toml_syntax_error_reports_line(tmp_path: Path) -> None:
    err = _server_error(tmp_path, "mtu = = 1400\n")
    assert err.line == 4
    assert str(err).startswith(f"{tmp_path / 'gtun.toml'}:4: TOML syntax error")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gtun.toml"
    path.write_bytes(b"[server]\n# \xff\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert info.value.line == 2
    assert "UTF-8" in str(info.value)


def test_unknown_key(tmp_path: Path) -> None:
    err = _server_error(tmp_path, "netwrok = 1\n")
    assert err.key == "server.netwrok"
    assert "unknown key 'netwrok'" in str(err)
    assert "did you mean 'network'" in str(err)


def test_unknown_section(tmp_path: Path) -> None:
    err = _server_error(tmp_path, "[client]\nserver = 'x:1'\n")
    assert err.key == "client"
    assert "unknown key" in str(err)


def test_unknown_peer_key(tmp_path: Path) -> None:
    err = _server_error(tmp_path, f'[[peers]]\nname = "a"\npublic_key = "{ALICE}"\nip = "x"\n')
    assert err.key == "peers[0].ip"
    assert "unknown key" in str(err)


def test_misspelt_required_key_reported_as_unknown(tmp_path: Path) -> None:
    _key_file(tmp_path, "server.key")
    path = _write(tmp_path, '[server]\nprivate_key_file = "server.key"\nnetwork_ = "10.0.0.0/8"\n')
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    assert "unknown key 'network_'" in str(info.value)


def test_missing_section(tmp_path: Path) -> None:
    err = _server_error(tmp_path, head="")
    assert err.key == "server"
    assert "missing required section" in str(err)


def test_missing_required_key(tmp_path: Path) -> None:
    _key_file(tmp_path, "server.key")
    err = _server_error(tmp_path, head='[server]\nprivate_key_file = "server.key"\n')
    assert err.key == "server.network"
    assert "missing required key" in str(err)


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('mtu = "big"\n', "server.mtu", "expected an integer, got a string"),
        ("mtu = true\n", "server.mtu", "expected an integer, got a boolean"),
        ("mtu = 100\n", "server.mtu", "100 is not in 576..9000"),
        ("mtu = 9001\n", "server.mtu", "not in 576..9000"),
        ('nat = "yes"\n', "server.nat", "expected a boolean"),
        ('offload = "on"\n', "server.offload", "expected a boolean"),
        ('routes = "10.0.0.0/8"\n', "server.routes", "expected an array of strings"),
        ("routes = [1]\n", "server.routes", "item 0 is an integer"),
        ('routes = ["10.1.2.3/8"]\n', "server.routes", "host bits set; did you mean 10.0.0.0/8"),
        ('routes = ["banana/8"]\n', "server.routes", "not a valid network"),
        ('routes = ["10.0.0.0"]\n', "server.routes", "not a network"),
        ('dns = ["10.0.0.300"]\n', "server.dns", "not an IP address"),
        ('mode = "tan"\n', "server.mode", "is not one of"),
        ('device = "a-very-long-name0"\n', "server.device", "1 to 15 characters"),
        ('device = "a/b"\n', "server.device", "not a valid interface name"),
        ('device = "a b"\n', "server.device", "not a valid interface name"),
        ('device = ""\n', "server.device", "1 to 15 characters"),
        ('listen = "0.0.0.0"\n', "server.listen", "no port"),
        ('listen = "0.0.0.0:0"\n', "server.listen", "not in 1..65535"),
        ('listen = "0.0.0.0:70000"\n', "server.listen", "not in 1..65535"),
        ('listen = ":::9621"\n', "server.listen", "in brackets"),
        ('listen = "[zz]:9621"\n', "server.listen", "not an IPv6 address"),
        ('listen = "localhost:9621"\n', "server.listen", "not an IP address"),
        ('endpoint = "bad_host!:9621"\n', "server.endpoint", "neither an IP address"),
        ('endpoint = "vpn.example.com:x"\n', "server.endpoint", "not a number"),
        ('network6 = "10.0.0.0/8"\n', "server.network6", "not an IPv6 network"),
        ('network6 = "fd00::/127"\n', "server.network6", "/126 or shorter"),
        ('metrics_listen = "127.0.0.1"\n', "server.metrics_listen", "no port"),
        ('state_dir = ""\n', "server.state_dir", "empty"),
    ],
)
def test_bad_server_values(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    err = _server_error(tmp_path, body)
    assert err.key == key
    assert fragment in str(err)
    assert f": {key}: " in str(err)


@pytest.mark.parametrize(
    ("network", "fragment"),
    [
        ("10.66.0.1/24", "host bits set; did you mean 10.66.0.0/24"),
        ("10.66.0.0/31", "/30 or shorter"),
        ("fd00::/64", "not an IPv4 network"),
        ("10.66.0.0/33", "not a valid network"),
    ],
)
def test_bad_network(tmp_path: Path, network: str, fragment: str) -> None:
    _key_file(tmp_path, "server.key")
    head = f'[server]\nprivate_key_file = "server.key"\nnetwork = "{network}"\n'
    err = _server_error(tmp_path, head=head)
    assert err.key == "server.network"
    assert fragment in str(err)


def _peer(name: str, key: str, address: str | None = None, subnets: str = "") -> str:
    text = f'[[peers]]\nname = "{name}"\npublic_key = "{key}"\n'
    if address is not None:
        text += f'address = "{address}"\n'
    if subnets:
        text += f"subnets = {subnets}\n"
    return text


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("10.9.0.5", "address 10.9.0.5 is outside network 10.66.0.0/24"),
        ("10.66.0.0", "network address"),
        ("10.66.0.255", "broadcast address"),
        ("10.66.0.1", "relay's own address"),
        ("fd00::1", "not an IPv4 address"),
        ("x", "not an IP address"),
    ],
)
def test_bad_peer_address(tmp_path: Path, address: str, fragment: str) -> None:
    err = _server_error(tmp_path, _peer("ok", ALICE) + _peer("bad", BOB, address))
    assert err.key == "peers[1].address"
    assert fragment in str(err)


def test_duplicate_peer_names(tmp_path: Path) -> None:
    err = _server_error(tmp_path, _peer("alice", ALICE) + _peer("alice", BOB))
    assert err.key == "peers[1].name"
    assert "duplicate name 'alice'" in str(err)


def test_duplicate_peer_keys(tmp_path: Path) -> None:
    err = _server_error(tmp_path, _peer("alice", ALICE) + _peer("bob", ALICE))
    assert err.key == "peers[1].public_key"
    assert "duplicate public key" in str(err)


def test_duplicate_peer_addresses(tmp_path: Path) -> None:
    body = _peer("alice", ALICE, "10.66.0.9") + _peer("bob", BOB, "10.66.0.9")
    err = _server_error(tmp_path, body)
    assert err.key == "peers[1].address"
    assert "also given to peers[0]" in str(err)


def test_peer_with_relay_key(tmp_path: Path) -> None:
    _, private = _key_file(tmp_path, "server.key")
    err = _server_error(tmp_path, _peer("me", keys.encode_key(keys.public_key(private))))
    assert err.key == "peers[0].public_key"
    assert "relay's own public key" in str(err)


@pytest.mark.parametrize("name", ["", "has space", "x" * 33, "ünï"])
def test_bad_peer_name(tmp_path: Path, name: str) -> None:
    err = _server_error(tmp_path, _peer(name, ALICE))
    assert err.key == "peers[0].name"
    assert "not a valid name" in str(err)


def test_missing_peer_key(tmp_path: Path) -> None:
    err = _server_error(tmp_path, '[[peers]]\nname = "a"\n')
    assert err.key == "peers[0].public_key"
    assert "missing required key" in str(err)


@pytest.mark.parametrize(
    ("subnets", "fragment"),
    [
        ('["10.66.0.0/16"]', "overlaps the virtual network"),
        ('["192.168.1.1/24"]', "host bits set"),
        ('"192.168.1.0/24"', "expected an array of strings"),
    ],
)
def test_bad_peer_subnets(tmp_path: Path, subnets: str, fragment: str) -> None:
    err = _server_error(tmp_path, _peer("a", ALICE, subnets=subnets))
    assert err.key == "peers[0].subnets"
    assert fragment in str(err)


def test_same_subnet_for_two_peers(tmp_path: Path) -> None:
    body = _peer("a", ALICE, subnets='["192.168.1.0/24"]') + _peer(
        "b", BOB, subnets='["192.168.1.0/24"]'
    )
    err = _server_error(tmp_path, body)
    assert err.key == "peers[1].subnets"


def test_peers_must_be_array_of_tables(tmp_path: Path) -> None:
    err = _server_error(tmp_path, '[peers]\nname = "a"\n')
    assert err.key == "peers"


def test_smallest_network_has_room_for_one_client(tmp_path: Path) -> None:
    _key_file(tmp_path, "server.key")
    head = '[server]\nprivate_key_file = "server.key"\nnetwork = "10.0.0.0/30"\n'
    cfg = load_server_config(_server(tmp_path, _peer("a", ALICE, "10.0.0.2"), head=head))
    assert cfg.peers[0].address == IPv4Address("10.0.0.2")


# ---------------------------------------------------------------------------
# A client


def _client(tmp_path: Path, body: str, server_key: str = ALICE) -> Path:
    if not (tmp_path / "alice.key").exists():
        _key_file(tmp_path, "alice.key")
    head = (
        '[client]\nserver = "203.0.113.5:9621"\n'
        f'server_public_key = "{server_key}"\nprivate_key_file = "alice.key"\n'
    )
    return _write(tmp_path, head + textwrap.dedent(body), name="client.toml")


def test_full_client_config(tmp_path: Path) -> None:
    _, private = _key_file(tmp_path, "alice.key")
    path = _client(
        tmp_path,
        """\
        transport = "auto"
        device = "gt1"
        control_socket = "run/c.sock"
        default_route = true
        metrics_listen = "127.0.0.1:9623"
        mode = "tap"
        state_dir = "state"
        """,
        server_key=BOB,
    )
    cfg = load_client_config(path)
    assert cfg == ClientConfig(
        path=path,
        server=("203.0.113.5", 9621),
        server_public_key=keys.decode_key(BOB),
        private_key=private,
        private_key_file=tmp_path / "alice.key",
        transport="auto",
        device="gt1",
        control_socket=tmp_path / "run" / "c.sock",
        default_route=True,
        metrics_listen=("127.0.0.1", 9623),
        mode="tap",
        state_dir=tmp_path / "state",
    )
    assert cfg.public_key == keys.public_key(private)


def test_client_defaults_and_host_name(tmp_path: Path) -> None:
    path = _client(tmp_path, "")
    path.write_text(path.read_text().replace("203.0.113.5", "vpn.example.org"))
    cfg = load_client_config(path)
    assert cfg.server == ("vpn.example.org", 9621)
    assert cfg.transport == "udp"
    assert cfg.device == "gtun0"
    assert cfg.control_socket == Path("/run/gtun/client.sock")
    assert cfg.default_route is False
    assert cfg.metrics_listen is None
    assert cfg.mode is None  # follows the relay
    assert cfg.state_dir == Path("/var/lib/gtun")
    assert cfg.offload is True
    assert load_client_config(_client(tmp_path, "offload = false\n")).offload is False
    assert cfg.pmtu is True and cfg.pmtu_raise_interval == 60
    cfg = load_client_config(_client(tmp_path, "pmtu = false\npmtu_raise_interval = 5\n"))
    assert cfg.pmtu is False and cfg.pmtu_raise_interval == 5
    assert cfg.udp_probe_interval == 30
    assert load_client_config(_client(tmp_path, "udp_probe_interval = 2\n")).udp_probe_interval == 2


def test_client_state_dir_absolute(tmp_path: Path) -> None:
    path = _client(tmp_path, 'state_dir = "/srv/gtun-state"\n')
    assert load_client_config(path).state_dir == Path("/srv/gtun-state")


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('transport = "quic"\n', "client.transport", "is not one of"),
        ('mode = "tan"\n', "client.mode", "is not one of"),
        ("default_route = 1\n", "client.default_route", "expected a boolean"),
        ("offload = 0\n", "client.offload", "expected a boolean"),
        ('pmtu = "yes"\n', "client.pmtu", "expected a boolean"),
        ("pmtu_raise_interval = 0\n", "client.pmtu_raise_interval", "is not in 1..86400"),
        ("pmtu_raise_interval = 1.5\n", "client.pmtu_raise_interval", "expected an integer"),
        ("udp_probe_interval = 0\n", "client.udp_probe_interval", "is not in 1..86400"),
        ('udp_probe_interval = "30s"\n', "client.udp_probe_interval", "expected an integer"),
        ('state_dir = ""\n', "client.state_dir", "empty"),
        ("state_dir = 5\n", "client.state_dir", "expected a string"),
        ("mtu = 1400\n", "client.mtu", "unknown key"),
        ('[server]\nnetwork = "10.0.0.0/8"\n', "server", "unknown key"),
    ],
)
def test_bad_client_values(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    path = _client(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_client_missing_server(tmp_path: Path) -> None:
    _key_file(tmp_path, "alice.key")
    path = _write(tmp_path, f'[client]\nserver_public_key = "{ALICE}"\n')
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert info.value.key == "client.server"
    assert "missing required key" in str(info.value)


def test_client_bad_server_key(tmp_path: Path) -> None:
    path = _client(tmp_path, "", server_key="AAAA")
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert info.value.key == "client.server_public_key"
    assert "malformed key" in str(info.value)


def test_client_key_file_mode(tmp_path: Path) -> None:
    key_path, _ = _key_file(tmp_path, "alice.key", mode=0o640)
    path = _client(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_client_config(path)
    assert info.value.key == "client.private_key_file"
    assert str(key_path) in str(info.value)


# ---------------------------------------------------------------------------
# host:port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:9621", ("0.0.0.0", 9621)),
        ("[::]:9621", ("::", 9621)),
        ("[2001:db8::1]:1", ("2001:db8::1", 1)),
        ("vpn.example.com:65535", ("vpn.example.com", 65535)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, file="f", key="k") == expected


@pytest.mark.parametrize(
    "text",
    ["", ":80", "host", "host:", "host:-1", "[::1]", "[::1]80", "1.2.3.4:١٢", "a..b:80", "-a:1"],
)
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host_port(text, file="f.toml", key="client.server")
    assert str(info.value).startswith("f.toml: client.server: ")
