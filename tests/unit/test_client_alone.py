"""The client installs and runs alone (issue 16): `pip install .` brings the
client's libraries only, so spa-client and all it imports must never import a
library of the `server` extra; spa-server, run without them, says in one line
what to install and exits 2.

The import graph is read statically (every import, also those inside
functions), and the client is run with the server's libraries made
unimportable.  tests/netns/test_pipx.py installs it for real with pipx.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE
from spa.core.uri import Enrollment, ServiceRef, render
from spa.entry import INSTALL_HINT, OPTIONAL, SERVER_MODULES, missing_line, missing_modules

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"spa": REPO / "spa", "spa_client": REPO / "client" / "spa_client"}
# The server's side of the tree: the client reaches none of it.
SERVER_SIDE = ("spa.server", "spa.backends", "spa.kernel", "spa.store", "spa.cli",
               "spa.entry", "spa.demo", "spa.demo_netns", "spa.netns", "spa.web",
               "spa.admin", "spa.group")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def server_extra() -> list[str]:
    """The `server` extra's distribution names, from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
            for req in project["optional-dependencies"]["server"]]


def module_file(name: str) -> Path | None:
    """The source file of one of our modules, or None (not ours, or a name)."""
    top, _, rest = name.partition(".")
    if top not in ROOTS:
        return None
    base = ROOTS[top].joinpath(*rest.split(".")) if rest else ROOTS[top]
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(source: str) -> list[str]:
    """Every module an import statement names, anywhere in the source (inside
    functions and `if TYPE_CHECKING` too), with `from X import Y` as both X
    and X.Y (Y may be a module)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import: the walk below would miss it"
            base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(start: Iterable[str], read: Callable[[str], str | None]
                 ) -> tuple[set[str], set[str]]:
    """(our modules reached, other top-level modules imported) from `start`.
    `read(name)` returns one of our modules' source, or None if not ours."""
    ours: set[str] = set()
    others: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in ours:
            continue
        source = read(name)
        if source is None:
            continue
        ours.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        for imported in imports_of(source):
            if read(imported) is not None:
                todo.append(imported)
            elif imported.split(".")[0] not in ROOTS and imported != "__future__":
                others.add(imported.split(".")[0])
    return ours, others


def read_repo(name: str) -> str | None:
    path = module_file(name)
    return path.read_text() if path is not None else None


def client_modules() -> list[str]:
    return sorted(f"spa_client.{p.stem}" for p in ROOTS["spa_client"].glob("*.py"))


def test_server_modules_name_the_server_extra() -> None:
    assert {normalize(n) for n in SERVER_MODULES} == {normalize(n) for n in server_extra()}


def test_server_modules_are_what_each_distribution_installs() -> None:
    """Installed here with the server extra: each module belongs to its distribution."""
    installed = importlib.metadata.packages_distributions()
    for dist, module in SERVER_MODULES.items():
        owners = {normalize(d) for d in installed.get(module, [])}
        assert normalize(dist) in owners, f"{module} is not installed by {dist}: {owners}"


def test_client_import_graph_reaches_no_server_library() -> None:
    ours, others = import_graph(client_modules(), read_repo)
    assert {"spa_client.cli", "spa.core.wire", "spa.clitools", "spa.core.verify"} <= ours
    assert not others & set(SERVER_MODULES.values()), others
    assert not [m for m in ours if m.startswith(tuple(f"{s}." for s in SERVER_SIDE))
                or m in SERVER_SIDE]
    stdlib = set(sys.stdlib_module_names)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    client_libs = {"nacl", "pyotp", "typer", "platformdirs",  # the dependencies
                   "click",  # typer's (or vendored as typer._click): clitools tries both
                   "zxingcpp", "PIL"}  # the `qr` extra, imported only by --qr-image
    assert len(project["dependencies"]) == 4, "a new client dependency: add it above"
    assert others - stdlib <= client_libs, others - stdlib


def test_the_walk_catches_a_server_library_imported_inside_a_function() -> None:
    sources = {"spa_client.x": "from spa_client import y\n",
               "spa_client.y": "def f():\n    from spa.core import z\n",
               "spa.core": "", "spa.core.z": "import tomlkit.items\n", "spa": ""}
    ours, others = import_graph(["spa_client.x"], sources.get)
    assert ours == set(sources)
    assert others == {"tomlkit"}


BLOCK = """
import importlib.abc, sys
BLOCKED = tuple(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[2:]
"""
CLIENT_BLOCKS = (*SERVER_MODULES.values(), *SERVER_SIDE)


def run_blocked(blocked: Iterable[str], code: str, *argv: str
                ) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new interpreter where `blocked` modules cannot be imported."""
    return subprocess.run([sys.executable, "-c", BLOCK + code, ",".join(blocked), "prog", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


def test_blocking_catches_a_server_import() -> None:
    """The harness works: importing a blocked module fails in it."""
    for module, blocked in (("spa.server.admin", "spa.server"), ("tomlkit.items", "tomlkit")):
        done = run_blocked(CLIENT_BLOCKS, f"import {module}")
        assert done.returncode != 0
        assert f"No module named '{blocked}'" in done.stderr


CLIENT_RUN = """
import importlib, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
sys.argv = ["spa-client", *sys.argv[2:]]
from spa_client.cli import main
main()
"""


def test_the_client_runs_without_the_server_libraries(tmp_path: Path) -> None:
    modules = ",".join(client_modules())
    shown = run_blocked(CLIENT_BLOCKS, CLIENT_RUN, modules, "--help")
    assert shown.returncode == 0, shown.stderr
    assert "Usage: spa-client" in shown.stdout
    uri = render(Enrollment(host="127.0.0.1", port=62201, server_id=b"\x01" * SERVER_ID_SIZE,
                            client="alice", secret=b"\x02" * MASTER_SECRET_SIZE,
                            services=(ServiceRef("ssh", "tcp", 22),)))
    config = str(tmp_path / "client")
    enrolled = run_blocked(CLIENT_BLOCKS, CLIENT_RUN, modules,
                           "--config-dir", config, "enroll", uri, "--name", "srv")
    assert enrolled.returncode == 0, enrolled.stderr
    listed = run_blocked(CLIENT_BLOCKS, CLIENT_RUN, modules,
                         "--config-dir", config, "profiles")
    assert listed.returncode == 0, listed.stderr
    assert "srv" in listed.stdout


SERVER_RUN = """
import sys
sys.argv = ["spa-server", *sys.argv[1:]]
from spa.entry import main
main()
"""


@pytest.mark.parametrize("argv", [["--help"], ["init"], []], ids=["help", "init", "none"])
def test_spa_server_without_its_libraries_says_what_to_install(argv: list[str]) -> None:
    done = run_blocked(["tomlkit"], SERVER_RUN, *argv)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"spa-server: error: no module tomlkit; {INSTALL_HINT}\n"
    assert "Traceback" not in done.stderr


def test_spa_server_names_the_first_missing_module_and_counts_the_rest() -> None:
    done = run_blocked(SERVER_MODULES.values(), SERVER_RUN, "--help")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"spa-server: error: no module tomlkit (and {len(SERVER_MODULES) - 2} more); "
        f"{INSTALL_HINT}"]
    assert INSTALL_HINT == ("spa-server needs the server's libraries: pip install "
                            "'spa[server]' (or install the Debian package: docs/install.md)")


def test_an_optional_library_missing_leaves_spa_server_running() -> None:
    """Without python-iptables (the Debian package only recommends it) spa-server
    runs; the iptables backend says itself what it needs."""
    assert {"iptc"} == OPTIONAL
    assert "iptc" in SERVER_MODULES.values()
    done = run_blocked(OPTIONAL, SERVER_RUN, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: spa-server" in done.stdout


def test_the_check_finds_nothing_missing_where_the_server_extra_is_installed() -> None:
    assert missing_modules() == []
    assert missing_modules({"x": "no_such_module_here", "y": "json"}) == ["no_such_module_here"]
    assert missing_line(["a"]) == f"spa-server: error: no module a; {INSTALL_HINT}"


def test_spa_server_script_runs_the_check() -> None:
    """The installed script is the checking entry point, not spa.cli itself."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["spa-server"] == "spa.entry:main"
    assert json.dumps(project["scripts"]["spa-client"]) == '"spa_client.cli:main"'
