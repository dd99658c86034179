"""The relays a client has learnt (issue 12, failover), kept in its state directory so
that it can start through any relay it has seen: a small JSON file written atomically
(system/journal.py's write_atomic), read at start.  A bad file or entry is skipped, never
fatal: the configured relay is always there to start from."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
from pathlib import Path

from gtun.core.client import KnownRelay
from gtun.core.tunnel import MAX_RELAYS, relay_entry
from gtun.errors import GtunError
from gtun.system.journal import read_text, write_atomic

log = logging.getLogger("gtun")

VERSION = 1


def relays_file(state_dir: Path, config_file: Path) -> Path:
    """Where the client configured by `config_file` keeps the relays it learnt."""
    return state_dir / f"relays-{config_file.stem}.json"


def save_relays(path: Path, relays: tuple[KnownRelay, ...]) -> None:
    """Raises RuntimeFailure naming the file."""
    entries = [
        {"name": r.name, "key": base64.b64encode(r.public_key).decode(), "endpoint": r.endpoint}
        for r in relays[:MAX_RELAYS]
    ]
    write_atomic(path, json.dumps({"version": VERSION, "relays": entries}, indent=1), "relays")


def load_relays(path: Path) -> list[KnownRelay]:
    """The relays kept in `path`; none when there is no file or it is unreadable (said
    once in the log).  Never raises."""
    try:
        text = read_text(path, "relays file")
    except GtunError as exc:
        log.warning("%s; starting from the configured relay only", exc)
        return []
    if text is None:
        return []
    try:
        data = json.loads(text)
    except ValueError:
        log.warning("relays file %s is not JSON; ignored", path)
        return []
    entries = data.get("relays") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        log.warning("relays file %s has no list of relays; ignored", path)
        return []
    out: list[KnownRelay] = []
    for entry in entries[:MAX_RELAYS]:
        relay = _entry(entry)
        if relay is not None:
            out.append(relay)
    return out


def _entry(entry: object) -> KnownRelay | None:
    # The push's format (tunnel.relay_entry), but a kept entry always has its name.
    if not isinstance(entry, dict) or "name" not in entry:
        return None
    return relay_entry(entry)


def udp_endpoint(text: str, family_v6: bool) -> tuple[str, int] | None:
    """A pushed "host:port" or "[v6]:port" with an IP literal, as the UDP socket of this
    family sends to; None for a host name (not resolved here) or another family."""

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if (ip.version == 6) != family_v6:
        return None
    return (str(ip), int(port))
