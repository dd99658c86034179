"""A network-namespace lab: namespaces, veth links and processes, all removed at the end.

Used by the tests, by `gtun demo` and by the benchmark.  Everything happens inside
namespaces this lab creates; nothing here touches the root namespace's addresses,
routes, links, firewall or sysctls (veth pairs are created from inside a lab
namespace straight into the other one).  It shells out to `ip`, which is fine for
scaffolding.

    with Lab("gtx") as lab:
        a, b = lab.add_ns("a"), lab.add_ns("b")
        lab.veth(a, "va", "10.201.1.1/24", b, "vb", "10.201.1.2/24")
        a.run(["ping", "-c", "1", "10.201.1.2"])
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

IP = "ip"
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL at cleanup
IFNAME_MAX = 15

# The directory holding the gtun package, so `python -m gtun` and `import gtun` work in
# lab processes even when gtun runs from a source tree.
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def python_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with gtun's own directory first on PYTHONPATH."""
    result = dict(os.environ if env is None else env)
    parts = [p for p in result.get("PYTHONPATH", "").split(os.pathsep) if p]
    if PACKAGE_PARENT not in parts:
        parts.insert(0, PACKAGE_PARENT)
    result["PYTHONPATH"] = os.pathsep.join(parts)
    return result


def _ip(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def list_namespaces() -> list[str]:
    """Names of the network namespaces that `ip netns` knows."""
    out = _ip(["netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace_pids(name: str) -> None:
    # Processes left inside a namespace keep it alive after `ip netns delete`;
    # everything in a lab namespace was started by the lab.
    out = _ip(["netns", "pids", name], check=False).stdout
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _delete_namespace(name: str) -> None:
    _kill_namespace_pids(name)
    _ip(["netns", "delete", name], check=False)


def cleanup_stale(prefix: str) -> list[str]:
    """Delete namespaces left by a killed run whose names start with `prefix`.

    Returns the names deleted.
    """
    if len(prefix) < 2:
        raise ValueError(f"prefix {prefix!r} is too short to clean up safely")
    stale = [name for name in list_namespaces() if name.startswith(prefix)]
    for name in stale:
        _delete_namespace(name)
    return stale


class Namespace:
    """One network namespace of a lab."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    def exec_prefix(self) -> list[str]:
        return [IP, "netns", "exec", self.name]

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in this namespace and capture its text output.

        With `check`, a non-zero exit raises RuntimeError including stderr.
        """
        result = subprocess.run(
            [*self.exec_prefix(), *cmd],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"in {self.name}: {' '.join(cmd)} exited with {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def spawn(
        self,
        cmd: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` here in a new session (process group); the lab stops it at cleanup.

        Its output goes to `log_path` (stdout and stderr) or is discarded.  `env`
        defaults to this process's environment with gtun on PYTHONPATH.
        """
        log: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            log = open(log_path, "ab")  # noqa: SIM115 - closed at cleanup
        try:
            proc = subprocess.Popen(
                [*self.exec_prefix(), *cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=python_env(env),
            )
        except BaseException:
            if not isinstance(log, int):
                log.close()
            raise
        self.lab._track(proc, None if isinstance(log, int) else log)
        return proc

    def wait_link_up(self, ifname: str, timeout: float = 5.0) -> None:
        """Wait until `ifname` is operationally up.

        The kernel attaches a link's queue only then (up to a second after `ip link set
        up`); until it does, packets sent on the link are silently dropped.
        """
        deadline = time.monotonic() + timeout
        while True:
            out = _ip(["-n", self.name, "-j", "link", "show", ifname]).stdout
            if json.loads(out)[0].get("operstate") == "UP":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"in {self.name}: {ifname} is not up after {timeout:g} s")
            time.sleep(0.05)

    def add_route(self, dest: str, via: str) -> None:
        """Add a route to `dest` ("default" or a network) via gateway `via`."""
        self.run([IP, "route", "add", dest, "via", via])

    def datagrams_on_the_wire(self) -> None:
        """UDP GSO trains leave this namespace's veths as single datagrams, as from a
        real NIC (for per-datagram loss in a lab; see _NO_UDP_SEGMENTATION)."""
        self.run([sys.executable, "-c", _NO_UDP_SEGMENTATION])

    def drop_at_random(self, percent: int) -> None:
        """Drop `percent`% of the UDP datagrams arriving in this namespace, at random
        (nftables `numgen random`: this kernel has no netem), counted; 0 removes the rule.
        The table is this namespace's own and goes with it."""
        self.run(["nft", "delete", "table", "inet", "gtunloss"], check=False)
        if percent:
            self.run(
                ["nft", "-f", "-"],
                input=(
                    "table inet gtunloss {\n chain in { type filter hook input priority 0;\n"
                    f"  meta l4proto udp numgen random mod 100 < {percent} counter drop\n }}\n}}\n"
                ),
            )

    def dropped_at_random(self) -> int:
        """The datagrams drop_at_random() has dropped so far."""
        out = self.run(["nft", "list", "table", "inet", "gtunloss"]).stdout
        return int(out.split("counter packets ")[1].split()[0])

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl inside this namespace only (e.g. net.ipv4.ip_forward)."""
        if not key.startswith("net."):
            # Only net.* sysctls are per namespace; others would change the host.
            raise ValueError(f"sysctl {key} is not per network namespace")
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])


# A veth passes a UDP GSO train (up to 64 datagrams sent in one call) as one packet, so
# an nftables rule that drops packets at random would drop whole trains, and a real path
# drops datagrams one at a time (a NIC puts each on the wire on its own).  Run in a
# namespace, this turns UDP segmentation off on its veths: the kernel then cuts trains
# apart before they cross.
_NO_UDP_SEGMENTATION = """
import json, subprocess
from pyroute2.ethtool import Ethtool
links = json.loads(subprocess.run(["ip", "-j", "link", "show", "type", "veth"],
                                  capture_output=True, text=True, check=True).stdout)
ethtool = Ethtool()
for link in links:
    features = ethtool.get_features(link["ifname"])
    features.features["tx-udp-segmentation"].enable = False
    ethtool.set_features(link["ifname"], features)
"""


class Lab:
    """A set of namespaces named `prefix + name`, and the processes started in them.

    `cleanup()` (also run on leaving the `with` block and at interpreter exit) stops the
    processes and deletes the namespaces; it is idempotent.
    """

    def __init__(self, prefix: str) -> None:
        if len(prefix) < 2:
            raise ValueError(f"lab prefix {prefix!r} is too short")
        self.prefix = prefix
        self.namespaces: list[Namespace] = []
        self._procs: list[tuple[subprocess.Popen[Any], IO[bytes] | None]] = []
        atexit.register(self.cleanup)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def add_ns(self, name: str) -> Namespace:
        """Create namespace `prefix + name` with its loopback up and IPv6 DAD off."""
        full = f"{self.prefix}{name}"
        _ip(["netns", "add", full])
        ns = Namespace(self, full)
        self.namespaces.append(ns)
        _ip(["-n", full, "link", "set", "lo", "up"])
        # No duplicate address detection in the lab: IPv6 works as soon as a link is up.
        ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0"])  # fmt: skip
        return ns

    def veth(
        self,
        a: Namespace,
        a_if: str,
        a_addr: str | None,
        b: Namespace,
        b_if: str,
        b_addr: str | None,
        mtu: int | None = None,
    ) -> None:
        """Link `a` and `b` with a veth pair (a_if in a, b_if in b), addressed and up.

        Addresses look like "10.201.1.1/24" or "fd20:1:1::1/64".
        """
        for ifname in (a_if, b_if):
            if len(ifname) > IFNAME_MAX:
                raise ValueError(f"interface name {ifname!r} is longer than {IFNAME_MAX}")
        # Created from inside `a`, the pair never exists in the root namespace.
        _ip(["-n", a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if,
             "netns", b.name])  # fmt: skip
        for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            if mtu is not None:
                _ip(["-n", ns.name, "link", "set", ifname, "mtu", str(mtu)])
            if addr is not None:
                extra = ["nodad"] if ":" in addr else []
                _ip(["-n", ns.name, "addr", "add", addr, "dev", ifname, *extra])
            _ip(["-n", ns.name, "link", "set", ifname, "up"])
        for ns, ifname in ((a, a_if), (b, b_if)):
            ns.wait_link_up(ifname)

    def _track(self, proc: subprocess.Popen[Any], log: IO[bytes] | None) -> None:
        self._procs.append((proc, log))

    def cleanup(self) -> None:
        """Stop every process this lab started, then delete its namespaces.  Idempotent."""
        procs, self._procs = self._procs, []
        for proc, _ in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        for proc, log in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Not reaped yet, so its pid still names its group.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_GRACE)
            if log is not None:
                log.close()
        # Whatever else is still inside a lab namespace is killed as it is deleted.
        namespaces, self.namespaces = self.namespaces, []
        for ns in reversed(namespaces):
            _delete_namespace(ns.name)
        atexit.unregister(self.cleanup)
