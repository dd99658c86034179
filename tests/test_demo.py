"""`gtun demo` as a user runs it: it must show traffic flowing and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gtun.lab.netns import list_namespaces, python_env

pytestmark = pytest.mark.netns


def test_demo_shows_traffic_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gtun", "demo"],
        capture_output=True,
        text=True,
        timeout=240,
        env=python_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "FAILED" not in out
    assert out.count("  OK ") == 6  # four pings, two checked transfers
    assert "c1 -> LAN host 192.168.77.10 (NAT)" in out
    assert "All traffic flowed." in out
    assert not [n for n in list_namespaces() if n.startswith("gtdemo")]
