"""Helpers of the namespace tests (tier 3) that `gtun demo` and the benchmark do not
need: gtun commands and inline Python run in a namespace, a port held by another
program, IPv6 on a GtunNet's LAN link, checked transfers over long-lived agents, and
stock WireGuard peers configured the way wg-quick does, and the web console's API as a
script uses it.  The network itself is
gtun.lab.net's GtunNet; the programs these helpers start are in tests/scripts/."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtun.lab.net import GTUN, GtunNet
from gtun.lab.netns import Namespace, python_env

SCRIPTS = Path(__file__).resolve().parent / "scripts"  # the programs run in the namespaces


def set_config_keys(path: Path, section: str, keys: dict[str, str]) -> None:
    """Add `keys` (TOML values, already quoted) at the top of `[section]` of a config."""
    text = path.read_text()
    head = f"[{section}]\n"
    if head not in text:
        raise ValueError(f"{path} has no [{section}]")
    path.write_text(text.replace(head, head + "".join(f"{k} = {v}\n" for k, v in keys.items())))


def run_gtun(ns: Namespace, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a `gtun` command (status, doctor, ...) from this checkout in namespace `ns`;
    its exit code is the caller's to check."""
    return ns.run([*GTUN, *args], check=False, timeout=timeout, env=python_env())


def gtun_stdout(ns: Namespace, *args: str, timeout: float = 30) -> str:
    """What a `gtun` command prints in `ns`; raises RuntimeError, with its stderr, when
    it fails."""
    out = run_gtun(ns, *args, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(
            f"gtun {' '.join(args)} exited with {out.returncode}: {out.stderr.strip()}"
        )
    return out.stdout


def doctor_results(
    ns: Namespace, config: Path, *extra: str
) -> tuple[int, dict[str, dict[str, Any]]]:
    """`gtun doctor --json` in `ns`: (exit code, results by check name).  Raises
    RuntimeError when doctor itself failed (an exit code other than 0 or 1)."""
    out = run_gtun(ns, "doctor", "--json", "-c", str(config), *extra)
    if out.returncode not in (0, 1):
        raise RuntimeError(f"gtun doctor exited with {out.returncode}: {out.stderr.strip()}")
    return out.returncode, {r["check"]: r for r in json.loads(out.stdout)}


def run_python(
    ns: Namespace,
    code: str,
    *args: str,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run Python `code` (with `args` as sys.argv[1:]) in `ns`; gtun is importable.  With
    `check`, a non-zero exit raises RuntimeError including stderr."""
    return ns.run(
        [sys.executable, "-c", code, *args],
        check=check,
        timeout=timeout,
        input=input,
        env=python_env(env),
    )


def add_lan6(net: GtunNet, relay_address: str, lan_address: str) -> None:
    """IPv6 on `net`'s LAN link too: the relay's side and the LAN host (/64, no DAD)."""
    if net.lan is None:
        raise ValueError("this GtunNet has no LAN host")
    for ns, dev, addr in (
        (net.relay.ns, "rlan", relay_address),
        (net.lan, "lan0", lan_address),
    ):
        ns.sysctl(f"net.ipv6.conf.{dev}.disable_ipv6", 0)
        ns.run(["ip", "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad"])


def hold_port(
    ns: Namespace,
    kind: str,
    port: int,
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    timeout: float = 10,
) -> subprocess.Popen[bytes]:
    """A process in `ns` holding `kind` ("udp" or "tcp") `host`:`port`, returned once it
    is bound (another program in the way, for port-in-use tests).  Raises RuntimeError
    when it is not bound within `timeout`."""
    cmd = [sys.executable, str(SCRIPTS / "hold_port.py"), kind, host, str(port)]
    proc = ns.spawn(cmd, log_path=log_path)
    deadline = time.monotonic() + timeout
    while "bound" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"in {ns.name}: nothing holds {kind} {host}:{port}")
        time.sleep(0.05)
    return proc


# --- checked transfers over long-lived agents ------------------------------------------
#
# GtunNet.transfer starts two processes per transfer.  A suite that moves many streams
# (both directions, IPv4 and IPv6, several paths, streams in parallel) instead starts one
# XferServer per namespace and runs each namespace's batch of jobs from one process.
# The server listens on "::" (IPv4 through mapped addresses) for TCP jobs and echoes UDP
# datagrams on the same port.
#
#   up:   the client sends b"U" + size (8 bytes BE) + `size` random bytes and half-closes;
#         the server answers with the byte count (8 bytes BE) and the SHA-256 of what came.
#   down: the client sends b"D" + size; the server sends `size` random bytes, then the
#         SHA-256 of what it sent, and closes.  A stream that carried a byte too many or
#         too few hashes wrong or ends early, and either way the job fails.

XFER_PORT = 5301


@dataclass(frozen=True)
class XferJob:
    """One TCP stream: `direction` "up" (client to server) or "down" (server to client)."""

    address: str
    direction: str
    size: int
    port: int = XFER_PORT


@dataclass(frozen=True)
class XferResult:
    job: XferJob
    sent: str  # SHA-256 of what the sending end sent
    received: str  # SHA-256 of what the receiving end received
    nbytes: int  # bytes the receiving end received
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.nbytes == self.job.size and self.sent == self.received

    def __str__(self) -> str:
        j = self.job
        state = "ok" if self.ok else f"FAILED ({self.error or 'checksum or length mismatch'})"
        return (
            f"{j.direction} {j.size} B with {j.address}: {state}, got {self.nbytes} B, "
            f"sent {self.sent[:16]} received {self.received[:16]}, {self.seconds:.2f} s"
        )


def _run_script(
    ns: Namespace, script: str, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run tests/scripts/`script` in `ns`; raises RuntimeError when it fails."""
    return ns.run([sys.executable, str(SCRIPTS / script), *args], timeout=timeout)


def start_xfer_server(
    ns: Namespace, log_path: Path, port: int = XFER_PORT, timeout: float = 10
) -> subprocess.Popen[bytes]:
    """Start the transfer and UDP-echo server in `ns`; returned once it listens.
    Raises RuntimeError when it does not within `timeout`."""
    proc = ns.spawn([sys.executable, str(SCRIPTS / "xfer_server.py"), str(port)], log_path=log_path)
    deadline = time.monotonic() + timeout
    while "ready" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"in {ns.name}: the transfer server did not start:\n"
                + log_path.read_text(errors="replace")
            )
        time.sleep(0.05)
    return proc


def run_xfers(
    ns: Namespace, jobs: list[XferJob], *, timeout: float | None = None
) -> list[XferResult]:
    """Run `jobs` from `ns` against XferServers, all at once (one thread each); results in
    the order of `jobs`.  A job that fails has `ok` False and says why in `error`.  The
    default `timeout` allows 60 s plus 2 s per 10 MB moved."""
    if timeout is None:
        timeout = 60 + sum(j.size for j in jobs) / 5e6
    spec = json.dumps([[j.address, j.port, j.direction, j.size] for j in jobs])
    out = _run_script(ns, "xfer_client.py", spec, timeout=timeout)
    rows = json.loads(out.stdout)
    return [XferResult(job, *row) for job, row in zip(jobs, rows, strict=True)]


def udp_echo(
    ns: Namespace, address: str, sizes: list[int], *, port: int = XFER_PORT, tries: int = 3
) -> tuple[dict[int, int], int]:
    """Send a random datagram of each size in `sizes` from `ns` to an XferServer and check
    the echo byte for byte: ({size: attempts it took, 0 where no exact echo came in
    `tries` attempts of half a second each}, datagrams that came back matching nothing sent)."""
    bound = 10 + len(sizes) * tries * 0.5  # the waits for echoes, and some slack
    out = _run_script(
        ns, "udp_echo_client.py", address, str(port), json.dumps(sizes), str(tries), timeout=bound
    )
    answer = json.loads(out.stdout)
    return {int(k): v for k, v in answer["attempts"].items()}, int(answer["wrong"])


def ping_sizes(
    ns: Namespace, address: str, sizes: list[int], *, df: bool, count: int = 2, deadline: int = 3
) -> dict[int, str]:
    """Ping `address` from `ns` with each ICMP payload size (one ping process per size, all
    at once), with DF set (`-M do`) or letting the sender fragment (`-M dont`); {size:
    ping's summary line}, "" unless exactly `count` echoes were sent and each answered
    within `deadline` seconds, with data ping found right.

    `-w` rather than `-W`: once one reply has come, ping waits only two round trips for
    the rest, so `-W` reads a slow reply as a lost one.  Under `-w` ping sends another
    echo for each one lost, which the "sent" count then shows."""
    family = "-6" if ":" in address else "-4"
    procs = {}
    for size in sizes:
        cmd = [*ns.exec_prefix(), "ping", family, "-n", "-c", str(count), "-i", "0.05"]
        cmd += ["-w", str(deadline), "-M", "do" if df else "dont", "-s", str(size), address]
        procs[size] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    result: dict[int, str] = {}
    for size, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=deadline + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        summary = next((ln for ln in out.splitlines() if "received" in ln), "")
        good = summary.startswith(f"{count} packets transmitted, {count} received")
        result[size] = summary if good and "wrong data" not in out else ""
    return result


# --- stock WireGuard peers (wireguard-go) ---------------------------------------------

# [Interface] keys of wg-quick that `wg setconf` does not take.
WG_QUICK_ONLY = {"address", "dns", "mtu", "table", "preup", "postup", "predown", "postdown",
                 "saveconfig"}  # fmt: skip


def split_wg_quick(text: str) -> tuple[str, dict[str, list[str]], list[str]]:
    """(what `wg setconf` takes, wg-quick-only [Interface] keys, all AllowedIPs)."""
    out: list[str] = []
    iface: dict[str, list[str]] = {}
    allowed: list[str] = []
    section = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            section = line.lower()
            out.append(line)
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        lkey = key.lower()
        values = [v.strip() for v in value.split(",") if v.strip()]
        if section == "[interface]" and lkey in WG_QUICK_ONLY:
            iface.setdefault(lkey, []).extend(values)
            continue
        if section == "[peer]" and lkey == "allowedips":
            allowed.extend(values)
        out.append(f"{key} = {value}")
    return "\n".join(out) + "\n", iface, allowed


def wg_quick_fields(text: str) -> dict[str, str]:
    """The `Key = value` lines of a wg-quick configuration (the first of each key)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def apply_wg_quick(ns: Namespace, ifname: str, wg_quick: str, conf_path: Path) -> list[str]:
    """Apply a wg-quick configuration (as `gtun peer add` prints it) to WireGuard
    interface `ifname` in `ns` the way wg-quick does: `wg setconf` with the wg-quick-only
    keys stripped, then its addresses, MTU, link up and a route per AllowedIPs.  Returns
    the AllowedIPs."""
    setconf, iface, allowed = split_wg_quick(wg_quick)
    fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(setconf)
    ns.run(["wg", "setconf", ifname, str(conf_path)])
    for address in iface.get("address", []):
        ns.run(["ip", "addr", "add", address, "dev", ifname, *(["nodad"] * (":" in address))])
    for mtu in iface.get("mtu", []):
        ns.run(["ip", "link", "set", ifname, "mtu", mtu])
    ns.run(["ip", "link", "set", ifname, "up"])
    for net in allowed:
        # `replace`: the Address's own prefix route may already cover it.
        ns.run(["ip", "route", "replace", net, "dev", ifname])
    return allowed


# --- conformance helpers (tests/test_conformance*.py) ----------------------------------


def link_stats(ns: Namespace, ifname: str) -> dict[str, dict[str, int]]:
    """The kernel's counters of `ifname` in `ns`: {"rx": {...}, "tx": {...}} (stats64)."""
    out = ns.run(["ip", "-j", "-s", "link", "show", ifname]).stdout
    return dict(json.loads(out)[0]["stats64"])


def start_udp_capture(
    ns: Namespace, iface: str, dport: int, out: Path, log_path: Path, *, seconds: float = 60
) -> subprocess.Popen[bytes]:
    """Record the UDP datagrams `ns` sends to port `dport` on `iface` (tests/scripts/
    capture.py udp); returned once it listens.  Terminate it with stop_capture() to have
    it write `out` (a JSON list of hex payloads).  Raises RuntimeError when it does not
    start in 10 s."""
    return _start_capture("udp", ns, iface, dport, out, log_path, seconds)


def start_tcp_capture(
    ns: Namespace, iface: str, dport: int, out: Path, log_path: Path, *, seconds: float = 60
) -> subprocess.Popen[bytes]:
    """Record the TCP streams `ns` opens to port `dport` on `iface` (tests/scripts/
    capture.py tcp: the bytes each connection sent, reassembled); as start_udp_capture."""
    return _start_capture("tcp", ns, iface, dport, out, log_path, seconds)


def _start_capture(
    kind: str,
    ns: Namespace,
    iface: str,
    dport: int,
    out: Path,
    log_path: Path,
    seconds: float,
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(SCRIPTS / "capture.py"), kind, iface, str(dport), str(seconds)]
    proc = ns.spawn([*cmd, str(out)], log_path=log_path)
    deadline = time.monotonic() + 10
    while "ready" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"in {ns.name}: no capture:\n{log_path.read_text()}")
        time.sleep(0.05)
    return proc


def stop_capture(proc: subprocess.Popen[bytes], out: Path) -> list[bytes]:
    """Stop a capture from start_udp_capture or start_tcp_capture and return what it
    recorded (datagrams, or each connection's stream), in order."""
    proc.terminate()
    proc.wait(10)
    return [bytes.fromhex(h) for h in json.loads(out.read_text())]


def start_wireguard_go(
    ns: Namespace, ifname: str, log_path: Path, timeout: float = 10
) -> subprocess.Popen[bytes]:
    """A wireguard-go process in `ns` making interface `ifname` (unique across namespaces:
    its control socket is /var/run/wireguard/IFNAME.sock), returned once that socket
    exists.  Raises RuntimeError when it does not within `timeout`."""
    sock = Path("/var/run/wireguard") / f"{ifname}.sock"
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
    proc = ns.spawn(["wireguard-go", "-f", ifname], log_path=log_path, env=env)
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"wireguard-go {ifname} did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return proc


def move_address(ns: Namespace, ifname: str, old: str, new: str) -> None:
    """Roam: give `ifname` in `ns` the address `new` (same prefix) and take `old` away;
    the secondary is promoted, so routes through the link survive."""
    ns.sysctl(f"net.ipv4.conf.{ifname}.promote_secondaries", 1)
    ns.run(["ip", "addr", "add", new, "dev", ifname])
    ns.run(["ip", "addr", "del", old, "dev", ifname])


def missing_tools(*tools: str) -> list[str]:
    """Which of `tools` are not on PATH."""
    return [t for t in tools if shutil.which(t) is None]


def ping_count(ns: Namespace, address: str, count: int, *args: str, deadline: int = 10) -> int:
    """Ping `address` from `ns` `count` times, 0.05 s apart, giving up after `deadline`
    seconds (extra ping options in `args`); how many replies came."""
    out = ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.05", "-w", str(deadline), *args, address],
        check=False,
        timeout=deadline + 10,
    )
    got = re.search(r"(\d+) (?:packets )?received", out.stdout)
    return int(got.group(1)) if got else 0


def relay_peer(net: GtunNet, name: str) -> dict[str, Any]:
    """Peer `name` in the relay's status; raises AssertionError when the relay does not
    answer or has no such peer."""
    st = net.status(net.relay)
    assert st is not None, net.log_tail(net.relay)
    peer = next((p for p in st["peers"] if p["name"] == name), None)
    assert peer is not None, f"{name} not among the relay's peers: {st['peers']}"
    return dict(peer)


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `cond` every 0.2 s until it is true (returned); raises TimeoutError naming
    `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


TRANSPORT_OVERHEAD = 32  # a transport message: type, index, counter (16), AEAD tag (16)


def transport_size(inner: int) -> int:
    """The WireGuard datagram that carries an `inner`-byte packet or frame (padded to a
    multiple of 16, as WireGuard pads)."""
    return TRANSPORT_OVERHEAD + ((inner + 15) & ~15)


# --- the web console ----------------------------------------------------------------


class ConsoleApi:
    """The web console's JSON API as a script uses it: a cookie jar and the CSRF token
    (tests/test_console_mesh_netns.py, test_systemd.py)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )
        self.csrf = ""

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self.csrf:
            headers["X-CSRF-Token"] = self.csrf
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with self.opener.open(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def login(self, password: str) -> None:
        status, answer = self.call("POST", "/api/login", {"password": password})
        assert status == 200, answer
        self.csrf = answer["csrf"]

    def peer(self, name: str) -> dict[str, Any]:
        status, answer = self.call("GET", "/api/peers")
        assert status == 200, answer
        return next(p for p in answer["peers"] if p["name"] == name)
