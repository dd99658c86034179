"""The mypyc-compiled modules (gtun/native.py, scripts/build-native) and the pure-Python
path beside them: GTUN_PURE=1 loads every gtun module from its .py file, and the core's
tests pass that way too when the compiled modules are what the rest of the suite used.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gtun
from gtun import native

SRC = Path(gtun.__file__).resolve().parent.parent
ROOT = SRC.parent
# The tests of the compiled modules, run again in pure mode when they are compiled.
CORE_TESTS = [
    "tests/test_offload.py",
    "tests/test_packet.py",
    "tests/test_bulk.py",
    "tests/test_wg_replay.py",
    "tests/test_wg_device.py",
    "tests/test_relay.py",
]

_PROBE = """
import importlib, json, sys
from gtun import native
out = {}
for name in native.MYPYC_MODULES:
    module = importlib.import_module(name)
    out[name] = [native.is_compiled(module), module.__file__]
print(json.dumps(out))
"""


def _extensions(name: str) -> list[Path]:
    """The compiled files of module `name` in the source tree."""
    path = SRC / name.replace(".", "/")
    return [
        path.with_name(path.name + suffix)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if path.with_name(path.name + suffix).exists()
    ]


BUILT = {name: bool(_extensions(name)) for name in native.MYPYC_MODULES}


def _load(pure: bool) -> dict[str, list[object]]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop(native.PURE_ENV, None)
    if pure:
        env[native.PURE_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, list[object]] = json.loads(done.stdout)
    return result


def test_every_listed_module_exists_as_python() -> None:
    for name in native.MYPYC_MODULES:
        assert (SRC / (name.replace(".", "/") + ".py")).is_file(), name


def test_built_all_or_none() -> None:
    """A build compiles the whole list: a partial one is a failed build."""
    assert len(set(BUILT.values())) == 1, BUILT


def test_compiled_modules_are_not_stale() -> None:
    """An edited module would otherwise run as it was at the build (gtun would fall back
    to pure Python, slower): run scripts/build-native again."""
    assert not native.stale(), "compiled modules older than their .py: scripts/build-native"


def test_pure_env_loads_source_files() -> None:
    loaded = _load(pure=True)
    assert set(loaded) == set(native.MYPYC_MODULES)
    for name, (compiled, file) in loaded.items():
        assert compiled is False, name
        assert isinstance(file, str) and file.endswith(".py"), (name, file)


def test_without_pure_env_the_extensions_win() -> None:
    loaded = _load(pure=False)
    for name, (compiled, file) in loaded.items():
        assert compiled is BUILT[name], (name, file)
        assert isinstance(file, str) and file.endswith(".py") is not BUILT[name], (name, file)


def test_this_process_uses_what_was_built() -> None:
    """The rest of the suite runs with the compiled modules when they exist."""
    assert native.pure_requested() or native.compiled() == [
        name for name, built in BUILT.items() if built
    ]


@pytest.mark.skipif(not any(BUILT.values()), reason="no compiled modules: the suite is pure")
def test_core_tests_pass_in_pure_mode() -> None:
    """With compiled modules present, the .py files they came from still pass the core's
    tests (the rest of the suite runs compiled)."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env[native.PURE_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
