"""The namespace world: a server with a real sshd and a TLS service, a
client, an attacker, and two users behind a masquerading router.

Built once per test session (namespaces, sshd, TLS server); each test gets a
fresh spa-server with its own state and removes our nftables table after it.
Skipped, with the reason, only where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spa.netns import Namespace, Sshd, Topology, can_make_namespaces, sh, start_sshd
from spa.server.logline import event_of
from tests.integration.procs import command

HERE = Path(__file__).resolve().parent
KNOCK_PORT = 62201
SRV4, CLI4, ATT4 = "10.199.1.1", "10.199.1.2", "10.199.2.2"
SRV6, CLI6 = "fd00:199:1::1", "fd00:199:1::2"
SRV_ATT4 = "10.199.2.1"
SRV_NAT4, ROUTER4 = "10.199.3.1", "10.199.3.2"

REASON = can_make_namespaces()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns/" in str(item.fspath):
            item.add_marker(pytest.mark.netns)
            if REASON is not None:
                item.add_marker(pytest.mark.skip(reason=REASON))


@dataclass
class World:
    topo: Topology
    srv: Namespace
    cli: Namespace
    att: Namespace
    router: Namespace
    nat1: Namespace
    nat2: Namespace
    root: Path
    srv_links: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    sshd: Sshd | None = None

    @property
    def sshd_log(self) -> Path:
        assert self.sshd is not None
        return self.sshd.log

    def sshd_login(self, host: str, remote: str, timeout: float = 4) -> list[str]:
        """argv of a key login as root to the namespace's sshd."""
        assert self.sshd is not None
        return self.sshd.login_argv(host, remote, timeout=int(timeout))

    def ssh(self, ns: Namespace, host: str, remote: str, timeout: float = 4
            ) -> subprocess.CompletedProcess[str]:
        return ns.run(*self.sshd_login(host, remote, timeout), check=False,
                      timeout=timeout + 30)


def _start_services(world: World) -> None:
    root = world.root
    world.sshd = start_sshd(world.srv, root)
    world.procs.append(world.sshd.process)
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
       "-nodes", "-subj", "/CN=spa-test", "-days", "1", "-keyout", str(root / "tls.key"),
       "-out", str(root / "tls.crt"))
    tls = world.srv.popen([sys.executable, str(HERE / "tls_server.py"), str(root / "tls.crt"),
                           str(root / "tls.key"), "443"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    world.procs.append(tls)
    assert tls.stdout is not None
    assert tls.stdout.readline().strip() == "listening"


@contextlib.contextmanager
def open_world(root: Path) -> Iterator[World]:
    """Namespaces, links, sshd and the TLS service; all removed afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    topo = Topology()
    started: list[subprocess.Popen[str]] = []
    try:
        srv, cli, att = topo.ns("srv"), topo.ns("cli"), topo.ns("att")
        router, nat1, nat2 = topo.ns("rtr"), topo.ns("nat1"), topo.ns("nat2")
        w = World(topo, srv, cli, att, router, nat1, nat2, root, procs=started)
        srv_cli, _ = topo.link(srv, [f"{SRV4}/24", f"{SRV6}/64"], cli,
                               [f"{CLI4}/24", f"{CLI6}/64"])
        srv_att, _ = topo.link(srv, [f"{SRV_ATT4}/24", "fd00:199:2::1/64"], att,
                               [f"{ATT4}/24", "fd00:199:2::2/64"])
        srv_nat, router_up = topo.link(srv, [f"{SRV_NAT4}/24"], router, [f"{ROUTER4}/24"])
        topo.link(router, ["10.199.4.1/24"], nat1, ["10.199.4.2/24"])
        topo.link(router, ["10.199.5.1/24"], nat2, ["10.199.5.2/24"])
        w.srv_links = {"cli": srv_cli, "att": srv_att, "nat": srv_nat}
        for ns, gateway in ((nat1, "10.199.4.1"), (nat2, "10.199.5.1")):
            ns.run("ip", "route", "add", "default", "via", gateway)
        router.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        router.run("nft", f"add table ip nat; add chain ip nat post {{ type nat hook "
                   f"postrouting priority srcnat; }}; add rule ip nat post oifname "
                   f"{router_up} masquerade")
        _start_services(w)
        yield w
    finally:
        for proc in started:
            proc.kill()
        topo.cleanup()


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if REASON is not None:
        pytest.skip(REASON)
    with open_world(tmp_path_factory.mktemp("netns")) as w:
        yield w


@dataclass
class Spa:
    """One spa-server in the server namespace, with its config and clients."""

    world: World
    root: Path
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    stamped: list[str] = field(default_factory=list)  # every start's lines, each when read

    @property
    def config(self) -> Path:
        return self.root / "server.toml"

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self.world.srv.run(*command("spa-server"), "--config", str(self.config), *args,
                                  check=False)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def start(self, *args: str, prefix: tuple[str, ...] = (), timeout: float = 10) -> Spa:
        self.lines = []
        self.proc = self.world.srv.popen(
            [*prefix, *command("spa-server"), "--config", str(self.config), "run", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        assert self.wait_for("started ", timeout), self.lines
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # as the journal keeps them: the event, no time
            self.lines.append(event_of(line.rstrip("\n")))
            self.stamped.append(f"{time.time():.6f} {line.rstrip()}")

    def wait_for(self, prefix: str, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.lines):
                return True
            time.sleep(0.05)
        return False

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=15)
        self.proc = None
        return code

    def enroll(self, name: str, endpoint: str, *services: str,
               options: tuple[str, ...] = ()) -> str:
        """Enroll NAME (with more `options` for enroll); with the server
        running, wait until it has loaded the client, so a test's first knock
        is the one the server judges."""
        args = [a for s in services for a in ("--service", s)]
        reloads = self._count("reloaded ")
        uri = self.admin("enroll", name, *args, "--endpoint", endpoint, "--uri-only",
                         *options).stdout.strip()
        if self.proc is not None and self.proc.poll() is None:
            deadline = time.monotonic() + 10
            while self._count("reloaded ") == reloads:
                assert time.monotonic() < deadline, self.lines
                time.sleep(0.05)
        return uri

    def status_once_it_shows(self, text: str, timeout: float = 3) -> str:
        """`status`, once it shows `text` (the gate's state reaches the daemon
        from the gate keeper at its next housekeeping round, 0.2 s)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.admin("status").stdout
            if text in status or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def _count(self, prefix: str) -> int:
        return sum(1 for line in list(self.lines) if line.startswith(prefix))

    def client(self, ns: Namespace, who: str, *args: str, timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
        return ns.run(*command("spa-client"), "--config-dir", str(self.root / f"c-{who}"),
                      *args, check=False, timeout=timeout)

    def events(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = json.loads(self.admin("events", "--json").stdout)
        return rows

    def elements(self, table: str = "spa") -> list[str]:
        """Every grant in our sets (of `table`: an instance's), as `set address`
        (not the drop counters)."""
        return nft_elements(self.world.srv, table)


def nft_elements(ns: Namespace, table: str = "spa") -> list[str]:
    """Every grant in the sets of nftables table inet `table` in `ns`, as
    `set address` (not the drop counters); none where the table is missing."""
    done = ns.run("nft", "-j", "list", "table", "inet", table, check=False)
    if done.returncode != 0:
        return []
    found = []
    for item in json.loads(done.stdout)["nftables"]:
        spec = item.get("set")
        if spec is None or spec["name"].startswith("drops_"):
            continue  # the drop counters are not grants
        for elem in spec.get("elem", []):
            value = elem["elem"]["val"] if isinstance(elem, dict) else elem
            if isinstance(value, dict) and "concat" in value:  # a named gateway's pair
                value = " . ".join(map(str, value["concat"]))
            found.append(f"{spec['name']} {value}")
    return sorted(found)


@contextlib.contextmanager
def open_site(world: World, root: Path) -> Iterator[Spa]:
    """A configured (not started) spa-server in the world's server namespace;
    killed and its table removed afterwards."""
    root.mkdir(parents=True, exist_ok=True)
    site = Spa(world, root)
    site.admin("init", "--listen-port", str(KNOCK_PORT), "--state-dir", str(root / "state"),
               "--service", "ssh", "--service", "https")
    try:
        yield site
    finally:
        site.stop(signal.SIGKILL)
        world.srv.run("nft", "delete", "table", "inet", "spa", check=False)
        os.sync()


@pytest.fixture
def spa(world: World, tmp_path: Path) -> Iterator[Spa]:
    with open_site(world, tmp_path) as site:
        yield site


@pytest.fixture
def checkout_reachable_by_others() -> Iterator[None]:
    """Tests that run spa-server as another user (uid 65534) need to reach this
    checkout's .venv.  A clone in a private directory (mktemp -d is 0700) is
    not: give the missing search (x, not read) permission on its ancestors for
    the test's duration, and put the modes back afterwards."""
    changed: list[tuple[Path, int]] = []
    try:
        # the console script's directories: .venv/bin, .venv, the checkout
        # (the editable install's sources), and everything above it
        for directory in reversed(Path(command("spa-server")[0]).absolute().parents):
            mode = directory.stat().st_mode
            if not mode & 0o001:
                changed.append((directory, mode))
                directory.chmod((mode & 0o7777) | 0o001)
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode & 0o7777)
