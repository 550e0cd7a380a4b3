"""README's first command, `bash scripts/setup.sh && .venv/bin/spa-server
demo`, installs what the demo needs and no more (issue 16); the test suite's
programs come with `bash scripts/setup.sh --test`.

Packages cannot be uninstalled here to try it, so the demo's programs are read
from the code: every program (argv[0]) and shared library that the demo and
the server it runs can execute or load, found in the import graph of
spa.demo, spa.demo_netns and spa.cli.  Each must come from a package in
setup.sh's DEMO_PACKAGES (or an essential one); dpkg confirms the map where
it is installed.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_client_alone import import_graph, module_file, read_repo

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "setup.sh"

# What the demo and its server run, and the Debian package each comes from.
PROGRAM_PACKAGE = {
    "ip": "iproute2",
    "sysctl": "procps",
    "kill": "procps",
    "nft": "nftables",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sshd": "openssh-server",
    "/usr/sbin/sshd": "openssh-server",
    "python3": "python3",  # sys.executable: the venv's, made from Debian's python3
    "lib:nftables": "libnftables1",  # ctypes: libnftables.so.1 (find_library("nftables"))
    "lib:c": "libc6",
}
ESSENTIAL = {"libc6"}  # on every Debian system: nothing to install
# Modules the demo never runs, with the programs they would add.
NOT_THE_DEMO = {
    "spa.backends.iptables": "the iptables backend (the demo uses nftables)",
    # `gate --remove` (the Debian package's removal, branch deb): ipsets and
    # iptables-legacy only where the kernel has them
    "spa.backends.teardown": "spa-server gate --remove",
}
EXEC = {"sh", "run", "popen", "Popen", "which", "check_output", "check_call", "call",
        "execv", "execvp"}


def call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def first_string(node: ast.expr) -> str | None:
    """A string constant, or the first element of a list or tuple of them."""
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        node = node.elts[0]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.executable":
        return "python3"
    return None


def programs_in(source: str) -> set[str]:
    """Programs and libraries a module runs or loads, read from its AST."""
    found: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            name, arg = call_name(node), node.args[0]
            if name in EXEC and (program := first_string(arg)) is not None:
                found.add(program)
            elif name in {"CDLL", "find_library"} and (lib := first_string(arg)) is not None:
                found.add("lib:" + re.sub(r"^lib|\.so.*$", "", lib))
        elif isinstance(node, ast.FunctionDef) and node.name.endswith("argv"):
            for ret in ast.walk(node):  # def login_argv(...): return ["ssh", ...]
                if isinstance(ret, ast.Return) and ret.value is not None and (
                        program := first_string(ret.value)) is not None:
                    found.add(program)
        elif isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple | ast.List):
            loop = ast.unparse(node.target)
            if any(isinstance(c, ast.Call) and call_name(c) == "which"
                   and ast.unparse(c.args[0]) == loop for c in ast.walk(node) if
                   isinstance(c, ast.Call) and c.args):
                found |= {e.value for e in node.iter.elts
                          if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        elif isinstance(node, ast.arguments):
            named = [*node.posonlyargs, *node.args][-len(node.defaults):] if node.defaults else []
            for arg_node, default in zip(named, node.defaults, strict=True):
                if arg_node.arg == "program" and (program := first_string(default)):
                    found.add(program)
    return found


def demo_modules() -> list[str]:
    ours, _ = import_graph(["spa.demo", "spa.demo_netns", "spa.cli"], read_repo)
    return sorted(m for m in ours if m not in NOT_THE_DEMO)


def demo_programs() -> dict[str, set[str]]:
    """program -> the modules that run it."""
    found: dict[str, set[str]] = {}
    for module in demo_modules():
        path = module_file(module)
        assert path is not None
        for program in programs_in(path.read_text()):
            found.setdefault(program, set()).add(module)
    return found


def bash_array(name: str) -> list[str]:
    """The words of a bash array in setup.sh (comments dropped)."""
    match = re.search(rf"^{name}=\((.*?)^\)", SETUP.read_text(), re.S | re.M)
    assert match is not None, f"{name} is not in {SETUP}"
    return [w for line in match.group(1).splitlines() for w in line.split("#")[0].split()]


def test_the_scan_finds_what_the_demo_runs() -> None:
    found = demo_programs()
    assert {"ip", "sysctl", "kill", "nft", "ssh", "ssh-keygen", "/usr/sbin/sshd", "sshd",
            "python3", "lib:nftables"} <= set(found), found
    assert "spa.netns" in found["ip"] and "spa.demo_netns" in found["sshd"]


def test_the_scan_catches_a_new_program() -> None:
    source = ("import subprocess, shutil\n"
              "def f(program: str = 'iptables-save'):\n"
              "    subprocess.run(['hydra', '-l'])\n"
              "    ns.run('tcpdump', '-i')\n"
              "    for tool in ('gcc', 'cc'):\n"
              "        shutil.which(tool)\n"
              "def login_argv():\n    return ['chromium', '--headless']\n")
    assert programs_in(source) == {"iptables-save", "hydra", "tcpdump", "gcc", "cc", "chromium"}


def test_every_program_the_demo_runs_comes_from_the_demo_set() -> None:
    demo = set(bash_array("DEMO_PACKAGES")) | ESSENTIAL
    for program, modules in demo_programs().items():
        assert program in PROGRAM_PACKAGE, (
            f"{sorted(modules)} run {program}: add it to PROGRAM_PACKAGE with its Debian "
            "package, and the package to DEMO_PACKAGES in scripts/setup.sh")
        assert PROGRAM_PACKAGE[program] in demo, (
            f"{program} comes from {PROGRAM_PACKAGE[program]}, not in DEMO_PACKAGES")


def test_the_demo_set_holds_none_of_the_test_suites_programs() -> None:
    demo, tests = set(bash_array("DEMO_PACKAGES")), set(bash_array("TEST_PACKAGES"))
    assert not demo & tests
    assert {"chromium", "chromium-driver", "hydra", "nmap", "tcpdump", "fail2ban", "gcc",
            "fwknop-client", "fwknop-server", "pipx", "iptables"} <= tests
    assert demo <= {p for p in PROGRAM_PACKAGE.values()} | {"python3-venv"}


def dpkg_owner(path: str) -> str | None:
    """The package that installed `path` (through usrmerge's /bin -> /usr/bin)."""
    for candidate in dict.fromkeys([path, re.sub(r"^/usr(?=/s?bin/)", "", path)]):
        done = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode == 0:
            return done.stdout.split(":")[0]
    return None


def installed_programs() -> Iterator[tuple[str, str]]:
    for program in PROGRAM_PACKAGE:
        if program.startswith("lib:") or program == "python3":
            continue
        path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
        if path is not None:
            yield program, path


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg (a Debian system)")
def test_dpkg_confirms_the_program_map() -> None:
    checked = 0
    for program, path in installed_programs():
        assert dpkg_owner(path) == PROGRAM_PACKAGE[program], (program, path)
        checked += 1
    assert checked >= 5


def test_setup_refuses_an_unknown_argument() -> None:
    done = subprocess.run(["bash", str(SETUP), "--tests"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr == ("setup: error: unknown argument --tests "
                           "(use: bash scripts/setup.sh [--test])\n")


def readme_commands() -> list[str]:
    """The command lines of README's first code block (the demo, the tests)."""
    block = re.search(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readmes_test_command_and_the_demo_sets_up_less() -> None:
    demo, tests = readme_commands()
    assert demo == "bash scripts/setup.sh && .venv/bin/spa-server demo"
    assert tests == "bash scripts/setup.sh --test && bash scripts/test.sh"
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [tests]
