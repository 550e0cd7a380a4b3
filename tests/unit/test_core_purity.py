"""STYLE principle 1: the core does no I/O, and the arrows point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "spa" / "core"

# Modules that open sockets or files, read clocks, draw randomness or spawn
# processes.  None of them may be imported by the core.
BANNED = {
    "os", "io", "socket", "select", "selectors", "asyncio", "time", "datetime",
    "random", "secrets", "subprocess", "threading", "multiprocessing", "signal",
    "pathlib", "shutil", "tempfile", "sqlite3", "logging", "pickle", "marshal",
    "urllib.request", "http", "ssl", "ctypes", "uuid",
}
# The core may depend on the standard library's pure parts, PyNaCl, pyotp and cryptography.
# cryptography: AES-256-CBC for fwknop's packets (core/fwknop.py, which only the server imports)
ALLOWED_THIRD_PARTY = {"nacl", "pyotp", "cryptography"}
# Names that would read a clock or the CSPRNG even through an allowed module.
BANNED_CALLS = {"urandom", "randombytes", "time", "monotonic", "now", "open"}


def core_modules() -> list[Path]:
    return sorted(CORE.glob("*.py"))


def imported_names(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_core_has_modules() -> None:
    assert len(core_modules()) >= 8


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_imports_nothing_that_does_io(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for name in imported_names(tree):
        top = name.split(".")[0]
        assert name not in BANNED, f"{path.name} imports {name}"
        assert top not in BANNED, f"{path.name} imports {name}"
        if top == "spa":
            assert name.startswith("spa.core"), f"{path.name} imports {name} outside the core"
        assert top not in {"spa_client", "client"}, f"{path.name} imports the client"


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_calls_no_clock_or_randomness(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in BANNED_CALLS, f"{path.name}:{node.lineno} calls {name}()"


def test_core_third_party_dependencies_are_the_allowed_ones() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in core_modules():
        for name in imported_names(ast.parse(path.read_text())):
            top = name.split(".")[0]
            if top and top not in stdlib and top not in {"spa", "__future__"}:
                assert top in ALLOWED_THIRD_PARTY, f"{path.name} depends on {top}"


def test_the_ban_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself works: a module that imports time is caught."""
    tree = ast.parse("import time\nfrom os import urandom\n")
    names = imported_names(tree)
    assert "time" in names
    assert "os.urandom" in names
