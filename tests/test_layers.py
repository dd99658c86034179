"""The layout as tests: the sans-IO boundary of core/, and imports that only point down.

Like wireguard-go's format_test.go, rules of the codebase turned into tests.  Every module
under src/gtun is parsed and each of its imports (absolute, relative, or inside a
function) is checked:

- nothing under core/ imports a module that touches sockets, files, processes, clocks or
  the event loop;
- no module imports from a layer above its own (docs/ARCHITECTURE.md has the layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gtun

PACKAGE = Path(gtun.__file__).resolve().parent
CORE = PACKAGE / "core"
FORBIDDEN = {
    "asyncio",
    "socket",
    "os",
    "fcntl",
    "pyroute2",
    "subprocess",
    "selectors",
    "threading",
    "time",
    "signal",
    "pathlib",
    "sqlite3",
    "shutil",
    "tempfile",
}
# Each layer and its rank: a module may import from its own layer and from lower ranks.
# `errors` is the one shared leaf (user-facing errors); `cli` is the entry point above all;
# `native` (which modules are compiled) is below even the package's __init__, which uses it.
LAYERS = {
    "native": -1,
    "errors": 0,
    "core": 1,
    "io": 2,
    "system": 2,
    "app": 3,
    "testing": 3,
    "doctor": 4,
    "lab": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 0,
}
MODULES = sorted(PACKAGE.rglob("*.py"))
CORE_MODULES = sorted(CORE.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file."""
    if package is None and path.is_relative_to(PACKAGE):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
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


def _layer(dotted: str) -> str | None:
    """The layer of a gtun module ("gtun.core.relay" -> "core"); None outside gtun."""
    parts = dotted.split(".")
    if parts[0] != "gtun":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1] if parts[1] in LAYERS else None


def test_layout_found() -> None:
    names = {_module_name(p) for p in MODULES}
    assert {"gtun.core.wg.device", "gtun.core.relay", "gtun.io.driver", "gtun.app.server"} <= names
    for path in MODULES:
        assert _layer(_module_name(path)) is not None, f"{path} is in no layer"


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_does_no_io(path: Path) -> None:
    bad = [
        f"{path.name}:{line}: {name}"
        for line, name in _imported_modules(path)
        if name.split(".")[0] in FORBIDDEN or name == "<dynamic import>"
    ]
    assert bad == [], "the sans-IO core must not import: " + ", ".join(bad)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    own = _layer(_module_name(path))
    assert own is not None
    bad = []
    for line, name in _imported_modules(path):
        layer = _layer(name)
        if layer is not None and layer != own and LAYERS[layer] >= LAYERS[own]:
            bad.append(f"{path.relative_to(PACKAGE)}:{line}: {name} ({layer} is not below {own})")
    assert bad == [], "imports must point down: " + "; ".join(bad)


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
        "from ..app import server\n"
    )
    found = _imported_modules(sample, package="gtun.core")
    names = {name.split(".")[0] for _, name in found}
    assert FORBIDDEN - {"subprocess"} - {n for n in FORBIDDEN if n not in names} <= names
    assert {"os", "socket", "asyncio", "pyroute2", "fcntl"} <= names
    assert "<dynamic import>" in names
    assert (8, "gtun.app.server") in found


def test_upward_import_is_caught() -> None:
    """A core module that imported the app layer would fail test_imports_point_down."""
    assert LAYERS[_layer("gtun.app.server") or ""] >= LAYERS["core"]
    assert _layer("gtun.app.server") == "app"
    assert _layer("asyncio") is None
