"""The sans-IO boundary: the protocol core imports nothing that does I/O.

Like wireguard-go's format_test.go, a rule of the codebase turned into a test: every
module under src/gtun/wg is parsed and each of its imports (absolute, relative, or
inside a function) is checked against the modules that touch sockets, files, processes
or the event loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gtun.wg

CORE = Path(gtun.wg.__file__).resolve().parent
FORBIDDEN = {"asyncio", "socket", "os", "fcntl", "pyroute2", "subprocess"}
MODULES = sorted(CORE.rglob("*.py"))


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file."""
    package = "gtun.wg" if path.parent == CORE else None
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                assert package is not None
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            # `from x import y` may import the submodule x.y.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (getattr(node.func, "id", None) or getattr(node.func, "attr", None))
            in ("__import__", "import_module")
        ):
            found.append((node.lineno, "<dynamic import>"))
    return found


def test_core_modules_found() -> None:
    names = {p.name for p in MODULES}
    assert {"crypto.py", "messages.py", "replay.py", "noise.py", "device.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_module_does_no_io(path: Path) -> None:
    bad = [
        f"{path.name}:{line}: {name}"
        for line, name in _imported_modules(path)
        if name.split(".")[0] in FORBIDDEN or name == "<dynamic import>"
    ]
    assert bad == [], "the sans-IO core must not import: " + ", ".join(bad)


def test_checker_catches_forbidden_imports(tmp_path: Path) -> None:
    """The walker itself: each way of importing is seen."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os.path\n"
        "from socket import socket\n"
        "def f():\n"
        "    import asyncio\n"
        "    from pyroute2 import IPRoute\n"
        "    return __import__('subprocess')\n"
        "import fcntl as f2\n"
    )
    names = {name.split(".")[0] for _, name in _imported_modules(sample)}
    assert FORBIDDEN - {"subprocess"} <= names
    assert "<dynamic import>" in names
