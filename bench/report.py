"""What the table-printing benchmark scripts (hostile.py, faults.py, scale.py) share: the
frame of a run (root, no stale namespaces of theirs, a working directory, SIGTERM taken
as an interrupt so that the labs are removed), their parts run one by one with a
failure becoming a row, and one table printed as text and, on request, as Markdown and
JSON.  A module beside the scripts, not part of gtun."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from gtun.lab.netns import list_namespaces

T = TypeVar("T")
R = TypeVar("R")

# What a part of a run may fail with and still leave a row (anything else stops the run).
ERRORS = (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired)


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--markdown [FILE], --json FILE and --workdir DIR."""
    p.add_argument(
        "--markdown", nargs="?", const="-", metavar="FILE",
        help="also print the table as Markdown (or write it to FILE)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    p.add_argument("--workdir", type=Path, help="keep configs and logs here (default: temporary)")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def preflight(script: str, prefix: str) -> int | None:
    """None when `script` may run: as root, with no namespace of its `prefix` left from
    another run (then SIGTERM becomes an interrupt); else says why and gives 2."""
    if os.geteuid() != 0:
        print(f"{script}: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    stale = [n for n in list_namespaces() if n.startswith(prefix)]
    if stale:
        print(f"{script}: namespaces {', '.join(stale)} exist (another run?)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    return None


@contextlib.contextmanager
def workdir(args: argparse.Namespace, tmp_prefix: str) -> Iterator[Path]:
    """--workdir (made if missing), or a temporary folder removed at the end."""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        yield args.workdir
    else:
        with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp:
            yield Path(tmp)


def each(
    items: Iterable[T],
    label: Callable[[T], str],
    run: Callable[[T], list[R]],
    failed: Callable[[T, str], list[R]],
) -> list[R] | None:
    """The rows of `run(item)` for every item in turn (saying `label(item)` first), those
    of `failed(item, first line of the error)` for one that fails; None if interrupted
    (the labs are removed by then)."""
    rows: list[R] = []
    for item in items:
        print(label(item), file=sys.stderr, flush=True)
        try:
            rows += run(item)
        except KeyboardInterrupt:
            print("interrupted; namespaces removed", file=sys.stderr)
            return None
        except ERRORS as e:
            rows += failed(item, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return rows


def text_table(headers: Sequence[str], cells: list[list[str]]) -> str:
    table = [list(headers), *cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(headers: Sequence[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def emit(headers: Sequence[str], cells: list[list[str]], rows: list[Any], args: Any) -> None:
    """The table as text; as Markdown with --markdown (to standard output for "-"); every
    row (dataclasses) as JSON with --json."""
    print()
    print(text_table(headers, cells))
    if args.markdown is not None:
        md = markdown_table(headers, cells)
        if args.markdown == "-":
            print()
            print(md, end="")
        else:
            Path(args.markdown).write_text(md)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
