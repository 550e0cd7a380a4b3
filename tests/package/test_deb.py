"""The Debian package (issue 16): built from this checkout (or SPA_DEB=path),
installed with apt-get on this machine, used only through /usr/bin, purged.

What a user of the .deb meets: both programs work and carry spa's metadata,
installing starts and enables nothing, the installed units verify, a knock
with the installed spa-client opens ssh on a server run by the installed
spa-server (network namespaces), and purge leaves no file of the package, no
/etc/spa or /var/lib/spa and no firewall state (the purge runs in a
namespace whose firewall spa-server gate closed); a removal while a
spa-server still runs fails and leaves spa installed.  The machine is left as it
was: the packages apt-get pulled in for it are purged again, and the user
`spa` is removed if the test made it (the package itself keeps it on purge,
as Debian does with system users).  Marked `netns` and `package`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spa.netns import Namespace, Topology, can_make_namespaces
from tests.netns import conftest as netns_world
from tests.netns.conftest import SRV4, open_site, open_world
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open

pytestmark = [pytest.mark.netns, pytest.mark.package]

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
UNITS = ("spa-server.service", "spa-gate.service", "spa-dashboard.service")
TEMPLATES = ("spa-server@.service", "spa-gate@.service")  # verified as instances
UNIT_DIR = Path("/lib/systemd/system")
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300"]


def why_not() -> str | None:
    reason = can_make_namespaces()
    if reason is not None:
        return reason
    if shutil.which("apt-get") is None or shutil.which("dpkg-query") is None:
        return "needs apt-get and dpkg (a Debian machine)"
    if installed_packages() & {"spa"}:
        return "the package spa is installed already; the test would purge it"
    for path in (Path("/etc/spa"), Path("/var/lib/spa")):
        if path.exists():
            return f"{path} exists; the test's purge would delete it"
    return None


def run(*argv: str, timeout: float = 300, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=APT_ENV,
                          check=False, cwd=cwd)
    if check:
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done


def installed_packages() -> set[str]:
    done = run("dpkg-query", "-W", "-f", "${Package} ${Status}\n")
    return {line.split()[0] for line in done.stdout.splitlines() if line.endswith(" installed")}


def left_configured(name: str) -> bool:
    """Removed but not purged (dpkg status `deinstall ok config-files`)."""
    done = run("dpkg-query", "-W", "-f", "${Status}", name, check=False)
    return done.returncode == 0 and done.stdout.endswith(" config-files")


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@dataclass
class Installed:
    deb: Path
    files: list[Path]  # dpkg -L spa
    new_paths: set[Path]  # of those, the ones that were not there before
    pulled_in: set[str]  # packages apt-get installed with it
    user_was_there: bool
    timings: dict[str, float] = field(default_factory=dict)
    purged: bool = False


def build(out: Path) -> Path:
    """SPA_DEB, or a .deb built now from this checkout."""
    given = os.environ.get("SPA_DEB")
    if given:
        return Path(given).resolve()
    done = run("bash", str(ROOT / "scripts" / "build-deb.sh"), str(out), timeout=600)
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.name == f"spa_{VERSION}_all.deb", done.stdout
    return deb


def purge(ns: Namespace | None = None) -> subprocess.CompletedProcess[str]:
    argv = [*APT, "purge", "spa"]
    return run(*(ns.argv(*argv) if ns is not None else argv), check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    started = time.monotonic()
    deb = build(tmp_path_factory.mktemp("deb"))
    built = time.monotonic()
    before = installed_packages()
    user_was_there = user_exists("spa")
    files = [Path(path) for path in _contents(deb)]
    existed = {path for path in files if path.exists() or path.is_symlink()}
    info: Installed | None = None
    try:
        run(*APT, "install", "--no-install-recommends", f"./{deb.name}", cwd=deb.parent)
        info = Installed(deb, files, set(files) - existed, installed_packages() - before - {"spa"},
                         user_was_there)
        info.timings = {"build": built - started, "install": time.monotonic() - built}
        yield info
    finally:
        if "spa" in installed_packages() or left_configured("spa"):
            purge()  # also a package a failed test only removed (its conffiles stay)
        pulled_in = info.pulled_in if info is not None else set()
        if pulled_in:
            run(*APT, "purge", *sorted(pulled_in), check=False)
        if not user_was_there:
            remove_user("spa")
        if info is not None:
            sys.stderr.write(f"\ndeb timings: {info.timings}\n")


def remove_user(name: str, seconds: float = 15) -> None:
    """userdel, once no process of the user is left (the gate keeper of a
    killed daemon takes a moment to end)."""
    deadline = time.monotonic() + seconds
    while user_exists(name):
        if run("userdel", name, check=False).returncode == 0:
            return
        if time.monotonic() > deadline:
            sys.stderr.write(f"\nwarning: could not remove the user {name} (still in use)\n")
            return
        time.sleep(0.2)


def _contents(deb: Path) -> list[str]:
    """The paths the package installs (dpkg-deb -c), as absolute paths."""
    lines = run("dpkg-deb", "-c", str(deb)).stdout.splitlines()
    paths = []
    for line in lines:
        name = line.split(None, 5)[5].split(" -> ")[0]
        path = "/" + name.removeprefix("./").rstrip("/")
        if path != "/":
            paths.append(path)
    return paths


def test_both_programs_work_from_usr_bin_and_installing_starts_nothing(
        installed: Installed) -> None:
    for program in ("spa-server", "spa-client"):
        done = run(f"/usr/bin/{program}", "--help")
        assert f"Usage: {program}" in done.stdout
    for program in ("spa-server", "spa-client"):
        done = run(f"/usr/bin/{program}", "--version")
        assert done.stdout.startswith(f"{program} {VERSION} (protocol spa1"), done.stdout
    assert user_exists("spa"), "the sysusers entry made the user"
    assert not Path("/etc/spa/server.toml").exists()
    enabled = [link for link in Path("/etc/systemd/system").rglob("spa-*")]
    assert enabled == [], "installing enables nothing"
    jail = Path("/etc/fail2ban/jail.d/spa-server.conf").read_text()
    assert "enabled  = false" in jail and "enabled  = true" not in jail
    assert Path("/etc/fail2ban/filter.d/spa-server.conf").exists()
    assert Path("/usr/share/doc/spa/examples/server.toml.example").exists()


def test_the_installed_units_verify_and_their_documentation_is_shipped(
        installed: Installed, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (apt-get install systemd)")
    units = [UNIT_DIR / unit for unit in UNITS]
    assert Path("/usr/share/man/man8/spa-server.8.gz").is_file()
    assert Path("/usr/share/man/man1/spa-client.1.gz").is_file()
    assert Path("/usr/share/bash-completion/completions/spa-server").is_file()
    assert Path("/usr/share/zsh/vendor-completions/_spa-client").is_file()
    # --man=yes: each Documentation=man:... names a page the package installs
    done = run("systemd-analyze", "verify", "--man=yes", *map(str, units), check=False)
    assert done.returncode == 0, done.stderr
    # a template verifies as an instance of it: spa-server@site1.service
    instances = [Path(shutil.copy(UNIT_DIR / t, tmp_path / t.replace("@", "@site1")))
                 for t in TEMPLATES]
    done = run("systemd-analyze", "verify", "--man=yes", *map(str, instances), check=False)
    assert done.returncode == 0, done.stderr
    for unit in units + [UNIT_DIR / t for t in TEMPLATES]:
        text = unit.read_text()
        assert "ExecStart=/usr/bin/spa-server " in text
        for word in text.split("Documentation=", 1)[1].splitlines()[0].split():
            if word.startswith("file://"):
                assert Path(word.removeprefix("file://")).is_file(), word


def test_a_knock_with_the_installed_client_opens_ssh_on_the_installed_server(
        installed: Installed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The netns world of tests/netns, every spa program from /usr/bin."""
    monkeypatch.setattr(netns_world, "command", lambda program: [f"/usr/bin/{program}"])
    with open_world(tmp_path / "world") as world, open_site(world, tmp_path / "site") as spa:
        spa.start()
        assert spa.proc is not None and "/usr/bin/spa-server" in list(spa.proc.args)  # type: ignore[arg-type]
        enroll_alice(spa)
        assert not tcp_open(world, "cli", SRV4, 22), "ssh hidden before the knock"
        done = spa.client(world.cli, "alice", "open", "ssh", "srv")
        assert done.returncode == 0, done.stdout + done.stderr
        login = world.ssh(world.cli, SRV4, "echo knocked-with-the-deb")
        assert login.stdout.strip() == "knocked-with-the-deb", login.stderr


def test_a_removal_while_spa_server_runs_fails_and_spa_stays_installed(
        installed: Installed, tmp_path: Path) -> None:
    """From the review: prerm warned and let the removal go on, deleting
    spa-server while spa's tables still closed ports.  A daemon the removal
    could not stop (policy-rc.d; here one started by hand, in a namespace)
    owns its hold table: prerm fails in one line, dpkg runs postinst
    abort-remove, and spa stays installed with its gate in place."""
    topo = Topology()
    proc: subprocess.Popen[str] | None = None
    try:
        ns = topo.ns("busy")
        config = tmp_path / "server.toml"
        ns.run("/usr/bin/spa-server", "--config", str(config), "init", "--service", "ssh",
               "--state-dir", str(tmp_path / "state"))
        proc = ns.popen(["/usr/bin/spa-server", "--config", str(config), "run"],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while "table inet spa_hold" not in ns.run("nft", "list", "tables").stdout:
            assert proc.poll() is None and time.monotonic() < deadline, "no hold table"
            time.sleep(0.1)
        done = run(*ns.argv(*APT, "remove", "spa"), check=False)
        said = done.stdout + done.stderr
        assert done.returncode != 0, said
        assert "spa: not removed: spa's firewall rules are still there and close ports " \
            "(could not remove table inet spa_hold: " in said, said
        assert "spa stays installed: fix that, then run apt-get remove spa again" in said
        assert "spa" in installed_packages()
        assert run("dpkg-query", "-W", "-f", "${Status}", "spa").stdout.endswith(
            " ok installed"), "postinst abort-remove put it back"
        assert Path("/usr/bin/spa-server").exists()
        tables = ns.run("nft", "list", "tables").stdout
        assert "table inet spa_hold" in tables, tables
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=15)
        topo.cleanup()


def test_purge_leaves_no_file_no_state_and_no_firewall_rule(installed: Installed) -> None:
    """The removal runs in a namespace whose ports `spa-server gate` closed
    with the default config and state paths: afterwards no spa table is
    left there, and nothing of the package, /etc/spa or /var/lib/spa."""
    topo = Topology()
    try:
        ns = topo.ns("pkg")
        ns.run("/usr/bin/spa-server", "init", "--service", "ssh")
        ns.run("/usr/bin/spa-server", "gate")
        assert "table inet spa" in ns.run("nft", "list", "tables").stdout
        assert Path("/var/lib/spa").is_dir()
        started = time.monotonic()
        done = purge(ns)
        installed.timings["purge"] = time.monotonic() - started
        assert done.returncode == 0, done.stdout + done.stderr
        installed.purged = True
        assert "table inet spa" not in ns.run("nft", "list", "tables").stdout
        assert not ns.run("nft", "list", "tables").stdout.strip()
    finally:
        topo.cleanup()
    assert "spa" not in installed_packages()
    left = sorted(str(path) for path in installed.new_paths
                  if path.exists() or path.is_symlink())
    assert left == []
    for path in ("/etc/spa", "/var/lib/spa", "/usr/lib/spa"):
        assert not Path(path).exists(), path
    with contextlib.suppress(FileNotFoundError):
        assert not list(Path("/etc/systemd/system").rglob("spa-*"))
