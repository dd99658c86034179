"""The benchmark's own logic, without namespaces: sizes, path selection, and the table's
ratios to the fastest peer and its failure rows."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gtun_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gtun_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sizes(bench: ModuleType) -> None:
    assert bench.parse_size("64M") == 64 << 20
    assert bench.parse_size("1G") == 1 << 30
    assert bench.parse_size("1gib") == 1 << 30
    assert bench.parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size("1T")


def test_paths_keep_table_order_and_reject_unknown(bench: ModuleType) -> None:
    chosen = bench.parse_paths("openvpn, veth,gtun-c2c")
    assert [p.key for p in chosen] == ["veth", "openvpn", "gtun-c2c"]
    with pytest.raises(argparse.ArgumentTypeError, match="nope"):
        bench.parse_paths("veth,nope")


def result(bench: ModuleType, key: str, mbit1: float | None, mbit4: float | None) -> Any:
    spec = bench.BY_KEY[key]
    r = bench.Result(spec.key, spec.label, spec.group)
    for metric, values in (("mbit1", mbit1), ("mbit4", mbit4)):
        if values is not None:
            for v in (values * 0.5, values, values * 3):  # median: the middle one
                r.add(metric, v)
    return r


def test_ratios_are_to_the_fastest_peer_of_the_same_kind(bench: ModuleType) -> None:
    results = [
        result(bench, "wireguard-go", 1000, 1200),
        result(bench, "openvpn", 1200, 1100),
        result(bench, "tinc", 800, 1000),
        result(bench, "gtun-udp", 3600, 4400),
        result(bench, "openvpn-c2c", 300, 400),
        result(bench, "wireguard-go-hub", 500, 200),
        result(bench, "gtun-c2c", 1000, 1000),
    ]
    table = {row[0]: row for row in bench.rows(results)}
    gtun = table[bench.BY_KEY["gtun-udp"].label]
    # One stream: against OpenVPN's 1200; four: against wireguard-go's 1200.
    assert gtun[1:5] == ["3600", "3.00", "4400", "3.67"]
    c2c = table[bench.BY_KEY["gtun-c2c"].label]
    # Client to client: against the hub (500) for one stream, OpenVPN (400) for four.
    assert c2c[1:5] == ["1000", "2.00", "1000", "2.50"]


def test_a_failed_path_says_why_and_the_others_keep_their_figures(bench: ModuleType) -> None:
    failed = result(bench, "tinc", None, None)
    failed.setup_error = "RuntimeError: tincd exited with 1"
    results = [result(bench, "openvpn", 1000, 1000), failed]
    body = bench.rows(results)
    assert body[1][1] == "failed: setup: RuntimeError: tincd exited with 1"
    assert body[0][1:3] == ["1000", "1.00"]
    text = bench.text_table(results)
    assert "failed: setup: RuntimeError: tincd exited with 1" in text
    stats = results[0].as_json()["figures"]["mbit1"]
    assert (stats["min"], stats["median"], stats["max"]) == (500, 1000, 3000)


def test_py_spy_is_found_beside_this_python(bench: ModuleType) -> None:
    """`sudo bench/bench.py --profile` runs without the virtualenv's bin on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    assert bench.py_spy() == (str(beside) if beside.exists() else "py-spy")
    if beside.exists():  # the dev extra installs it: the path is absolute, not PATH's
        assert Path(bench.py_spy()).is_absolute()


def test_rtt_under_load_shows_its_spread(bench: ModuleType) -> None:
    """The median of each run's pings under load, and beside it the 90th percentile of
    every ping of every run: a path whose pings spike shows it."""
    steady, spiky = result(bench, "wireguard-go", 1000, 1000), result(bench, "gtun-udp", 1, 1)
    for r, pings in ((steady, [1.0] * 20), (spiky, [1.0] * 16 + [9.0] * 4)):
        r.add("rtt_load", 1.0)
        r.extra["rtt_load_pings"] = pings
    table = {row[0]: row for row in bench.rows([steady, spiky])}
    at = bench.HEADERS.index("RTT load p90 ms")
    assert bench.HEADERS[at - 1] == "RTT load ms"
    assert table[steady.label][at - 1 : at + 1] == ["1.00", "1.00"]
    assert table[spiky.label][at - 1 : at + 1] == ["1.00", "9.00"]
    none = result(bench, "tinc", 1000, 1000)
    assert bench.rows([none])[0][at] == "-"  # no pings: no spread


def test_the_senders_congestion_control_can_be_chosen(bench: ModuleType) -> None:
    plain = bench.iperf_client_cmd("10.0.0.2", 5, 1)
    assert "-C" not in plain and plain[:4] == ["iperf3", "-J", "-c", "10.0.0.2"]
    assert bench.iperf_client_cmd("10.0.0.2", 5, 4, "cubic")[-2:] == ["-C", "cubic"]
    args = bench.parse_args(["--congestion", "cubic"])
    assert args.congestion == "cubic" and bench.parse_args([]).congestion is None


WORKERS = Path(__file__).resolve().parent.parent / "bench" / "workers.py"


@pytest.fixture(scope="module")
def workers_bench(bench: ModuleType) -> ModuleType:
    sys.path.insert(0, str(WORKERS.parent))  # it imports bench and report from beside it
    sys.modules.setdefault("bench", bench)
    spec = importlib.util.spec_from_file_location("gtun_workers_bench", WORKERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gtun_workers_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_worker_scaling_is_against_one_worker_with_as_many_pairs(
    workers_bench: ModuleType,
) -> None:
    row = workers_bench.Row
    rows = [
        row(1, 1, ["2"], [500.0, 520.0, 510.0]),
        row(1, 4, ["8"], [600.0]),
        row(2, 1, ["1+1"], [450.0], place="across"),
        row(2, 4, ["5+3", "4+4"], [900.0]),
        row(2, 2, errors=["iperf3 from c3 gave no JSON"]),
    ]
    cells = workers_bench.cells(rows)
    assert cells[0][3:5] == ["510", "1.00"]
    assert cells[2][1:5] == ["1 (across workers)", "1+1", "450", "0.88"]
    assert cells[3][2:5] == ["4+4, 5+3", "900", "1.50"]
    assert cells[4][3].startswith("FAILED: iperf3 from c3") and cells[4][4] == "-"
    line = workers_bench.scaling_line(rows)
    assert "4 pairs move 900 Mbit/s with 2 workers against 600 with one: 1.50x" in line
    assert workers_bench.scaling_line(rows[:1]).startswith("Scaling: not measured")
