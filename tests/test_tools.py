"""run_tool: one RuntimeFailure, naming what was being done, for every way an outside
program can fail to run; its exit code and output are the caller's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gtun.errors import RuntimeFailure
from gtun.system.tools import run_tool


def test_output_and_exit_code_are_the_callers() -> None:
    code = "import sys; print(sys.stdin.read().upper()); sys.exit(3)"
    result = run_tool([sys.executable, "-c", code], "shouting", stdin="hi", timeout=30)
    assert (result.returncode, result.stdout) == (3, "HI\n")


def test_a_missing_program_says_how_to_install_it() -> None:
    with pytest.raises(RuntimeFailure) as exc:
        run_tool(["/nonexistent/frob", "-x"], "cannot frob", timeout=5, install="apt install frob")
    assert str(exc.value) == "cannot frob: frob is not installed (apt install frob)"


def test_a_program_that_hangs_is_cut_off() -> None:
    with pytest.raises(RuntimeFailure) as exc:
        run_tool(["sleep", "30"], "cannot wait", timeout=0.2)
    assert str(exc.value) == "cannot wait: sleep did not answer in 0.2 s"


def test_a_program_that_cannot_be_run(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match=r"^cannot run it: cannot run \S+: "):
        run_tool([str(tmp_path)], "cannot run it", timeout=5)  # a directory
