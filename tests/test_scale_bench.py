"""bench/scale.py's own logic, without namespaces: ping summaries and the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCALE = Path(__file__).resolve().parent.parent / "bench" / "scale.py"


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gtun_scale_bench", SCALE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gtun_scale_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_ping_summary(scale: ModuleType) -> None:
    out = (
        "--- 10.64.0.1 ping statistics ---\n"
        "150 packets transmitted, 148 received, 1.3% packet loss, time 3021ms\n"
        "rtt min/avg/max/mdev = 0.311/0.702/41.250/3.100 ms\n"
    )
    assert scale.ping_stats(out) == (150, 148, 0.702, 41.25)
    assert scale.ping_stats("nothing") == (0, 0, 0.0, 0.0)
    cell = scale._op_cell(0.5, {"sent": 150, "received": 148, "avg_ms": 0.7, "max_ms": 41.2})
    assert cell == "0.50 s (40 ms, 2 lost)"


def test_tables_have_one_row_per_size(scale: ModuleType) -> None:
    rows = [scale.Row(200, [f"c{i}" for i in range(6)]), scale.Row(1000, ["FAILED: x"] + ["-"] * 5)]
    text = scale.text_table(rows).splitlines()
    assert len(text) == 4 and text[0].startswith("peers") and text[3].startswith("1000")
    md = scale.markdown_table(rows).splitlines()
    assert md[1] == "|" + "---|" * len(scale.HEADERS) and md[2].startswith("| 200 | c0 |")
    assert all(line.count("|") == len(scale.HEADERS) + 1 for line in md)
