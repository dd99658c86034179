"""Running an outside program (nft, resolvconf) as gtun does: its output captured, its
time bounded, and a failure to run it at all turned into one RuntimeFailure that says
what gtun was doing.  What a non-zero exit means is the caller's to say."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from gtun.errors import RuntimeFailure


def run_tool(
    args: Sequence[str],
    what: str,
    *,
    stdin: str | None = None,
    timeout: float,
    install: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `args`; `what`: the doing the errors name; `install`: how to get the program
    when it is missing.  Raises RuntimeFailure when it cannot run or does not finish."""
    name = Path(args[0]).name
    try:
        return subprocess.run(
            list(args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        hint = f" ({install})" if install else ""
        raise RuntimeFailure(f"{what}: {name} is not installed{hint}") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"{what}: {name} did not answer in {timeout:g} s") from exc
    except OSError as exc:
        raise RuntimeFailure(f"{what}: cannot run {name}: {exc.strerror or exc}") from exc
