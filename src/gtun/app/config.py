"""Relay and client configuration files (TOML), checked in full before anything runs.

Every problem is a ConfigError naming the file, the dotted key (`server.network`,
`peers[1].address`; peers are counted from 0 in the order they appear) and what is wrong,
so the CLI can print one line and exit 2.  The keys are those of /work/shared/CONTRACT.md.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

from gtun.app.keys import decode_key, public_key, read_private_key_file
from gtun.core.wg.crypto import is_degenerate_key
from gtun.errors import ConfigError
from gtun.system.ipv6 import fits

__all__ = [
    "ClientConfig",
    "PeerConfig",
    "ServerConfig",
    "load_client_config",
    "load_server_config",
    "parse_host_port",
]

DEFAULT_PORT = 9621
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
DEFAULT_DEVICE = "gtun0"
DEFAULT_MTU = 1420
MIN_MTU = 576  # the least every IPv4 host must accept (RFC 791)
MAX_MTU = 9000  # jumbo frames; beyond that no real link carries the datagrams
MAX_PREFIX_V4 = 30  # a /30 leaves the relay and one client
MAX_PREFIX_V6 = 126
DEFAULT_STATE_DIR = "/var/lib/gtun"
DEFAULT_SERVER_SOCKET = "/run/gtun/server.sock"
DEFAULT_CLIENT_SOCKET = "/run/gtun/client.sock"
MODES = ("tun", "tap")
MAX_RELAY_WORKERS = 64  # processes of one relay (`workers`)
TRANSPORTS = ("udp", "tcp", "auto")

_SERVER_KEYS = (
    "listen",
    "private_key_file",
    "network",
    "device",
    "mode",
    "mtu",
    "routes",
    "nat",
    "dns",
    "network6",
    "metrics_listen",
    "state_dir",
    "control_socket",
    "endpoint",
    "offload",
    "store",
    "uapi",
    "workers",
    "console_listen",
    "console_tls_cert",
    "console_tls_key",
    "console_insecure",
)
_PEER_KEYS = ("name", "public_key", "address", "subnets", "preshared_key_file")
_CLIENT_KEYS = (
    "server",
    "server_public_key",
    "private_key_file",
    "transport",
    "device",
    "control_socket",
    "default_route",
    "metrics_listen",
    "mode",
    "state_dir",
    "offload",
    "pmtu",
    "pmtu_raise_interval",
    "udp_probe_interval",
    "uapi",
    "preshared_key_file",
)
PMTU_RAISE_RANGE = (1, 86400)  # seconds between attempts to raise a lowered path MTU
UDP_PROBE_RANGE = (1, 86400)  # transport "auto" on TCP: seconds between tries of UDP

IFNAMSIZ = 16  # Linux <net/if.h>, including the terminating NUL
_PEER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")

IPNetwork = IPv4Network | IPv6Network
IPAddr = IPv4Address | IPv6Address


@dataclass(frozen=True)
class PeerConfig:
    """One `[[peers]]` entry of the relay's configuration."""

    name: str
    public_key: bytes
    address: IPv4Address | None = None
    subnets: tuple[IPNetwork, ...] = ()
    preshared_key: bytes | None = None  # from preshared_key_file (mode 0600)


@dataclass(frozen=True)
class ServerConfig:
    """The relay's configuration (`gtun server -c FILE`)."""

    path: Path
    listen: tuple[str, int]
    private_key: bytes
    private_key_file: Path
    network: IPv4Network
    device: str
    mode: str
    mtu: int
    routes: tuple[IPNetwork, ...]
    nat: bool
    dns: tuple[IPAddr, ...]
    network6: IPv6Network | None
    metrics_listen: tuple[str, int] | None
    state_dir: Path
    control_socket: Path
    endpoint: tuple[str, int] | None
    peers: tuple[PeerConfig, ...]
    offload: bool = True  # TUN segmentation offloads (tun.py); false: one packet per read
    store: str | None = None  # a postgresql:// URI: state shared by several relays
    uapi: bool = True  # answer `wg show` on /var/run/wireguard/DEVICE.sock (app/uapi.py)
    workers: int | None = None  # processes sharing the port (app/workers.py); None: one per core
    console_listen: tuple[str, int] | None = None  # the web console (app/console/); None: off
    console_tls_cert: Path | None = None  # PEM certificate chain: the console serves HTTPS
    console_tls_key: Path | None = None  # its PEM private key (both or neither)
    console_insecure: bool = False  # true: plain HTTP on a non-loopback console_listen

    @property
    def relay_address(self) -> IPv4Address:
        """The relay's own address inside `network`: its first host."""
        return self.network.network_address + 1

    @property
    def relay_address6(self) -> IPv6Address | None:
        """The relay's own IPv6 address: the first host of `network6`, if set."""
        return None if self.network6 is None else self.network6.network_address + 1

    @property
    def public_key(self) -> bytes:
        """The relay's public key."""
        return public_key(self.private_key)


@dataclass(frozen=True)
class ClientConfig:
    """A client's configuration (`gtun client -c FILE`)."""

    path: Path
    server: tuple[str, int]
    server_public_key: bytes
    private_key: bytes
    private_key_file: Path
    transport: str
    device: str
    control_socket: Path
    default_route: bool
    metrics_listen: tuple[str, int] | None
    mode: str | None = None  # None: follow the relay's mode
    # Where a full-tunnel client records what it changed, to undo it after a crash.
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    offload: bool = True  # TUN segmentation offloads (tun.py); false: one packet per read
    pmtu: bool = True  # probe the path MTU over UDP (core/client.py), lower and raise it
    pmtu_raise_interval: int = 60  # seconds between attempts to raise a lowered MTU
    udp_probe_interval: int = 30  # "auto" on TCP: seconds between tries of UDP (doubling)
    uapi: bool = True  # answer `wg show` on /var/run/wireguard/DEVICE.sock (app/uapi.py)
    preshared_key: bytes | None = None  # from preshared_key_file (mode 0600)

    @property
    def public_key(self) -> bytes:
        """This client's public key."""
        return public_key(self.private_key)


# ---------------------------------------------------------------------------
# Values


def parse_host_port(
    text: str, *, file: str | Path | None, key: str | None, require_ip: bool = False
) -> tuple[str, int]:
    """Parse "host:port" ("[v6addr]:port" for IPv6) into (host, port); brackets removed.

    The host may be a DNS name unless `require_ip`.  Raises ConfigError naming `file`
    and `key` when the text is not of that form or the port is not in 1..65535.
    """

    def fail(message: str) -> ConfigError:
        return ConfigError(message, file=file, key=key)

    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise fail(f"{text!r} is not [address]:port")
        try:
            IPv6Address(host)
        except ValueError:
            raise fail(f"{host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise fail(f"{text!r} has no port; write host:port, e.g. 203.0.113.5:{DEFAULT_PORT}")
        if ":" in host:
            raise fail(f"write an IPv6 address in brackets, as [{host}]:{port_text}")
        if not host:
            raise fail(f"{text!r} has no host; write host:port, e.g. 0.0.0.0:{DEFAULT_PORT}")
        if _is_ip(host):
            pass
        elif require_ip:
            raise fail(f"{host!r} is not an IP address")
        elif not _is_hostname(host):
            raise fail(f"{host!r} is neither an IP address nor a host name")
    if not port_text.isascii() or not port_text.isdigit():
        raise fail(f"port {port_text!r} in {text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise fail(f"port {port} in {text!r} is not in 1..65535")
    return host, port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    # An all-numeric last label is a mistyped IPv4 address, not a name.
    if labels[-1].isdigit():
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in labels)


def _check_ifname(text: str, fail: Callable[[str], ConfigError]) -> str:
    # The rules of the kernel's dev_valid_name().
    if not 1 <= len(text) < IFNAMSIZ:
        raise fail(f"device name {text!r} must be 1 to {IFNAMSIZ - 1} characters long")
    if text in (".", "..") or any(c == "/" or c == ":" or c.isspace() for c in text):
        raise fail(f"device name {text!r} is not a valid interface name")
    return text


def _parse_network(text: str, fail: Callable[[str], ConfigError]) -> IPNetwork:
    if "/" not in text:
        raise fail(f"{text!r} is not a network; write address/prefix, e.g. 10.66.0.0/24")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise fail(f"{text!r} is not a valid network (address/prefix)") from None
    raise fail(f"{text!r} has host bits set; did you mean {loose}?")


def _parse_address(text: str, fail: Callable[[str], ConfigError]) -> IPAddr:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise fail(f"{text!r} is not an IP address") from None


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


# ---------------------------------------------------------------------------
# Tables

_T = TypeVar("_T")


class _Table:
    """Typed access to one TOML table whose keys must all be among `known`."""

    def __init__(
        self, data: dict[str, Any], *, file: Path, prefix: str, known: tuple[str, ...]
    ) -> None:
        self.data = data
        self.file = file
        self.prefix = prefix
        # Checked first, so that a misspelt key is reported as such rather than as the
        # required key it was meant to be being missing.
        for name in data:
            if name not in known:
                message = f"unknown key {name!r}"
                close = difflib.get_close_matches(name, known, n=1)
                if close:
                    message += f"; did you mean {close[0]!r}?"
                raise self.error(name, message)

    def dotted(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, key=self.dotted(name))

    def failer(self, name: str) -> Callable[[str], ConfigError]:
        return lambda message: self.error(name, message)

    def _get(self, name: str, kind: type[_T], expected: str, required: bool) -> _T | None:
        if name not in self.data:
            if required:
                raise self.error(name, "missing required key")
            return None
        value = self.data[name]
        # bool is an int to Python but not to TOML: `mtu = true` is a mistake.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"expected {expected}, got {_toml_type(value)}")
        return value

    def optional_str(self, name: str) -> str | None:
        return self._get(name, str, "a string", False)

    def get_str(self, name: str, default: str) -> str:
        value = self._get(name, str, "a string", False)
        return default if value is None else value

    def required_str(self, name: str) -> str:
        value = self._get(name, str, "a string", True)
        assert value is not None
        return value

    def get_bool(self, name: str, default: bool) -> bool:
        value = self._get(name, bool, "a boolean (true or false)", False)
        return default if value is None else value

    def optional_int(self, name: str) -> int | None:
        return self._get(name, int, "an integer", False)

    def get_int(self, name: str, default: int) -> int:
        value = self._get(name, int, "an integer", False)
        return default if value is None else value

    def str_list(self, name: str) -> list[str]:
        value = self._get(name, list, "an array of strings", False)
        if value is None:
            return []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(
                    name, f"expected an array of strings, item {i} is {_toml_type(item)}"
                )
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get_str(name, default)
        if value not in choices:
            options = ", ".join(f'"{c}"' for c in choices)
            raise self.error(name, f"{value!r} is not one of {options}")
        return value

    def path(self, name: str, default: str | None = None) -> Path:
        """A path; a relative one is taken relative to the config file's directory."""
        value = self.required_str(name) if default is None else self.get_str(name, default)
        if not value.strip():
            raise self.error(name, "expected a path, got an empty string")
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # "~name" of a user this system does not know
            user = value.split("/", 1)[0]
            raise self.error(name, f"{user!r}: no such user's home directory") from None
        if not path.is_absolute():
            path = Path(os.path.abspath(self.file)).parent / path
        return path

    def host_port(self, name: str, *, require_ip: bool) -> tuple[str, int] | None:
        value = self.optional_str(name)
        if value is None:
            return None
        return parse_host_port(value, file=self.file, key=self.dotted(name), require_ip=require_ip)

    def device(self) -> str:
        return _check_ifname(self.get_str("device", DEFAULT_DEVICE), self.failer("device"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file does not exist", file=path) from None
    except PermissionError:
        raise ConfigError("config file is not readable (permission denied)", file=path) from None
    except IsADirectoryError:
        raise ConfigError("config file is a directory", file=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("config file is not UTF-8 text", file=path, line=bad_line) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line: int | None = None
        match = _TOML_POSITION.search(message)
        if match:
            line = int(match.group(1))
            message = f"{message[: match.start()]} (column {match.group(2)})"
        raise ConfigError(f"TOML syntax error: {message}", file=path, line=line) from None


def _section(doc: _Table, name: str, known: tuple[str, ...]) -> _Table:
    if name not in doc.data:
        raise ConfigError(f"missing required section [{name}]", file=doc.file, key=name)
    value = doc.data[name]
    if not isinstance(value, dict):
        raise ConfigError(
            f"expected a table [{name}], got {_toml_type(value)}", file=doc.file, key=name
        )
    return _Table(value, file=doc.file, prefix=name, known=known)


def _private_key(table: _Table) -> tuple[Path, bytes]:
    path = table.path("private_key_file")
    key = read_private_key_file(path, config_file=table.file, key=table.dotted("private_key_file"))
    return path, key


def _preshared_key(table: _Table) -> bytes | None:
    """The key in the table's `preshared_key_file`, if it names one: WireGuard's PSK,
    as `wg genpsk` or `gtun genpsk` writes it; the file must be mode 0600."""
    if "preshared_key_file" not in table.data:
        return None
    return read_private_key_file(
        table.path("preshared_key_file"),
        config_file=table.file,
        key=table.dotted("preshared_key_file"),
        make="gtun genpsk",
    )


def _public_key(table: _Table, name: str) -> bytes:
    """A peer's (or the relay's) public key; a low-order point is refused here, since
    every DH with it is all zeros: no one holds its private key and the WireGuard core
    would refuse to add it (LocalProtocolError)."""
    text = table.required_str(name)
    key = decode_key(text, file=table.file, key=table.dotted(name))
    if is_degenerate_key(key):
        raise table.error(
            name,
            f"{text.strip()} is a low-order Curve25519 point (its Diffie-Hellman result is "
            "all zeros), not a usable public key",
        )
    return key


# ---------------------------------------------------------------------------
# The relay


def load_server_config(path: str | Path) -> ServerConfig:
    """Read and check the relay's configuration file, loading its private key.

    Raises ConfigError naming the file, the key and what is wrong.
    """
    path = Path(path)
    doc = _Table(_read_toml(path), file=path, prefix="", known=("server", "peers"))
    s = _section(doc, "server", _SERVER_KEYS)

    listen = s.host_port("listen", require_ip=True) or parse_host_port(
        DEFAULT_LISTEN, file=path, key="server.listen"
    )
    key_path, private = _private_key(s)

    network = _parse_network(s.required_str("network"), s.failer("network"))
    if not isinstance(network, IPv4Network):
        raise s.error("network", f"{network} is not an IPv4 network (use network6 for IPv6)")
    if network.prefixlen > MAX_PREFIX_V4:
        raise s.error(
            "network", f"{network} is too small; the prefix must be /{MAX_PREFIX_V4} or shorter"
        )

    device = s.device()
    mode = s.choice("mode", MODES, "tun")
    mtu = s.get_int("mtu", DEFAULT_MTU)
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise s.error("mtu", f"{mtu} is not in {MIN_MTU}..{MAX_MTU}")

    routes = tuple(_parse_network(r, s.failer("routes")) for r in s.str_list("routes"))
    nat = s.get_bool("nat", False)
    dns = tuple(_parse_address(a, s.failer("dns")) for a in s.str_list("dns"))

    network6: IPv6Network | None = None
    text6 = s.optional_str("network6")
    if text6 is not None:
        parsed6 = _parse_network(text6, s.failer("network6"))
        if not isinstance(parsed6, IPv6Network):
            raise s.error("network6", f"{parsed6} is not an IPv6 network")
        if parsed6.prefixlen > MAX_PREFIX_V6:
            raise s.error(
                "network6",
                f"{parsed6} is too small; the prefix must be /{MAX_PREFIX_V6} or shorter",
            )
        if not fits(network, parsed6):
            # Each peer's IPv6 address has the host number of its IPv4 one (ipv6.py).
            raise s.error(
                "network6",
                f"{parsed6} has fewer addresses than network {network}; "
                f"use a prefix of /{128 - (32 - network.prefixlen)} or shorter",
            )
        network6 = parsed6

    metrics_listen = s.host_port("metrics_listen", require_ip=True)
    state_dir = s.path("state_dir", DEFAULT_STATE_DIR)
    control_socket = s.path("control_socket", DEFAULT_SERVER_SOCKET)
    endpoint = s.host_port("endpoint", require_ip=False)
    offload = s.get_bool("offload", True)
    uapi = s.get_bool("uapi", True)
    workers = s.optional_int("workers")
    if workers is not None and not 1 <= workers <= MAX_RELAY_WORKERS:
        raise s.error(
            "workers",
            f"{workers} is out of range: 1 to {MAX_RELAY_WORKERS} processes "
            "(leave it out for one per core)",
        )
    store = s.optional_str("store")
    if store is not None and not store.startswith(("postgresql://", "postgres://")):
        raise s.error(
            "store",
            f"{store!r} is not a PostgreSQL URI (postgresql://user@host/database); "
            "leave it out to keep the state in SQLite under state_dir",
        )

    console_listen, console_tls, console_insecure = _console(s)
    peers = _load_peers(doc, network, public_key(private), network6=network6)

    return ServerConfig(
        path=path,
        listen=listen,
        private_key=private,
        private_key_file=key_path,
        network=network,
        device=device,
        mode=mode,
        mtu=mtu,
        routes=routes,
        nat=nat,
        dns=dns,
        network6=network6,
        metrics_listen=metrics_listen,
        state_dir=state_dir,
        control_socket=control_socket,
        endpoint=endpoint,
        peers=peers,
        offload=offload,
        store=store,
        uapi=uapi,
        workers=workers,
        console_listen=console_listen,
        console_tls_cert=console_tls[0] if console_tls else None,
        console_tls_key=console_tls[1] if console_tls else None,
        console_insecure=console_insecure,
    )


def _console(s: _Table) -> tuple[tuple[str, int] | None, tuple[Path, Path] | None, bool]:
    """The web console's keys: where it listens, its TLS files (both or neither), and
    whether plain HTTP may leave the machine.  A non-loopback address without TLS is
    refused unless `console_insecure` says so: the password and the session cookie
    would cross the network in clear."""
    listen = s.host_port("console_listen", require_ip=True)
    cert = s.path("console_tls_cert") if "console_tls_cert" in s.data else None
    key = s.path("console_tls_key") if "console_tls_key" in s.data else None
    if (cert is None) != (key is None):
        missing = "console_tls_key" if key is None else "console_tls_cert"
        raise s.error(missing, "console_tls_cert and console_tls_key go together; set both")
    insecure = s.get_bool("console_insecure", False)
    local = listen is None or ipaddress.ip_address(listen[0]).is_loopback
    if not local and cert is None and not insecure:
        assert listen is not None
        raise s.error(
            "console_listen",
            f"{listen[0]} is not a loopback address and the console has no TLS: set "
            "console_tls_cert and console_tls_key, or console_insecure = true to serve "
            "plain HTTP anyway (or listen on 127.0.0.1 and use an SSH tunnel)",
        )
    return listen, (cert, key) if cert is not None and key is not None else None, insecure


def _load_peers(
    doc: _Table, network: IPv4Network, own_key: bytes, *, network6: IPv6Network | None = None
) -> tuple[PeerConfig, ...]:
    entries = doc.data.get("peers", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(
            "expected [[peers]] tables (an array of tables)", file=doc.file, key="peers"
        )

    relay = network.network_address + 1
    names: dict[str, int] = {}
    keys: dict[bytes, int] = {}
    addresses: dict[IPv4Address, int] = {}
    subnets_seen: dict[IPNetwork, int] = {}
    peers = []
    for i, entry in enumerate(entries):
        p = _Table(entry, file=doc.file, prefix=f"peers[{i}]", known=_PEER_KEYS)

        name = p.required_str("name")
        if not _PEER_NAME.fullmatch(name):
            raise p.error("name", f"{name!r} is not a valid name (1 to 32 of A-Z a-z 0-9 _ . -)")
        if name in names:
            raise p.error("name", f"duplicate name {name!r} (also peers[{names[name]}])")
        names[name] = i

        key = _public_key(p, "public_key")
        if key == own_key:
            raise p.error("public_key", "this is the relay's own public key")
        if key in keys:
            raise p.error("public_key", f"duplicate public key (also peers[{keys[key]}])")
        keys[key] = i

        address: IPv4Address | None = None
        text = p.optional_str("address")
        if text is not None:
            parsed = _parse_address(text, p.failer("address"))
            if not isinstance(parsed, IPv4Address):
                raise p.error("address", f"address {parsed} is not an IPv4 address")
            if parsed not in network:
                raise p.error("address", f"address {parsed} is outside network {network}")
            if parsed == network.network_address:
                raise p.error("address", f"address {parsed} is the network address of {network}")
            if parsed == network.broadcast_address:
                raise p.error("address", f"address {parsed} is the broadcast address of {network}")
            if parsed == relay:
                raise p.error("address", f"address {parsed} is the relay's own address")
            if parsed in addresses:
                raise p.error(
                    "address", f"address {parsed} is also given to peers[{addresses[parsed]}]"
                )
            addresses[parsed] = i
            address = parsed

        subnets = []
        for item in p.str_list("subnets"):
            subnet = _parse_network(item, p.failer("subnets"))
            if subnet.overlaps(network):
                raise p.error("subnets", f"subnet {subnet} overlaps the virtual network {network}")
            if network6 is not None and subnet.overlaps(network6):
                raise p.error(
                    "subnets", f"subnet {subnet} overlaps the virtual network6 {network6}"
                )
            if subnet in subnets_seen:
                raise p.error(
                    "subnets", f"subnet {subnet} is also routed to peers[{subnets_seen[subnet]}]"
                )
            subnets_seen[subnet] = i
            subnets.append(subnet)

        peers.append(
            PeerConfig(
                name=name,
                public_key=key,
                address=address,
                subnets=tuple(subnets),
                preshared_key=_preshared_key(p),
            )
        )
    return tuple(peers)


# ---------------------------------------------------------------------------
# A client


def load_client_config(path: str | Path) -> ClientConfig:
    """Read and check a client's configuration file, loading its private key.

    Raises ConfigError naming the file, the key and what is wrong.
    """
    path = Path(path)
    doc = _Table(_read_toml(path), file=path, prefix="", known=("client",))
    c = _section(doc, "client", _CLIENT_KEYS)

    server = parse_host_port(c.required_str("server"), file=path, key="client.server")
    server_key = _public_key(c, "server_public_key")
    key_path, private = _private_key(c)
    if server_key == public_key(private):
        raise c.error("server_public_key", "this is the client's own public key")
    transport = c.choice("transport", TRANSPORTS, "udp")
    device = c.device()
    control_socket = c.path("control_socket", DEFAULT_CLIENT_SOCKET)
    default_route = c.get_bool("default_route", False)
    metrics_listen = c.host_port("metrics_listen", require_ip=True)
    mode = c.choice("mode", MODES, "") if c.optional_str("mode") is not None else None
    state_dir = c.path("state_dir", DEFAULT_STATE_DIR)
    offload = c.get_bool("offload", True)
    pmtu = c.get_bool("pmtu", True)
    uapi = c.get_bool("uapi", True)
    raise_interval = c.get_int("pmtu_raise_interval", 60)
    low, high = PMTU_RAISE_RANGE
    if not low <= raise_interval <= high:
        raise c.error("pmtu_raise_interval", f"{raise_interval} is not in {low}..{high} seconds")
    probe_interval = c.get_int("udp_probe_interval", 30)
    low, high = UDP_PROBE_RANGE
    if not low <= probe_interval <= high:
        raise c.error("udp_probe_interval", f"{probe_interval} is not in {low}..{high} seconds")
    psk = _preshared_key(c)

    return ClientConfig(
        path=path,
        server=server,
        server_public_key=server_key,
        private_key=private,
        private_key_file=key_path,
        transport=transport,
        device=device,
        control_socket=control_socket,
        default_route=default_route,
        metrics_listen=metrics_listen,
        mode=mode,
        state_dir=state_dir,
        offload=offload,
        pmtu=pmtu,
        pmtu_raise_interval=raise_interval,
        udp_probe_interval=probe_interval,
        uapi=uapi,
        preshared_key=psk,
    )
