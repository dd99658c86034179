"""The fuzz harnesses (fuzz/*.py), each run for a few seconds from its committed seed
corpus: a crash or a broken oracle fails the test.  Long runs are fuzz/README.md's.

atheris missing: skipped, except under CI (env CI set), where it fails, as the namespace
tests do."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gtun.core.offload import OffloadError
from gtun.lab.netns import python_env

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
HARNESSES = [
    "wg_device",
    "relay_peer",
    "tcp_framing",
    "bulk_frames",
    "l2_frames",
    "offload_codec",
    "tunnel_messages",
    "config_files",
    "control_socket",
    "tun_super",
    "tcp_connection",
]
SECONDS = 6  # per harness: the whole file stays under ~100 s on 2 cores


@pytest.fixture(autouse=True)
def atheris_present() -> None:
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed (pip install -e '.[dev]')", pytrace=False)
        pytest.skip("atheris is not installed")


def run(harness: str, work: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FUZZ / f"{harness}.py"), *args],
        cwd=work,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_harness_has_a_seed_corpus() -> None:
    for harness in HARNESSES:
        assert (FUZZ / f"{harness}.py").is_file()
        assert any((FUZZ / "corpus" / harness).iterdir()), harness


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_without_a_crash(harness: str, tmp_path: Path) -> None:
    # New inputs go to tmp_path (the first corpus), never into the committed seeds.
    result = run(
        harness,
        tmp_path,
        f"-max_total_time={SECONDS}",
        "-rss_limit_mb=2048",
        "-timeout=10",
        f"-artifact_prefix={tmp_path}/",
        str(tmp_path),
        str(FUZZ / "corpus" / harness),
        timeout=SECONDS + 60,
    )
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, f"{harness} crashed:\n{tail}"
    assert "Done" in tail, tail  # libFuzzer's last line: it ran, not merely started


def test_a_broken_oracle_is_a_crash(tmp_path: Path) -> None:
    """The harnesses' failures are reported: an input the oracle rejects exits non-zero."""
    script = tmp_path / "broken.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(FUZZ)!r})\n"
        "import common, oracles\n"
        "def test_one(data):\n"
        "    oracles.check(False, 'always')\n"
        "common.main(test_one)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script), "-runs=1", f"-artifact_prefix={tmp_path}/"],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "OracleFailure: always" in result.stdout + result.stderr


# --- what the harnesses found (regression tests) -----------------------------------------


def test_every_offload_error_reason_is_a_registered_drop_reason() -> None:
    from gtun.core.drops import REASONS
    from gtun.core.offload import PLAIN, pull_gso, split

    names = {r.name for r in REASONS}
    found = []
    for call in (lambda: pull_gso(b"short"), lambda: split(PLAIN, bytes(100), 50)):
        with pytest.raises(OffloadError) as info:
            call()
        found.append(info.value.reason)
    assert found == ["bad_vnet_hdr", "too_big"]
    assert set(found) <= names


def _bulk_tcp4(flags_frag: int, payload: bytes) -> bytes:
    """A bulk frame around an IPv4 TCP super-packet (GSO_TCPV4, checksum where TCP keeps
    it, gso_size 1448) with the given IPv4 flags/fragment field and payload."""
    from gtun.core import bulk
    from gtun.core.offload import F_NEEDS_CSUM, GSO_TCPV4, Gso, push_gso

    tcp = bytes([3, 232, 7, 208]) + bytes(8) + bytes([0x50, 0x10, 255, 255]) + bytes(4)
    ip = bytes([0x45, 0]) + (40 + len(payload)).to_bytes(2, "big") + bytes(2)
    ip += flags_frag.to_bytes(2, "big") + bytes([64, 6, 0, 0, 10, 66, 0, 2, 10, 66, 0, 1])
    hdr = Gso(F_NEEDS_CSUM, GSO_TCPV4, 40, 1448, 20, 16)
    return bulk.MAGIC + push_gso(hdr) + ip + tcp + payload


@pytest.mark.parametrize(
    ("frame_args", "what"),
    [((0x4000, b""), "no payload"), ((0x2000, bytes(3000)), "an IPv4 fragment")],
)
def test_a_bulk_frame_segment_would_refuse_is_refused(
    frame_args: tuple[int, bytes], what: str
) -> None:
    """Found by fuzz/bulk_frames.py: pull_bulk took GSO frames that segment() refuses (a
    super-packet with no payload, an IPv4 fragment), and the relay wrote them whole to
    its TUN.  Now they are the sender's protocol error; a good frame still segments."""
    from gtun.core import bulk
    from gtun.core.offload import segment

    with pytest.raises(bulk.BulkError):
        bulk.pull_bulk(_bulk_tcp4(*frame_args))
    hdr, packet = bulk.pull_bulk(_bulk_tcp4(0x4000, bytes(3000)))
    assert len(segment(hdr, packet)) == 3
