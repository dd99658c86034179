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
    replies = [f"64 bytes from 10.64.0.1: icmp_seq={n} ttl=64 time={n / 10} ms" for n in (1, 2, 4)]
    out = "\n".join(
        [
            *replies,
            "--- 10.64.0.1 ping statistics ---",
            "6 packets transmitted, 3 received, 50% packet loss, time 3021ms",
        ]
    )
    # The last 2 echoes were in flight when ping stopped: not counted.  3 is lost.
    assert scale.ping_stats(out, tail=2) == (4, 3, (0.1 + 0.2 + 0.4) / 3, 0.4)
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
