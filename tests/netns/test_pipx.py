"""The client alone, installed as a user would (issue 16): `pipx install` of
this checkout, into a PIPX_HOME and PIPX_BIN_DIR of the test's own (never the
user's).  It holds none of the server's libraries, its spa-client works, its
spa-server says in one line what to install, and it knocks open a real
spa-server (this checkout's .venv) from another namespace.

pipx builds the wheel from the checkout (hatchling, in an isolated build
environment) and installs PyNaCl, pyotp, typer and platformdirs with pip, from
its cache or the index: about 10 s here; the figure is printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from spa.entry import INSTALL_HINT
from tests.netns.conftest import SRV4, Spa
from tests.netns.test_ssh_e2e import tcp_open

pytestmark = pytest.mark.pipx

REPO = Path(__file__).resolve().parents[2]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: Iterable[str]) -> set[str]:
    """The distributions `names` bring, read from this environment's metadata
    (requirements without extras and markers that hold here)."""
    seen: set[str] = set()
    todo = [normalize(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def extra(name: str) -> list[str]:
    """The distribution names of one of spa's extras ('' for the client's own)."""
    found = []
    for text in metadata.requires("spa") or []:
        req = Requirement(text)
        in_extra = req.marker is not None and req.marker.evaluate({"extra": name})
        if (req.marker is None and not name) or (name and in_extra):
            found.append(req.name)
    return found


@dataclass
class Pipx:
    bin: Path
    venv: Path
    seconds: float

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / program), *args], capture_output=True, text=True,
                              timeout=60, check=False)


@pytest.fixture(scope="module")
def pipx(tmp_path_factory: pytest.TempPathFactory) -> Pipx:
    program = shutil.which("pipx")
    if program is None:
        pytest.skip("needs pipx (apt-get install pipx; bash scripts/setup.sh --test does)")
    root = tmp_path_factory.mktemp("pipx")
    root.chmod(0o755)
    env = {**os.environ, "PIPX_HOME": str(root / "home"), "PIPX_BIN_DIR": str(root / "bin"),
           "USE_EMOJI": "0"}
    started = time.monotonic()
    done = subprocess.run([program, "install", str(REPO)], capture_output=True, text=True,
                          timeout=280, check=False, env=env)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    return Pipx(root / "bin", root / "home" / "venvs" / "spa", seconds)


def test_pipx_installs_the_client_alone(pipx: Pipx, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\n  pipx install {REPO.name}: {pipx.seconds:.1f} s")
    listed = subprocess.run(
        [str(pipx.venv / "bin" / "python"), "-c",
         "import importlib.metadata as m, json, sysconfig; "  # its own, not pipx's shared libs
         "own = [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]; "
         "print(json.dumps(sorted({d.metadata['Name'] for d in m.distributions(path=own)})))"],
        capture_output=True, text=True, timeout=30, check=True)
    installed = {normalize(name) for name in json.loads(listed.stdout)}
    client = closure(["spa"])  # spa without extras: the client's libraries
    server_only = closure(extra("server")) - client
    assert "spa" in installed and "pynacl" in installed
    assert not installed & server_only, installed & server_only
    assert installed <= client, installed - client


def test_the_pipx_client_imports_nothing_of_the_server(pipx: Pipx) -> None:
    shown = pipx.run("spa-client", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "Usage: spa-client" in shown.stdout
    code = ("import importlib, pkgutil, sys, spa_client\n"
            "for m in pkgutil.iter_modules(spa_client.__path__):\n"
            "    importlib.import_module('spa_client.' + m.name)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    done = subprocess.run([str(pipx.venv / "bin" / "python"), "-c", code], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "spa_client.cli" in loaded and "spa.core.wire" in loaded
    assert not [m for m in loaded if m.startswith(("spa.server", "spa.backends", "spa.kernel",
                                                   "spa.store", "tomlkit", "cryptography"))]


def test_the_pipx_spa_server_says_what_to_install(pipx: Pipx) -> None:
    for args in (["--help"], ["run"]):
        done = pipx.run("spa-server", *args)
        assert done.returncode == 2
        assert done.stdout == ""
        assert re.fullmatch(rf"spa-server: error: no module tomlkit \(and \d+ more\); "
                            rf"{re.escape(INSTALL_HINT)}\n", done.stderr), done.stderr


def test_the_pipx_client_knocks_open_a_real_server(pipx: Pipx, spa: Spa, tmp_path: Path
                                                   ) -> None:
    world = spa.world
    spa.start()
    uri = spa.enroll("alice", SRV4, "ssh")
    client = [str(pipx.bin / "spa-client"), "--config-dir", str(tmp_path / "pipx-client")]
    enrolled = world.cli.run(*client, "enroll", uri, "--name", "srv", check=False)
    assert enrolled.returncode == 0, enrolled.stderr
    assert not tcp_open(world, "cli", SRV4, 22), "ssh hidden before the knock"
    opened = world.cli.run(*client, "open", "ssh", "srv", check=False)
    assert opened.returncode == 0, opened.stdout + opened.stderr
    assert tcp_open(world, "cli", SRV4, 22), "ssh open after the pipx client's knock"
    assert spa.wait_for("accepted "), spa.lines
    accepted = [line for line in spa.lines if line.startswith("accepted ")]
    assert any("client=alice" in line for line in accepted), spa.lines
