"""Run a command under the limits a systemd unit puts on its process, without systemd:
`sandbox.py UNIT -- COMMAND...` (or `sandbox.py UNIT --check`: print what a process
under them may do, as JSON).

What is reproduced, read from UNIT's [Service] section:
  CapabilityBoundingSet=  the bounding set, so that root gets only these capabilities
                          at exec (prctl PR_CAPBSET_DROP)
  NoNewPrivileges=        prctl PR_SET_NO_NEW_PRIVS
  MemoryDenyWriteExecute= prctl PR_SET_MDWE (REFUSE_EXEC_GAIN: stricter than systemd's
                          seccomp version, which only refuses W+X mappings)
  SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=native,
  RestrictAddressFamilies=
                          one seccomp filter (libseccomp through ctypes): the groups
                          expanded by `systemd-analyze syscall-filter`, as systemd does
What is not: the mount sandbox (ProtectSystem=, PrivateTmp=, ProtectHome=, ...), the
device policy, ProtectClock= and the namespaces (ProtectHostname=, ...).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

CAPS = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
]
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def service_keys(unit: Path) -> dict[str, list[str]]:
    """Every value of each [Service] key, in order."""
    section = ""
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        if name.startswith("@"):
            result |= expand(groups[name], groups)
        else:
            result.add(name)
    return result


def allowed_syscalls(values: list[str]) -> set[str]:
    """SystemCallFilter= as systemd reads it: the first value without "~" makes an
    allow list; "~" values take names out of it."""
    groups = syscall_groups()
    allowed: set[str] = set()
    for value in values:
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if deny:
            allowed -= names
        else:
            allowed |= names
    return allowed


def apply(keys: dict[str, list[str]]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def check(result: int, what: str) -> None:
        if result != 0:
            code = ctypes.get_errno()
            raise SystemExit(f"sandbox: {what}: {os.strerror(code)}")

    if "CapabilityBoundingSet" in keys:
        keep = set(" ".join(keys["CapabilityBoundingSet"]).split())
        last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for number, name in enumerate(CAPS[: last + 1]):
            if f"CAP_{name}" not in keep:
                check(prctl(PR_CAPBSET_DROP, number, 0, 0, 0), f"dropping CAP_{name}")
    if keys.get("NoNewPrivileges", ["no"])[-1] == "yes":
        check(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no new privileges")
    if keys.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":
        check(prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")
    if "SystemCallFilter" not in keys:
        return
    name = ctypes.util.find_library("seccomp")
    if name is None:
        raise SystemExit("sandbox: libseccomp is missing")
    lib = ctypes.CDLL(name)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    code = keys.get("SystemCallErrorNumber", ["EPERM"])[-1]
    ctx = lib.seccomp_init(scmp_act_errno(getattr(errno, code)))
    families = " ".join(keys.get("RestrictAddressFamilies", [])).split()
    for call in sorted(allowed_syscalls(keys["SystemCallFilter"])):
        number = lib.seccomp_syscall_resolve_name(call.encode())
        if number < 0:
            continue  # not a call of this architecture
        if call == "socket" and families:
            for family in families:
                cmp = ArgCmp(0, SCMP_CMP_EQ, getattr(socket, family), 0)
                rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, ctypes.byref(cmp))
                if rc != 0:
                    raise SystemExit(f"sandbox: seccomp rule for socket({family}): {rc}")
            continue
        rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None)
        if rc != 0:
            raise SystemExit(f"sandbox: seccomp rule for {call}: {rc}")
    if lib.seccomp_load(ctx) != 0:
        raise SystemExit("sandbox: cannot load the seccomp filter")


CHECK = r"""
import json, mmap, os, socket
def attempt(fn):
    try:
        fn()
        return "allowed"
    except OSError as exc:
        return os.strerror(exc.errno)
status = dict(l.split(":\t") for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
print(json.dumps({
    "CapEff": int(status["CapEff"], 16),
    "NoNewPrivs": status["NoNewPrivs"],
    "socket AF_PACKET": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
    "socket AF_INET": attempt(lambda: socket.socket().close()),
    "setuid": attempt(lambda: os.setuid(0)),
    "mmap W+X": attempt(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)),
}))
"""


def main(argv: list[str]) -> None:
    unit = Path(argv[0])
    apply(service_keys(unit))
    command = [sys.executable, "-c", CHECK] if argv[1] == "--check" else argv[2:]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
