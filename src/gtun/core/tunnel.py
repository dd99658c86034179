"""gtun's in-tunnel protocol: what a WireGuard transport plaintext is, gtun's own messages
(configuration push and liveness), and the capabilities two gtun nodes negotiate.

One module for the relay, the client and the doctor alike.

Plaintexts.  A stock WireGuard peer carries IP packets: the first nibble of a plaintext
is the IP version (4 or 6).  gtun's own plaintexts start with 0x00, which no IP packet
does, followed by 'g' 't' and a kind byte:

    00 'g' 't' 01   a gtun message (below)
    00 'g' 't' 02   an Ethernet frame, TAP mode (l2frame.py)
    00 'g' 't' 03   a bulk frame, a whole TCP super-packet (bulk.py)

A stock peer drops any plaintext that is not IPv4 or IPv6, and the relay never sends one
of these unprompted: only a peer that asked (a gtun client) gets answers.

Messages.

    magic(4) = 00 'g' 't' 01   type(1)   length(2, big-endian)   JSON payload(length)

Types: CONFIG_REQUEST (client -> relay), CONFIG (relay -> client), REFUSED (relay ->
client, with a reason), PING (client -> relay), PONG (relay -> client), the path MTU
probe and its answer, PROBE (client -> relay) and PROBE_ACK (relay -> client), and the
relay's health, HEALTH_REQUEST (client -> relay, `{"id": n}`) and HEALTH (relay ->
client, `{"id": n, ...}`: what the relay's edge last saw of its own machine, typed
here as RelayHealth, each key absent when not known).  A probe
is `{"id": n}` (and the client's path MTU, "mtu") followed by zeros up to the size under
test, so that the datagram carrying it has exactly that size; the relay answers
`{"id": n}` padded to the probe's own length, never longer, so a probe tests both
directions of the path and cannot be used to amplify.  The payloads
of CONFIG_REQUEST and CONFIG are typed here (ConfigRequest, PushedConfig) with their JSON
keys; absent keys mean the older behaviour, so old and new nodes interoperate.

Capabilities.  What a gtun peer and the relay both do beyond plain WireGuard is decided
once, when the relay answers a configuration request, and kept per peer as one value
(Caps): bulk frames over a stream endpoint, TCP segments whose checksum the receiver
completes (partial checksums), path MTU probes the relay answers (pmtu), and the other
relays of the network pushed in the configuration (relays: a client that asks with
`"relays": true` gets `"relays": [{"name", "key", "endpoint"}, ...]`, at most
MAX_RELAYS of them, so that it can fail over; an old client never asks and an old relay
never answers, so neither sees the key), and health requests the relay answers (health:
a client that asks with `"health": true` is told `"health": true` in its CONFIG, and
only then sends HEALTH_REQUEST; an old relay never grants it, so it is never sent one,
and an old client never asks, so it is never answered).  A stock peer has NO_CAPS.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from gtun.core.errors import LocalProtocolError, RemoteProtocolError
from gtun.core.wg.crypto import is_degenerate_key

Network = IPv4Network | IPv6Network

# The magics of gtun's plaintexts (first byte 0x00: no IP version).
MAGIC = b"\x00gt\x01"  # a gtun message
FRAME_MAGIC = b"\x00gt\x02"  # an Ethernet frame (l2frame.py)
BULK_MAGIC = b"\x00gt\x03"  # a bulk frame (bulk.py)

HEADER = struct.Struct(">4sBH")
MAX_PAYLOAD = 8000  # bound on a decoded message; a config with many routes fits
MAX_MODE = 16  # a requested mode is "tun" or "tap"; anything longer is cut to this
# The relays of a network pushed to a client: at most this many (more are ignored and
# counted), each name and endpoint at most this long (else the entry is dropped).
MAX_RELAYS = 16
MAX_RELAY_NAME = 64
MAX_RELAY_ENDPOINT = 255

CONFIG_REQUEST = 1
CONFIG = 2
REFUSED = 3
PING = 4
PONG = 5
PROBE = 6
PROBE_ACK = 7
HEALTH_REQUEST = 8
HEALTH = 9
TYPES = {CONFIG_REQUEST, CONFIG, REFUSED, PING, PONG, PROBE, PROBE_ACK, HEALTH_REQUEST, HEALTH}
MAX_PROBE_ID = 2**32 - 1
MAX_HEALTH_ID = 2**32 - 1
MAX_DEVICE_NAME = 15  # IFNAMSIZ - 1: a device name in a HEALTH answer
MAX_HEALTH_ROUTES = 16  # missing routes named in a HEALTH answer (more are counted)

# What a plaintext is (classify()).
IPV4 = 4
IPV6 = 6
MESSAGE = 1
FRAME = 2
BULK = 3
OTHER = 0
_KINDS = {MAGIC: MESSAGE, FRAME_MAGIC: FRAME, BULK_MAGIC: BULK}


def classify(plaintext: bytes) -> int:
    """IPV4, IPV6, MESSAGE, FRAME, BULK or OTHER, from the first bytes alone (the parsers
    check the rest).  The per-packet paths test the IP version inline and call this only
    for plaintexts that start with 0x00."""
    if not plaintext:
        return OTHER
    version = plaintext[0] >> 4
    if version == 4 or version == 6:
        return version
    return _KINDS.get(plaintext[:4], OTHER)


class TunnelMessageError(RemoteProtocolError):
    """A peer sent a malformed gtun message."""


@dataclass(frozen=True, slots=True)
class TunnelMessage:
    type: int
    payload: dict[str, Any]


def is_tunnel_message(plaintext: bytes) -> bool:
    return plaintext[:1] == b"\x00"


def push_message(msg_type: int, payload: dict[str, Any] | None = None) -> bytes:
    """Raises LocalProtocolError when the payload is too large (caller's misuse)."""
    body = json.dumps(payload or {}, separators=(",", ":")).encode()
    if len(body) > MAX_PAYLOAD:
        raise LocalProtocolError(f"tunnel message payload of {len(body)} bytes is too large")
    return HEADER.pack(MAGIC, msg_type, len(body)) + body


def pull_message(plaintext: bytes) -> TunnelMessage:
    """Parse a message (WireGuard's zero padding after it is ignored).

    Raises TunnelMessageError."""
    if len(plaintext) < HEADER.size:
        raise TunnelMessageError("truncated header")
    magic, msg_type, length = HEADER.unpack_from(plaintext)
    if magic != MAGIC:
        raise TunnelMessageError("bad magic")
    if msg_type not in TYPES:
        raise TunnelMessageError(f"unknown type {msg_type}")
    if length > MAX_PAYLOAD or HEADER.size + length > len(plaintext):
        raise TunnelMessageError("bad length")
    try:
        payload = json.loads(plaintext[HEADER.size : HEADER.size + length])
    except (ValueError, RecursionError) as exc:
        # ValueError: not UTF-8, not JSON, or an integer of more digits than Python
        # converts; RecursionError: arrays nested deeper than the decoder goes.
        raise TunnelMessageError("payload is not JSON") from exc
    if not isinstance(payload, dict):
        raise TunnelMessageError("payload is not an object")
    return TunnelMessage(msg_type, payload)


# --- capabilities ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caps:
    """What a peer and this node both do beyond plain WireGuard, negotiated once."""

    bulk: bool = False  # takes bulk frames (bulk.py) when its endpoint is a stream
    partial: bool = False  # sends and takes TCP segments with partial checksums
    pmtu: bool = False  # the relay answers path MTU probes (PROBE -> PROBE_ACK)
    relays: bool = False  # the relay pushes the other relays of its network
    health: bool = False  # the relay answers HEALTH_REQUEST


NO_CAPS = Caps()
_CAPS_FIELDS = ("bulk", "partial", "pmtu", "relays", "health")


def caps_bits(caps: Caps) -> int:
    """`caps` as one byte (bit i: the i-th of _CAPS_FIELDS), for a relay's workers."""
    return sum(1 << i for i, name in enumerate(_CAPS_FIELDS) if getattr(caps, name))


def caps_from_bits(bits: int) -> Caps:
    """The Caps of caps_bits(); unknown bits are ignored."""
    return Caps(**{name: bool(bits >> i & 1) for i, name in enumerate(_CAPS_FIELDS)})


# --- the configuration request (client -> relay) ------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigRequest:
    """`mode` None: the client follows the relay's mode.  `bulk`: it takes bulk frames;
    `partial`: it completes TCP checksums the relay leaves partial; `pmtu`: it probes
    the path MTU (and wants its probes answered); `relays`: it fails over, and wants
    the other relays of the network in its configuration; `health`: it may ask for the
    relay's health (HEALTH_REQUEST)."""

    mode: str | None = None
    bulk: bool = False
    partial: bool = False
    pmtu: bool = False
    relays: bool = False
    health: bool = False


def push_config_request(request: ConfigRequest) -> bytes:
    payload: dict[str, Any] = {"bulk": request.bulk}
    if request.partial:
        payload["csum"] = "partial"
    if request.pmtu:
        payload["pmtu"] = True
    if request.relays:
        payload["relays"] = True
    if request.health:
        payload["health"] = True
    if request.mode is not None:
        payload["mode"] = request.mode
    return push_message(CONFIG_REQUEST, payload)


def parse_config_request(payload: dict[str, Any]) -> ConfigRequest:
    """Never raises: unknown or ill-typed keys read as "not offered".  A mode is kept
    (to be refused when it is not the relay's) but cut to MAX_MODE characters, so the
    refusal that names it always fits a message."""
    mode = payload.get("mode")
    return ConfigRequest(
        mode=mode[:MAX_MODE] if isinstance(mode, str) else None,
        bulk=payload.get("bulk") is True,
        partial=payload.get("csum") == "partial",
        pmtu=payload.get("pmtu") is True,
        relays=payload.get("relays") is True,
        health=payload.get("health") is True,
    )


def relay_caps(request: ConfigRequest, *, tap: bool, partial_ok: bool) -> Caps:
    """What the relay grants a client that asked with `request`: neither in TAP mode
    (frames are never super-packets), and partial checksums only when the relay's own
    device completes them (`partial_ok`).  Probes and health requests are answered, and
    relays pushed, in either mode."""
    if tap:
        return Caps(pmtu=request.pmtu, relays=request.relays, health=request.health)
    return Caps(
        bulk=request.bulk,
        partial=partial_ok and request.partial,
        pmtu=request.pmtu,
        relays=request.relays,
        health=request.health,
    )


# --- the other relays of the network (relay -> client, in the CONFIG) -----------------------


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """Another relay of the network, as pushed: its name, public key and endpoint as
    text ("host:port", "[v6]:port"; the client's edge resolves it)."""

    name: str
    public_key: bytes
    endpoint: str


def endpoint_str(endpoint: Hashable | None) -> str | None:
    """An endpoint as the push carries it: a (host, port) pair as "host:port" (IPv6
    bracketed), a string as it is; None for anything else (not pushed)."""
    if isinstance(endpoint, str):
        return endpoint
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host, port = endpoint[0], endpoint[1]
        if isinstance(host, str) and type(port) is int:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return None


def push_relays(relays: tuple[RelayInfo, ...]) -> list[dict[str, str]]:
    return [
        {"name": r.name, "key": base64.b64encode(r.public_key).decode(), "endpoint": r.endpoint}
        for r in relays[:MAX_RELAYS]
    ]


def pull_relays(value: object) -> tuple[tuple[RelayInfo, ...], int]:
    """The valid relays of a pushed "relays" value and how many entries were dropped:
    not an object, a name or endpoint that is no string or too long, a key that is not
    32 bytes of base64 or is of low order, a key given twice, or past MAX_RELAYS.
    Never raises."""
    if not isinstance(value, list):
        return (), 1
    relays: list[RelayInfo] = []
    seen: set[bytes] = set()
    dropped = max(0, len(value) - MAX_RELAYS)
    for entry in value[:MAX_RELAYS]:
        info = relay_entry(entry)
        if info is None or info.public_key in seen:
            dropped += 1
            continue
        seen.add(info.public_key)
        relays.append(info)
    return tuple(relays), dropped


def relay_entry(entry: object) -> RelayInfo | None:
    """One relay as pushed (and as a client keeps it: app/relays.py): a JSON object with
    its name, base64 key and endpoint; None for anything else (a bad or low-order key,
    a name or endpoint out of bounds)."""
    if not isinstance(entry, dict):
        return None
    name, key, endpoint = entry.get("name", ""), entry.get("key"), entry.get("endpoint")
    if not isinstance(name, str) or len(name) > MAX_RELAY_NAME:
        return None
    if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_RELAY_ENDPOINT:
        return None
    if not isinstance(key, str) or len(key) != 44:
        return None
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32 or is_degenerate_key(raw):
        return None
    return RelayInfo(name, raw, endpoint)


# --- the configuration push (relay -> client) ---------------------------------------------


@dataclass(frozen=True)
class PushedConfig:
    name: str
    address: IPv4Address
    prefix: int
    gateway: IPv4Address
    routes: tuple[Network, ...]
    mtu: int
    dns: tuple[IPv4Address | IPv6Address, ...]
    mode: str
    # IPv6 inside the tunnel: all three or none (the relay has no network6).
    address6: IPv6Address | None = None
    prefix6: int | None = None
    gateway6: IPv6Address | None = None
    bulk: bool = False  # the relay takes bulk frames (bulk.py) over TCP
    partial: bool = False  # the relay takes TCP segments with partial checksums
    network: IPv4Network | None = None  # informational: the virtual network
    pmtu: bool = False  # the relay answers path MTU probes
    # The other relays of the network (only to a client that asked: Caps.relays).  Not
    # compared: the same configuration from another relay lists other relays, and the
    # device need not be configured again for that.  `relays_pushed`: whether the key
    # was there at all; `relays_dropped`: entries that were not valid.
    relays: tuple[RelayInfo, ...] = field(default=(), compare=False)
    relays_pushed: bool = field(default=False, compare=False)
    relays_dropped: int = field(default=0, compare=False)
    health: bool = False  # the relay answers HEALTH_REQUEST

    @property
    def caps(self) -> Caps:
        """The capabilities the relay granted (the client ANDs in its own)."""
        return Caps(
            bulk=self.bulk,
            partial=self.partial,
            pmtu=self.pmtu,
            relays=self.relays_pushed,
            health=self.health,
        )


def push_config(config: PushedConfig) -> bytes:
    """The CONFIG message.  Raises LocalProtocolError when it does not fit a message
    (hundreds of routes)."""
    ipv6: dict[str, Any] = {}
    if config.address6 is not None:
        # Absent keys mean "no IPv6": older clients ignore these, newer ones talking to
        # an older relay find none.
        ipv6 = {
            "address6": str(config.address6),
            "prefix6": config.prefix6,
            "gateway6": str(config.gateway6),
        }
    payload = {
        "name": config.name,
        "address": str(config.address),
        "prefix": config.prefix,
        **({"network": str(config.network)} if config.network is not None else {}),
        "gateway": str(config.gateway),
        "routes": [str(r) for r in config.routes],
        "mtu": config.mtu,
        "dns": [str(d) for d in config.dns],
        "mode": config.mode,
        "bulk": config.bulk,
        "csum": "partial" if config.partial else "full",
        **({"pmtu": True} if config.pmtu else {}),
        **({"health": True} if config.health else {}),
        **({"relays": push_relays(config.relays)} if config.relays_pushed else {}),
        **ipv6,
    }
    return push_message(CONFIG, payload)


def parse_pushed_config(payload: dict[str, Any]) -> PushedConfig:
    """Validate a CONFIG payload from the relay: every value of the type and range
    push_config writes.  Raises TunnelMessageError (a RemoteProtocolError, and so a
    ValueError), and nothing else, for any payload."""
    try:
        address = IPv4Address(_text(payload["address"]))
        prefix = _int(payload["prefix"], 1, 32, "prefix")
        routes = tuple(ipaddress.ip_network(_text(r)) for r in _list(payload, "routes"))
        dns = tuple(ipaddress.ip_address(_text(d)) for d in _list(payload, "dns"))
        mtu = _int(payload["mtu"], 576, 9000, "mtu")
        gateway = IPv4Address(_text(payload["gateway"]))
        name = _text(payload.get("name", ""))
        mode = _text(payload.get("mode", "tun"))
        if mode not in ("tun", "tap"):
            raise TunnelMessageError(f"bad mode {mode!r}")
        network = IPv4Network(_text(payload["network"])) if "network" in payload else None
        address6: IPv6Address | None = None
        prefix6: int | None = None
        gateway6: IPv6Address | None = None
        if "address6" in payload:
            address6 = IPv6Address(_text(payload["address6"]))
            prefix6 = _int(payload["prefix6"], 1, 128, "prefix6")
            gateway6 = IPv6Address(_text(payload["gateway6"]))
        pushed = "relays" in payload
        relays, dropped = pull_relays(payload["relays"]) if pushed else ((), 0)
    except TunnelMessageError:
        raise
    except KeyError as exc:
        raise TunnelMessageError(f"incomplete configuration: no {exc}") from exc
    except ValueError as exc:  # ipaddress says what is wrong
        raise TunnelMessageError(str(exc)) from exc
    return PushedConfig(
        name,
        address,
        prefix,
        gateway,
        routes,
        mtu,
        dns,
        mode,
        address6,
        prefix6,
        gateway6,
        bulk=payload.get("bulk") is True,
        partial=payload.get("csum") == "partial",
        network=network,
        pmtu=payload.get("pmtu") is True,
        relays=relays,
        relays_pushed=pushed,
        relays_dropped=dropped,
        health=payload.get("health") is True,
    )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TunnelMessageError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object, low: int, high: int, key: str) -> int:
    """An integer in [low, high]: no bool, float (Infinity, NaN, 1.5) or string."""
    if type(value) is not int or not low <= value <= high:
        raise TunnelMessageError(f"bad {key}: expected an integer from {low} to {high}")
    return value


def _list(payload: dict[str, Any], key: str) -> list[Any]:
    value = payload.get(key, [])
    if not isinstance(value, list):
        raise TunnelMessageError(f"bad {key}: expected a list, got {type(value).__name__}")
    return value


# --- path MTU probes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """A PROBE or PROBE_ACK: `id` pairs them; `mtu` is the client's path MTU (a PROBE's,
    informational, None when absent); `size` the plaintext's whole length, padding
    included (the size the path carried)."""

    id: int
    size: int
    mtu: int | None = None


def push_probe(msg_type: int, probe_id: int, size: int, mtu: int | None = None) -> bytes:
    """A PROBE or PROBE_ACK padded with zeros to `size` bytes (a probe too large for its
    header is left at its natural length).  Raises LocalProtocolError for an id out of
    range."""
    if not 0 <= probe_id <= MAX_PROBE_ID:
        raise LocalProtocolError(f"probe id {probe_id} out of range")
    payload: dict[str, Any] = {"id": probe_id}
    if mtu is not None:
        payload["mtu"] = mtu
    msg = push_message(msg_type, payload)
    return msg + bytes(size - len(msg)) if size > len(msg) else msg


def parse_probe(msg: TunnelMessage, size: int) -> Probe:
    """The probe in a pulled PROBE or PROBE_ACK of `size` bytes in all.  Raises
    TunnelMessageError for a missing or ill-typed id or mtu."""
    probe_id = msg.payload.get("id")
    if type(probe_id) is not int or not 0 <= probe_id <= MAX_PROBE_ID:
        raise TunnelMessageError("probe without a valid id")
    mtu = msg.payload.get("mtu")
    if mtu is not None:
        mtu = _int(mtu, 576, 9000, "mtu")
    return Probe(probe_id, size, mtu)


# --- the relay's health (HEALTH_REQUEST -> HEALTH) ---------------------------------------

# A device name as a HEALTH answer may carry it: what a fix line can name safely.
_DEVICE_NAME = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_DEVICE_NAME}}}")
MAX_HEALTH_AGE = 86400.0  # an age beyond a day is not believed (read as unknown)


@dataclass(frozen=True, slots=True)
class RelayHealth:
    """What a relay's edge last saw of its own machine, as the relay answers a HEALTH_
    REQUEST.  None: not known (not looked at yet, unreadable) or not applicable
    (`forwarding6` without network6, `nat` with nat = false, `store` without a shared
    store).  `age`: seconds between that look and the answer."""

    device: str | None = None  # the relay's device, for the fixes to name
    forwarding: bool | None = None  # net.ipv4.ip_forward
    dev_forwarding: bool | None = None  # net.ipv4.conf.<device>.forwarding
    forwarding6: bool | None = None  # net.ipv6.conf.all.forwarding (network6 only)
    nat: bool | None = None  # its masquerade table is there (nat = true only)
    device_up: bool | None = None  # the device exists and is up
    missing_routes: tuple[Network, ...] = ()  # routes it made into its device, gone since
    store: bool | None = None  # the shared store answers (a shared store only)
    age: float | None = None

    @property
    def known(self) -> bool:
        """Whether the relay had looked at itself at all."""
        return any(
            v is not None
            for v in (
                self.forwarding,
                self.dev_forwarding,
                self.forwarding6,
                self.nat,
                self.device_up,
                self.store,
            )
        )


_HEALTH_FLAGS = ("forwarding", "dev_forwarding", "forwarding6", "nat", "device_up", "store")


def health_payload(health: RelayHealth) -> dict[str, Any]:
    """A RelayHealth as JSON (a HEALTH's payload without its id, and the client's control
    answer): unknown facts left out, at most MAX_HEALTH_ROUTES routes."""
    payload: dict[str, Any] = {}
    if health.device is not None:
        payload["device"] = health.device
    for name in _HEALTH_FLAGS:
        value = getattr(health, name)
        if value is not None:
            payload[name] = value
    if health.missing_routes:
        payload["missing_routes"] = [str(r) for r in health.missing_routes[:MAX_HEALTH_ROUTES]]
    if health.age is not None:
        payload["age"] = round(max(0.0, health.age), 1)
    return payload


def pull_health(payload: dict[str, Any]) -> RelayHealth:
    """The RelayHealth in a HEALTH payload (or a control answer).  Never raises: a key
    that is absent or ill-typed reads as unknown; a device name that a fix could not
    name safely, and routes that do not parse or pass MAX_HEALTH_ROUTES, are left out."""
    flags: dict[str, bool | None] = {}
    for name in _HEALTH_FLAGS:
        value = payload.get(name)
        flags[name] = value if isinstance(value, bool) else None
    device = payload.get("device")
    if not isinstance(device, str) or not _DEVICE_NAME.fullmatch(device):
        device = None
    routes: list[Network] = []
    value = payload.get("missing_routes")
    if isinstance(value, list):
        for text in value[:MAX_HEALTH_ROUTES]:
            if isinstance(text, str) and len(text) <= 64:
                try:
                    routes.append(ipaddress.ip_network(text))
                except ValueError:
                    continue
    age = _health_age(payload.get("age"))
    return RelayHealth(device=device, missing_routes=tuple(routes), age=age, **flags)


def _health_age(value: object) -> float | None:
    """A number of seconds from 0 to MAX_HEALTH_AGE (no bool, NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0.0 <= value <= MAX_HEALTH_AGE else None


def push_health_request(health_id: int) -> bytes:
    """Raises LocalProtocolError for an id out of range."""
    if not 0 <= health_id <= MAX_HEALTH_ID:
        raise LocalProtocolError(f"health request id {health_id} out of range")
    return push_message(HEALTH_REQUEST, {"id": health_id})


def push_health(health_id: int, health: RelayHealth) -> bytes:
    """The HEALTH answer to request `health_id`.  Raises LocalProtocolError for an id
    out of range."""
    if not 0 <= health_id <= MAX_HEALTH_ID:
        raise LocalProtocolError(f"health request id {health_id} out of range")
    return push_message(HEALTH, {"id": health_id, **health_payload(health)})


def health_id(msg: TunnelMessage) -> int:
    """The id of a pulled HEALTH_REQUEST or HEALTH.  Raises TunnelMessageError."""
    value = msg.payload.get("id")
    if type(value) is not int or not 0 <= value <= MAX_HEALTH_ID:
        raise TunnelMessageError("health message without a valid id")
    return value
