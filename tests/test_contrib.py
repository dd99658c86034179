"""The systemd units under contrib/: what they run is a valid gtun command line, systemd
itself accepts them, they wait for gtun's notifications, and their sandbox rates 3.0 or
lower in `systemd-analyze security`.  (That the daemons work within the sandbox's
limits: tests/test_systemd.py.)"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from gtun.cli import build_parser

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def _service(unit: Path) -> dict[str, str]:
    """The [Service] keys of a unit (last one wins, as in systemd)."""
    section = ""
    keys: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            keys[key] = value
    return keys


@pytest.mark.parametrize(("unit", "command"), [("server", "server"), ("client", "client")])
def test_unit_runs_gtun_with_the_instance_config(unit: str, command: str) -> None:
    service = _service(UNITS / f"gtun-{unit}@.service")
    argv = shlex.split(service["ExecStart"].replace("%i", "office"))
    assert argv[0] == "/opt/gtun/bin/gtun"  # the virtualenv of the README's install
    args = build_parser().parse_args(argv[1:])
    assert args.command == command
    assert args.config == Path("/etc/gtun/office.toml")
    # A config mistake (exit 2) is not retried in a loop; crashes are.
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["StateDirectory"] == "gtun" and service["RuntimeDirectory"] == "gtun wireguard"
    # gtun says when it serves, from its main process, and pings the watchdog.
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) >= 10


def test_server_unit_reloads_with_sighup() -> None:
    assert _service(UNITS / "gtun-server@.service")["ExecReload"] == "/bin/kill -HUP $MAINPID"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", ["server", "client"])
def test_systemd_accepts_the_unit(unit: str, tmp_path: Path) -> None:
    # systemd checks that ExecStart exists: point it at a stand-in executable.
    fake = tmp_path / "gtun"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    text = (UNITS / f"gtun-{unit}@.service").read_text()
    instance = tmp_path / f"gtun-{unit}@office.service"
    instance.write_text(text.replace("/opt/gtun/bin/gtun", str(fake)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(instance.name) in line or "Unknown" in line or "Invalid" in line
    ]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", ["server", "client"])
def test_the_sandbox_rates_3_or_lower(unit: str, tmp_path: Path) -> None:
    instance = tmp_path / f"gtun-{unit}@office.service"
    instance.write_text((UNITS / f"gtun-{unit}@.service").read_text())
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr:  # systemd older than 250
        pytest.skip(f"systemd-analyze security has no --offline: {result.stderr.strip()}")
    found = EXPOSURE.search(result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 3.0, result.stdout
