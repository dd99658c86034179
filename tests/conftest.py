"""Shared fixtures.

Namespace tests (tier 3): mark them `@pytest.mark.netns` or use the `lab` fixture
(which marks them).  They are skipped with the reason when this is not root (or has no
/dev/net/tun, `ip` or namespaces), except under CI (env CI set), where they fail.

`lab` gives a fresh `gtun.lab.netns.Lab` per test whose namespaces are called
`<lab_prefix><4 random hex><name>`, always cleaned up.  Override `lab_prefix` in your
test module to use your own prefix:

    @pytest.fixture
    def lab_prefix() -> str:
        return "gtb"
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from gtun.lab.netns import Lab, list_namespaces  # noqa: E402
from gtun.testing.platform import FakePlatform  # noqa: E402

# Prefixes of every lab made in this session, checked for leftovers at the end.
_LAB_PREFIXES: set[str] = set()


# -- the netns marker -----------------------------------------------------------------


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (modprobe tun)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    if not os.path.exists("/proc/self/ns/net"):
        return "needs network namespace support"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("netns"):
            item.add_marker(pytest.mark.netns)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is None:
        return
    problem = netns_unavailable()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"namespace test cannot run under CI: {problem}", pytrace=False)
    pytest.skip(f"namespace test: {problem}")


# -- the lab fixture ------------------------------------------------------------------


@pytest.fixture
def lab_prefix() -> str:
    """The start of this test's namespace names; override it per module."""
    return "gt"


@pytest.fixture
def lab(lab_prefix: str) -> Iterator[Lab]:
    prefix = f"{lab_prefix}{secrets.token_hex(2)}"
    _LAB_PREFIXES.add(prefix)
    with Lab(prefix) as the_lab:
        yield the_lab


# -- the root-namespace guard ---------------------------------------------------------

# Address lifetimes count down on their own; they are not a change.
_LIFETIMES = re.compile(r"\s*(valid_lft|preferred_lft)\s+\S+")


def _root_network_state() -> str | None:
    if shutil.which("ip") is None:
        return None
    outputs = []
    for args in (["-o", "addr"], ["route"], ["-6", "route"], ["-o", "link"]):
        out = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        if args == ["-o", "link"]:
            # Only the names matter: counters and states move on their own.
            out = "\n".join(sorted(line.split(":")[1].strip() for line in out.splitlines()))
        outputs.append(_LIFETIMES.sub("", out))
    return "\n".join(outputs)


@pytest.fixture(scope="session", autouse=True)
def root_namespace_guard() -> Iterator[None]:
    """Fail loudly if the session changed the root namespace's addresses or routes,
    or left a lab namespace behind."""
    before = _root_network_state()
    yield
    after = _root_network_state()
    if before != after:
        pytest.fail(
            "THE ROOT NETWORK NAMESPACE CHANGED DURING THE TESTS\n"
            f"--- before\n{before}\n--- after\n{after}",
            pytrace=False,
        )
    if shutil.which("ip") is not None and _LAB_PREFIXES:
        left = [n for n in list_namespaces() if n.startswith(tuple(_LAB_PREFIXES))]
        if left:
            pytest.fail(f"namespaces left behind: {' '.join(left)}", pytrace=False)


# -- PostgreSQL (the shared store) -------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """One throwaway PostgreSQL server for the session (gtun.lab.postgres): Unix socket
    only, in a temporary folder owned by the postgres user, removed at the end.  Skipped
    when PostgreSQL is not installed, except under CI."""
    from gtun.lab.postgres import find_bindir, postgres_server

    if find_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (scripts/setup installs it)")
        pytest.skip("needs PostgreSQL (apt install postgresql)")
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: object) -> str:
    """A fresh, empty database on the session's server, for one test."""
    from gtun.lab.postgres import PostgresServer

    assert isinstance(pg_server, PostgresServer)
    return pg_server.create_database(f"t_{secrets.token_hex(6)}")


@pytest.fixture
def platforms() -> Iterator[Callable[[], FakePlatform]]:
    """Make FakePlatforms for in-process daemons (tests/test_daemons.py's way of running
    a relay or a client); their device ends are closed at the end."""
    made: list[FakePlatform] = []

    def make() -> FakePlatform:
        made.append(FakePlatform())
        return made[-1]

    yield make
    for platform in made:
        platform.close_ends()
