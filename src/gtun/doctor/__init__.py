"""`gtun doctor`: check a relay or a client, the machine and the path, and explain.

Shape: the facts are gathered by a `System` (the real one, probes.LiveSystem, runs `ip`,
`nft`, `ping`, reads /proc and /sys, asks the control socket and probes the relay with
handshake.py); every check is a small pure function from facts to a `Result` (checks.py),
so the tests give each check its facts directly.  The whole run is bounded: every probe
has its own timeout (the handshake probe 3 s over UDP and 2 s over TCP, pings 1 s each,
run in parallel).

On a client, a running client is asked first (control socket) and trusted: doctor never
starts a handshake with the client's key while a client runs, since a second session with
the same key would take the running client's endpoint at the relay.  Only when no client
runs does it probe with a client core of its own, over UDP and then TCP.

Doctor checks the file it was given.  The running client's status says what it was
started with (server, server_public_key, transport, device, its own key); when the
file says otherwise, that is a problem (restart the client), and the path checked is the
file's relay.  Then doctor probes that relay itself, but only when the probe cannot
touch the running client (checks.probe_unsafe): under another key than the running
client's (the file's private_key_file changed: to every relay, another peer), or with a
relay the running client does not know (not the one it was started with, nor the one it
uses, nor one it learnt from a mesh): the running client has no session there to take
over.  A handshake under the same key with a relay the client knows would take its
session over (the relay would send to doctor's socket), and its configuration request
would claim the client's presence there for the other relays of a shared store; then
doctor only looks whether the relay's UDP port is closed and its host answers ping.

The relay's own health (forwarding, its NAT table, its device and routes, its store) is
asked over the tunnel: through the running client (`relay_health` on its control
socket), or within doctor's own probe.  Each fault there is a PROBLEM whose fix is
`gtun doctor -c server.toml` on the relay.  On the relay itself, what the relay sets up
at start (its device, forwarding, its NAT table) is a note while it is not running, a
problem once it runs.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from gtun.app.config import ClientConfig, ServerConfig, load_client_config, load_server_config
from gtun.app.keys import decode_key, encode_key
from gtun.doctor.checks import (
    Result,
    System,
    diagnose_client,
    diagnose_relay,
    exit_code,
    format_json,
    format_text,
    problem,
)
from gtun.doctor.probes import LiveSystem
from gtun.errors import ConfigError

__all__ = ["Result", "exit_code", "format_json", "format_text", "load_any", "run"]


def load_any(path: Path) -> ServerConfig | ClientConfig:
    """A relay's or a client's config, told apart by its section.  Raises ConfigError."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        doc = {}
    if "client" in doc and "server" not in doc:
        return load_client_config(path)
    # Anything else goes through the relay's loader, whose error names what is wrong.
    return load_server_config(path)


def run(path: Path, *, key: str | None = None, system: System | None = None) -> list[Result]:
    """Raises ConfigError for a bad config (or a bad --key)."""
    cfg = load_any(path)
    if key is not None:
        if isinstance(cfg, ClientConfig):
            raise ConfigError("--key is for a relay's config (it asks whether a key is a peer)")
        key = encode_key(decode_key(key, file="--key"))
    results: list[Result] = []
    if system is None:
        system = LiveSystem()
        if os.geteuid() != 0:
            # Control sockets are 0600 and nft needs CAP_NET_ADMIN: the answers below
            # would blame the wrong thing.
            results.append(
                problem(
                    "root",
                    "not run as root: the control socket and the firewall cannot be read",
                    f"sudo gtun doctor -c {path}",
                )
            )
    if isinstance(cfg, ClientConfig):
        return results + diagnose_client(cfg, system)
    return results + diagnose_relay(cfg, system, key)
