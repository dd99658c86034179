"""Running under systemd: the notifications the daemons send (app/sdnotify.py), their log
lines in the journal's form (app/logs.py), and log lines free of Python reprs.

Tier 2 runs the daemons in-process as tests/test_daemons.py does; tier 3 runs real
`gtun server` and `gtun client` processes in namespaces with the environment systemd
would give them (NOTIFY_SOCKET, WATCHDOG_USEC, JOURNAL_STREAM).
"""

from __future__ import annotations

import asyncio
import ctypes.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import test_daemons as daemons
from gtun.app.sdnotify import Notifier, notify_address, status_line, watchdog_interval
from gtun.lab.net import GTUN, GtunNet
from gtun.lab.netns import Lab, python_env
from gtun.lab.portfwd import NsPortForward
from labkit import ConsoleApi, set_config_keys, wait_until

net = daemons.net

# What a log line must never show: a tuple, a list or an ip_address object's repr.
REPRS = ("('", "IPv4Address(", "IPv6Address(", "[IPv", "IPv4Network(", "IPv6Network(")


@pytest.fixture
def lab_prefix() -> str:
    return "gts"


class Listener:
    """A notify socket as systemd holds it: every datagram, parsed, with the time it
    came, read by a thread (so that it sees when they came even while the daemons' event
    loop is blocked)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, dict[str, str]]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
            self.got.append((time.monotonic(), fields))

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()

    def states(self) -> list[str]:
        """READY, RELOADING and STOPPING, in the order they came."""
        return [
            key
            for _, fields in list(self.got)
            for key in ("READY", "RELOADING", "STOPPING")
            if fields.get(key) == "1"
        ]

    def pings(self) -> list[float]:
        return [t for t, fields in list(self.got) if fields.get("WATCHDOG") == "1"]

    def statuses(self) -> list[str]:
        return [fields["STATUS"] for _, fields in list(self.got) if "STATUS" in fields]

    def first(self, key: str) -> dict[str, str]:
        return next(fields for _, fields in list(self.got) if fields.get(key) == "1")


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[Callable[[str], Listener]]:
    made: list[Listener] = []

    def make(name: str) -> Listener:
        made.append(Listener(str(tmp_path / f"{name}.notify")))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


# --- the notifier alone ------------------------------------------------------------------


def test_notify_socket_in_the_abstract_namespace_and_as_a_path(tmp_path: Path) -> None:
    name = f"gts-notify-{os.getpid()}-{secrets.token_hex(4)}"
    listener = Listener(b"\0" + name.encode())
    by_path = Listener(str(tmp_path / "notify"))
    try:
        abstract = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert abstract.address == b"\0" + name.encode()
        assert abstract.send("READY=1", status_line("serving\n3 peers"))
        path = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        path.stopping()
        wait_until(lambda: listener.got and by_path.got, 5, "the datagrams")
        assert listener.got[0][1] == {"READY": "1", "STATUS": "serving 3 peers"}
        assert by_path.states() == ["STOPPING"]
        abstract.close()
        path.close()
    finally:
        listener.close()
        by_path.close()


def test_without_a_notify_socket_nothing_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    for value in (None, "", "relative/path", "vsock:2:1234"):
        env = {} if value is None else {"NOTIFY_SOCKET": value}
        notifier = Notifier.from_environ({**env, "WATCHDOG_USEC": "1000000"})
        assert not notifier.enabled and notifier.watchdog is None
        assert not notifier.send("READY=1")
    assert notify_address("@x") == b"\0x" and notify_address("/run/x") == "/run/x"
    # A socket that went away: the daemon goes on, and says so once.
    gone = Notifier("/nonexistent/gts/notify")
    with caplog.at_level(logging.WARNING, logger="gtun"):
        assert not gone.send("READY=1") and not gone.send("READY=1")
    gone.close()
    assert [r.getMessage() for r in caplog.records].count(
        "cannot notify systemd (NOTIFY_SOCKET): No such file or directory"
    ) == 1


def test_watchdog_interval_is_half_the_period_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    own = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(own) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    for bad in ("", "0", "-5", "soon"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}) is None


# --- the daemons in-process ----------------------------------------------------------------


def test_relay_and_client_tell_systemd_what_they_do(
    net: daemons.Net,
    platforms: Any,
    listeners: Callable[[str], Listener],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay_pf, client_pf = platforms(), platforms()
    relay_rx, client_rx = listeners("relay"), listeners("client")
    period = 0.1  # WATCHDOG_USEC: a ping every 50 ms
    monkeypatch.setenv("NOTIFY_SOCKET", str(relay_rx.sock.getsockname()))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(period * 1e6)))
    server = daemons.start_relay(net, relay_pf)
    monkeypatch.setenv("NOTIFY_SOCKET", str(client_rx.sock.getsockname()))
    monkeypatch.delenv("WATCHDOG_USEC")
    client = daemons.start_client(net, client_pf)
    monkeypatch.delenv("NOTIFY_SOCKET")
    stalled: list[float] = []

    async def scenario() -> None:
        async with asyncio.timeout(daemons.LIMIT):
            async with daemons.running(server), daemons.running(client):
                await daemons.until(lambda: client.applied is not None)
                await daemons.until(lambda: len(relay_rx.pings()) >= 3)
                assert relay_rx.states() == ["READY"]
                assert relay_rx.first("READY")["STATUS"].startswith("serving 1 peers on UDP")
                # The pings come from the event loop: none while it is blocked.
                start = time.monotonic()
                time.sleep(5 * period)
                stalled.extend([start, time.monotonic()])
                net.add_peer("c2")
                before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                os.kill(os.getpid(), signal.SIGHUP)
                await daemons.until(lambda: relay_rx.states().count("READY") == 2)
                reloading = relay_rx.first("RELOADING")
                assert 0 <= int(reloading["MONOTONIC_USEC"]) - before < 5_000_000
                await daemons.until(lambda: client_rx.statuses()[-1].startswith("connected"))

    asyncio.run(scenario())
    assert relay_rx.states() == ["READY", "RELOADING", "READY", "STOPPING"]
    assert relay_rx.statuses()[-2].startswith("serving 2 peers")  # the READY after reload
    start, end = stalled
    # At most the ping already under way as the loop blocked; pings again once it ran.
    assert [t for t in relay_rx.pings() if start + 1.5 * period < t < end] == []
    assert any(t > end for t in relay_rx.pings())
    # The client: ready once up and trying; STATUS says when it is connected, and where.
    assert client_rx.states() == ["READY", "STOPPING"]
    assert (
        client_rx.first("READY")["STATUS"] == f"connecting to relay 127.0.0.1:{net.port} over UDP"
    )
    assert f"connected to relay 127.0.0.1:{net.port} over UDP: 10.66.0.2/24 on gtc0" in (
        client_rx.statuses()
    )
    assert client_rx.pings() == []  # no WATCHDOG_USEC, no pings


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_log_lines_show_addresses_and_lists_as_text(
    net: daemons.Net, platforms: Any, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    relay_pf, client_pf = platforms(), platforms()
    # No resolvconf: the client says which DNS servers it leaves alone.
    monkeypatch.setattr(client_pf, "dns_method", lambda: "file")
    net.write_client(transport=transport)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(logging.DEBUG)
    gtun_log = logging.getLogger("gtun")
    level = gtun_log.level
    gtun_log.setLevel(logging.DEBUG)  # setLevel: it clears the loggers' caches
    gtun_log.addHandler(handler)

    async def scenario() -> None:
        async with asyncio.timeout(daemons.LIMIT):
            async with daemons.configured(net, relay_pf, client_pf) as (server, client):
                await daemons.exchange(relay_pf, client_pf, b"logged")
                net.add_peer("c2")
                os.kill(os.getpid(), signal.SIGHUP)
                await daemons.until(lambda: any(line.startswith("reloaded") for line in lines))

    try:
        asyncio.run(scenario())
    finally:
        gtun_log.removeHandler(handler)
        gtun_log.setLevel(level)
    text = "\n".join(lines)
    assert f"connecting to relay 127.0.0.1:{net.port} over {transport.upper()}" in text
    if transport == "udp":
        assert "pushed DNS servers 10.66.0.1 not applied" in text
        assert re.search(r"handshake with c1 \(10\.66\.0\.2\) from 127\.0\.0\.1:\d+$", text, re.M)
    assert [line for line in lines if any(r in line for r in REPRS)] == []


# --- log lines for the journal ---------------------------------------------------------------

_LOG_EVERY_LEVEL = """
import logging, sys
from gtun.app.logs import setup_logging
setup_logging(sys.argv[1] == "debug", "server")
log = logging.getLogger("gtun")
log.debug("a debug line")
log.info("an info line")
log.warning("a warning")
log.error("an error")
log.critical("a critical one")
logging.getLogger("pyroute2").info("not shown: others log warnings only")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("a bug")
"""


def log_every_level(tmp_path: Path, journal_stream: str | None, debug: bool = True) -> list[str]:
    """What a daemon's logging writes to standard error (a file here) at every level;
    `journal_stream`: the JOURNAL_STREAM to give it ("" for that of the file itself)."""
    out = tmp_path / f"stderr-{secrets.token_hex(4)}"
    out.touch()
    env = python_env({k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
    if journal_stream is not None:
        st = out.stat()
        env["JOURNAL_STREAM"] = journal_stream or f"{st.st_dev}:{st.st_ino}"
    with out.open("ab") as f:
        subprocess.run(
            [sys.executable, "-c", _LOG_EVERY_LEVEL, "debug" if debug else "info"],
            stderr=f,
            env=env,
            check=True,
            timeout=30,
        )
    return out.read_text().splitlines()


def test_under_journald_lines_carry_their_priority_and_no_time(tmp_path: Path) -> None:
    lines = log_every_level(tmp_path, "")
    assert lines[:5] == [
        "<7>a debug line",
        "<6>an info line",
        "<4>a warning",
        "<3>an error",
        "<2>a critical one",
    ]
    # A traceback: every line of it at the message's priority.
    assert lines[5] == "<3>a bug"
    assert lines[6] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(re.match(r"<[2-7]>", line) for line in lines)
    assert log_every_level(tmp_path, "", debug=False)[0] == "<6>an info line"


@pytest.mark.parametrize("stream", [None, "1:2", "garbage"])
def test_elsewhere_lines_keep_their_time_and_role(tmp_path: Path, stream: str | None) -> None:
    # Not the journal: no JOURNAL_STREAM, or one naming another file (inherited).
    lines = log_every_level(tmp_path, stream)
    assert re.fullmatch(r"\d\d:\d\d:\d\d gtun server: a debug line", lines[0])
    assert not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize("journal", [True, False])
def test_a_failing_command_says_why_at_priority_err(tmp_path: Path, journal: bool) -> None:
    out = tmp_path / "stderr"
    out.touch()
    st = out.stat()
    env = python_env({k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
    if journal:
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    missing = tmp_path / "missing.toml"
    with out.open("ab") as f:
        code = subprocess.run(
            [*GTUN, "client", "-c", str(missing)], stderr=f, env=env, timeout=30, check=False
        ).returncode
    (line,) = out.read_text().splitlines()
    assert code == 2
    assert line.startswith(f"{'<3>' if journal else ''}gtun: {missing}"), line


# --- real processes in namespaces ----------------------------------------------------------


def journal_env(log: Path, notify: Path, watchdog_usec: int | None) -> dict[str, str]:
    """The environment systemd gives a Type=notify service whose stderr is the journal
    (here: its log file)."""
    log.touch()
    st = log.stat()
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(notify)
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def test_real_daemons_under_a_pretend_systemd(
    lab: Lab, tmp_path: Path, listeners: Callable[[str], Listener]
) -> None:
    gnet = GtunNet(lab, tmp_path / "net", clients=1, lan=False, underlay=249)
    relay, (c1,) = gnet.relay, gnet.clients
    relay_rx, client_rx = listeners("relay"), listeners("client")
    env = journal_env(relay.log, Path(relay_rx.sock.getsockname()), 400_000)
    relay.proc = relay.ns.spawn(
        [*GTUN, "--debug", "server", "-c", str(relay.config)], log_path=relay.log, env=env
    )
    wait_until(lambda: "READY" in relay_rx.states(), 20, "the relay's READY=1")
    env = journal_env(c1.log, Path(client_rx.sock.getsockname()), None)
    c1.proc = c1.ns.spawn(
        [*GTUN, "--debug", "client", "-c", str(c1.config)], log_path=c1.log, env=env
    )
    wait_until(lambda: "READY" in client_rx.states(), 20, "the client's READY=1")
    gnet.wait_configured(c1)
    gnet.ping(c1.ns, "10.66.0.1")
    wait_until(lambda: len(relay_rx.pings()) >= 3, 10, "watchdog pings")
    # A reload that fails (a bad key) is still a reload: RELOADING, then READY again.
    text = relay.config.read_text()
    set_config_keys(relay.config, "server", {"no_such_key": "1"})
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: relay_rx.states().count("READY") == 2, 20, "READY after the reload")
    relay.config.write_text(text)
    wait_until(lambda: "connected" in client_rx.statuses()[-1], 10, "the client's STATUS")
    assert gnet.stop(c1) == 0 and gnet.stop(relay) == 0
    assert relay_rx.states() == ["READY", "RELOADING", "READY", "STOPPING"]
    assert client_rx.states() == ["READY", "STOPPING"]
    assert client_rx.statuses()[0] == f"connecting to relay {c1.underlay}:9621 over UDP"
    for node in (relay, c1):
        lines = node.log.read_text().splitlines()
        assert lines and all(re.match(r"<[2-7]>\S", line) for line in lines), lines
        assert "<6>" in {line[:3] for line in lines}
        assert [line for line in lines if any(r in line for r in REPRS)] == []
    relay_log = relay.log.read_text()
    assert re.search(
        r"^<7>handshake with c1 \(10\.66\.0\.2\) from 10\.249\.1\.2:\d+$", relay_log, re.M
    )
    assert "<3>reload failed, keeping the current peers:" in relay_log
    assert "<6>relay server.toml listening on UDP and TCP 0.0.0.0:9621" in relay_log


# --- the units' limits ---------------------------------------------------------------------

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
SANDBOX = Path(__file__).resolve().parent / "scripts" / "sandbox.py"
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN = 10, 12
CONSOLE_PORT = 9680
CONSOLE_PASSWORD = "within the unit's limits"


def sandboxed(unit: str, *command: str) -> list[str]:
    """`command` under the limits of contrib/systemd/`unit` (tests/scripts/sandbox.py)."""
    return [sys.executable, str(SANDBOX), str(UNITS / unit), "--", *command]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or ctypes.util.find_library("seccomp") is None,
    reason="needs systemd-analyze and libseccomp",
)
def test_the_daemons_work_within_their_units_limits(
    lab: Lab, tmp_path: Path, listeners: Callable[[str], Listener]
) -> None:
    # The limits bite: what the relay and the client may not do fails.
    for unit, caps in (
        ("gtun-server@.service", {CAP_NET_ADMIN, CAP_NET_BIND_SERVICE}),
        ("gtun-client@.service", {CAP_NET_ADMIN}),
    ):
        out = subprocess.run(
            [sys.executable, str(SANDBOX), str(UNITS / unit), "--check"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        check = json.loads(out.stdout)
        assert check["CapEff"] == sum(1 << c for c in caps), unit
        assert check["socket AF_PACKET"] == check["setuid"] == "Operation not permitted"
        assert check["mmap W+X"] == "Permission denied" and check["socket AF_INET"] == "allowed"
    # A relay with NAT (nftables, forwarding sysctls), a client, and a full-tunnel client
    # (policy rules, a firewall mark, src_valid_mark), each under its unit's limits.
    # Device names of its own: `wg show`'s sockets in /var/run/wireguard are shared by
    # every namespace, and a clash is said at warning level (which this test forbids).
    devices = {"relay": "gtsR0", "c1": "gtsC1", "c2": "gtsC2"}
    # Two workers, as a relay on a machine of two cores or more runs by default: the
    # workers it starts live under the same limits.
    gnet = GtunNet(lab, tmp_path / "net", clients=2, underlay=249, devices=devices, workers=2)
    relay, (c1, c2) = gnet.relay, gnet.clients
    set_config_keys(c2.config, "client", {"default_route": "true"})
    # The web console too: its port, its scrypt, its doctor subprocess, under the limits.
    set_config_keys(
        relay.config,
        "server",
        {"console_listen": f'"127.0.0.1:{CONSOLE_PORT}"', "endpoint": '"10.249.1.1:9621"'},
    )
    relay.ns.run(
        [*GTUN, "console", "passwd", "--stdin", "-c", str(relay.config)],
        input=CONSOLE_PASSWORD + "\n",
        env=python_env(),
    )
    relay_rx = listeners("relay")
    env = journal_env(relay.log, Path(relay_rx.sock.getsockname()), 2_000_000)
    relay.proc = relay.ns.spawn(
        sandboxed("gtun-server@.service", *GTUN, "server", "-c", str(relay.config)),
        log_path=relay.log,
        env=env,
    )
    wait_until(lambda: "READY" in relay_rx.states() or relay.proc.poll(), 20, "READY=1")
    assert relay_rx.states() == ["READY"], gnet.log_tail(relay)
    for c in (c1, c2):
        env = journal_env(c.log, Path(listeners(c.name).sock.getsockname()), 2_000_000)
        c.proc = c.ns.spawn(
            sandboxed("gtun-client@.service", *GTUN, "client", "-c", str(c.config)),
            log_path=c.log,
            env=env,
        )
    for c in (c1, c2):
        gnet.wait_configured(c)
        gnet.ping(c.ns, "10.66.0.1")
        gnet.ping(c.ns, "192.168.77.10")  # the LAN host, through the relay's NAT
    # The daemons themselves run under the limits (the wrapper exec'd them).
    for node, caps in (
        (relay, 1 << CAP_NET_ADMIN | 1 << CAP_NET_BIND_SERVICE),
        (c2, 1 << CAP_NET_ADMIN),
    ):
        assert node.proc is not None
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        assert "gtun" in Path(f"/proc/{node.proc.pid}/cmdline").read_text()
        assert "Seccomp:\t2\n" in status and "NoNewPrivs:\t1\n" in status
        assert f"CapBnd:\t{caps:016x}\n" in status
    st = gnet.status(relay)
    assert st is not None and [w["alive"] for w in st["workers"]] == [True, True]
    worker = Path(f"/proc/{st['workers'][1]['pid']}/status").read_text()
    assert "Seccomp:\t2\n" in worker and "NoNewPrivs:\t1\n" in worker
    with NsPortForward(relay.ns.name, ("127.0.0.1", CONSOLE_PORT)) as forward:
        api = ConsoleApi(forward.url)
        api.login(CONSOLE_PASSWORD)
        assert api.peer("c1")["online"]
        status, doctor = api.call("GET", "/api/doctor?fresh=1")
        assert status == 200 and "error" not in doctor, doctor
        checks = {c["check"]: c for c in doctor["checks"]}
        assert checks["relay"]["ok"] and checks["device"]["ok"], doctor
        status, added = api.call("POST", "/api/peers", {"name": "phone"})
        assert status == 201 and added["qr"].startswith("data:image/png;base64,"), added
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: relay_rx.states().count("READY") == 2, 20, "READY after the reload")
    assert [gnet.stop(n) for n in (c1, c2, relay)] == [0, 0, 0]
    for node in (relay, c1, c2):
        text = node.log.read_text()
        bad = [line for line in text.splitlines() if line[:3] in ("<2>", "<3>", "<4>")]
        assert bad == [] and "not permitted" not in text and "denied" not in text, text
    assert "<6>reloaded server.toml" in relay.log.read_text()
    assert "<6>full tunnel: all traffic through the relay" in c2.log.read_text()
