"""The command backend for real: spa-server in the server namespace drives a
real nftables set in a second namespace playing the router in front of it,
through the router's API (tests/netns/router_agent.py) and the admin's
program (tests/netns/router_cmd.py), run by the gate keeper with no
capability, as the systemd unit's user (uid 65534), or (started as root)
as a throwaway gate-keeper user of its own that owns the config.

    cli 10.197.1.2 --- 10.197.1.1 rtr 10.197.2.1 --- 10.197.2.2 srv (spa-server, sshd)

The router forwards; tcp/22 and tcp/443 to srv pass only from an address in
its set `allowed_ssh` / `allowed_https`.  Leases are 3 s; the module takes
about 40 s.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spa.netns import Namespace, Topology
from tests.netns.conftest import Spa, World

HERE = Path(__file__).resolve().parent
SRV, RTR_DOWN, RTR_UP, CLI = "10.197.2.2", "10.197.2.1", "10.197.1.1", "10.197.1.2"
AGENT = f"http://{RTR_DOWN}:8080"
ROUTER_RULES = f"""
table inet gate {{
  set allowed_ssh {{ type ipv4_addr; }}
  set allowed_https {{ type ipv4_addr; }}
  chain through {{
    type filter hook forward priority 0; policy accept;
    ip daddr {SRV} tcp dport 22 ip saddr @allowed_ssh accept
    ip daddr {SRV} tcp dport 443 ip saddr @allowed_https accept
    ip daddr {SRV} tcp dport {{ 22, 443 }} drop
  }}
}}
"""


@dataclass
class Gateway:
    rtr: Namespace
    cli: Namespace
    spa: Spa
    hang: Path  # names the services whose allow hangs

    def allowed(self, service: str) -> list[str]:
        done = self.rtr.run("nft", "list", "set", "inet", "gate", f"allowed_{service}")
        return re.findall(r"\d+\.\d+\.\d+\.\d+", done.stdout.split("elements", 1)[-1]
                          if "elements" in done.stdout else "")

    def until(self, test: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if test():
                return True
            time.sleep(0.05)
        return False

    def knock(self, service: str, *args: str) -> None:
        done = self.spa.client(self.cli, "alice", "open", service, "srv", "--duration", "3",
                               "--no-wait", *args)
        assert done.returncode == 0, done.stdout + done.stderr


@contextlib.contextmanager
def router_site(world: World, *, listing: bool = True, timeout: float = 1
                ) -> Iterator[Gateway]:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    topo = Topology()
    root = Path(tempfile.mkdtemp(prefix="spa-cmd-"))
    os.chmod(root, 0o755)
    spa = Spa(world, root)
    try:
        rtr, cli = topo.ns("rtr"), topo.ns("cli")
        topo.link(world.srv, [f"{SRV}/24"], rtr, [f"{RTR_DOWN}/24"])
        topo.link(rtr, [f"{RTR_UP}/24"], cli, [f"{CLI}/24"])
        cli.run("ip", "route", "add", "default", "via", RTR_UP)
        world.srv.run("ip", "route", "add", "10.197.1.0/24", "via", RTR_DOWN)
        rtr.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        rtr.run("nft", ROUTER_RULES)
        agent = rtr.popen([sys.executable, str(HERE / "router_agent.py"), RTR_DOWN, "8080"],
                          stdout=subprocess.PIPE)
        assert agent.stdout is not None and agent.stdout.readline().strip() == "listening"
        hang = root / "hang"
        hang.write_text("")
        hang.chmod(0o644)
        spa.admin("init", "--listen-port", "62201", "--state-dir", str(root / "state"),
                  "--service", "ssh", "--service", "https")
        uri = spa.enroll("alice", SRV, "ssh", "https")
        assert spa.client(cli, "alice", "enroll", uri, "--name", "srv").returncode == 0
        base = [sys.executable, "-I", str(HERE / "router_cmd.py"), AGENT, str(hang)]
        def argv(*words: str) -> str:
            return "[" + ", ".join(f'"{w}"' for w in (*base, *words)) + "]"
        text = spa.config.read_text().replace('backend = "nftables"', 'backend = "command"')
        spa.config.write_text(
            text + "\n[command]\n"
            f"allow = {argv('allow', '{address}', '{service}')}\n"
            f"remove = {argv('remove', '{address}', '{service}')}\n"
            + (f"list = {argv('list', '{service}')}\n" if listing else "") +
            f"timeout = {timeout:g}\nretries = 1\nbackoff = 0.2\n")
        (root / "state").mkdir(mode=0o700, exist_ok=True)
        for path in (spa.config, root / "state", *(root / "state").iterdir()):
            os.chown(path, 65534, 65534)
        yield Gateway(rtr, cli, spa, hang)
    finally:
        spa.stop()  # a clean stop: the gate keeper ends with the daemon, nothing left behind
        topo.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def start(gate: Gateway) -> None:
    """As the systemd unit: uid 65534, CAP_NET_RAW only (the capture socket):
    no CAP_NET_ADMIN anywhere, the gate keeper keeps none."""
    gate.spa.start(prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw",
                           "--bounding-set=-all,+net_raw", "--"))


@pytest.fixture(params=[True, False], ids=["with-list", "journal-only"])
def listing(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def gate(world: World, checkout_reachable_by_others: None) -> Iterator[Gateway]:
    with router_site(world) as site:
        yield site


@pytest.fixture
def gate_listing(world: World, checkout_reachable_by_others: None, listing: bool
                 ) -> Iterator[tuple[Gateway, bool]]:
    with router_site(world, listing=listing) as site:
        yield site, listing


def test_command_backend_opens_the_router_and_removes_at_the_end(gate: Gateway) -> None:
    start(gate)
    assert any("gate keeper pid" in line and "no capability" in line.split("gate keeper")[1]
               for line in gate.spa.lines), gate.spa.lines
    assert not _open(gate, 22), "the router hides ssh before the knock"
    gate.knock("ssh")
    assert gate.until(lambda: gate.allowed("ssh") == [CLI], 3), gate.spa.lines
    assert _open(gate, 22), "the router lets the client through"
    assert not _open(gate, 443), "only the service knocked for"
    assert gate.spa.wait_for("lease_end", timeout=6)
    assert gate.until(lambda: gate.allowed("ssh") == [], 3), "the command removed it"
    assert not _open(gate, 22)


def test_command_backend_reconciles_a_crash_at_restart(gate_listing: tuple[Gateway, bool]
                                                       ) -> None:
    """The journal removes what spa added before the crash; the list command
    (when given) also finds a leftover the journal never had."""
    gate, listing = gate_listing
    start(gate)
    gate.knock("ssh")
    assert gate.until(lambda: gate.allowed("ssh") == [CLI], 3), gate.spa.lines
    keeper = next(int(m.group(1)) for line in gate.spa.lines
                  if (m := re.search(r"gate keeper pid (\d+)", line)))
    os.kill(keeper, signal.SIGKILL)  # both parts die: nothing removes it on time
    gate.spa.stop(signal.SIGKILL)
    gate.rtr.run("nft", "add", "element", "inet", "gate", "allowed_https", "{ 10.197.1.99 }")
    time.sleep(3.2)  # the lease ends while nothing runs
    assert gate.allowed("ssh") == [CLI], "still open on the router: the crash left it"
    start(gate)
    assert gate.until(lambda: gate.allowed("ssh") == [], 4), (gate.spa.lines)
    leftover = [] if listing else ["10.197.1.99"]
    assert gate.until(lambda: gate.allowed("https") == leftover, 2), gate.spa.lines


@pytest.fixture
def slow_gate(world: World, checkout_reachable_by_others: None) -> Iterator[Gateway]:
    with router_site(world, timeout=4) as site:  # a hung allow: 4 + 0.2 + 4 s
        yield site


def test_a_hung_router_command_blocks_no_other_grant(slow_gate: Gateway) -> None:
    """The ssh grant goes through while https's allow hangs: well before that
    allow's tries end (8.2 s; the client's own start may take a second or
    two on a loaded machine, hence the long timeout)."""
    gate = slow_gate
    gate.hang.write_text("https\n")
    start(gate)
    gate.knock("https", "--duration", "30")  # (a lease that outlasts the tries)
    knocked = time.monotonic()
    gate.knock("ssh")
    assert gate.until(lambda: gate.allowed("ssh") == [CLI], 4), gate.spa.lines
    assert time.monotonic() - knocked < 4, "the ssh grant waited for the hung command"
    assert not any("service=https" in line for line in gate.spa.lines if "error" in line)
    assert gate.spa.wait_for("error command allow service=https", timeout=6), gate.spa.lines
    assert any("timed out" in line for line in gate.spa.lines)
    assert gate.spa.wait_for("command action=allow reason=gave_up", timeout=8), gate.spa.lines
    assert gate.allowed("https") == []


@contextlib.contextmanager
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    """A system user of its own (unique name, no home, no login), removed
    afterwards with its group."""
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel (passwd)")
    name = f"spagk{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    user = pwd.getpwnam(name)
    try:
        yield user
    finally:
        for status in Path("/proc").glob("[0-9]*/status"):  # a gate keeper left behind
            with contextlib.suppress(OSError, ValueError, IndexError):
                uid = next(line for line in status.read_text().splitlines()
                           if line.startswith("Uid:")).split()[1]
                if int(uid) == user.pw_uid:
                    os.kill(int(status.parent.name), signal.SIGKILL)
        time.sleep(0.2)
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_a_gate_keeper_user_of_its_own_runs_the_commands_the_daemon_cannot(
        gate: Gateway) -> None:
    """The layout docs/backends.md requires for the firewalld recipe: started
    as root, the config owned by a gate-keeper user of its own (the gate
    keeper runs as the config's owner), the journal and the program (with
    whatever credentials it would read) in a directory only that user may
    enter, the state directory the daemon's (uid 65534).  The program runs
    as the gate keeper's user (it writes `id -u`), the daemon runs as 65534,
    and 65534 can neither run the program nor read the journal."""
    with throwaway_user() as keeper_user:
        try:
            root = gate.spa.root
            private = root / "gate"  # the gate keeper's: program, journal, credentials
            private.mkdir(mode=0o700)
            ran = private / "ran-as"
            program = private / "router.sh"
            program.write_text(
                "#!/bin/sh\n"
                f'echo "$(id -u) $1" >> {ran}\n'
            f"grep SigIgn /proc/self/status > {private / 'ignored'}\n"
                f'exec {sys.executable} -I {HERE / "router_cmd.py"} {AGENT} {gate.hang} "$@"\n')
            program.chmod(0o700)
            for path in (private, program):
                os.chown(path, keeper_user.pw_uid, keeper_user.pw_gid)
            text = gate.spa.config.read_text().split("\n[command]\n")[0]
            def argv(*words: str) -> str:
                return "[" + ", ".join(f'"{w}"' for w in (str(program), *words)) + "]"
            gate.spa.config.write_text(
                text + "\n[command]\n"
                f"allow = {argv('allow', '{address}', '{service}')}\n"
                f"remove = {argv('remove', '{address}', '{service}')}\n"
                f"list = {argv('list', '{service}')}\n"
                f'journal = "{private / "command-grants.json"}"\n'
                "timeout = 5\nretries = 1\nbackoff = 0.2\n")
            os.chown(gate.spa.config, keeper_user.pw_uid, keeper_user.pw_gid)
            assert gate.spa.config.stat().st_mode & 0o077 == 0
            assert (root / "state").stat().st_uid == 65534
            gate.spa.start()  # as root, by hand
            assert gate.spa.proc is not None
            keeper = next(int(m.group(1)) for line in gate.spa.lines
                          if (m := re.search(r"gate keeper pid (\d+)", line)))
            assert _uid_of(gate.spa.proc.pid) == 65534, "the daemon: the state directory's owner"
            assert _uid_of(keeper) == keeper_user.pw_uid, "the gate keeper: the config's owner"
            gate.knock("ssh")
            assert gate.until(lambda: gate.allowed("ssh") == [CLI], 5), gate.spa.lines
            assert _open(gate, 22)
            journal = private / "command-grants.json"
            assert journal.stat().st_uid == keeper_user.pw_uid
            assert journal.stat().st_mode & 0o777 == 0o600
            assert CLI in journal.read_text()
            assert not (root / "state" / "command-grants.json").exists()
            ran_as = ran.read_text().split()
            assert ran_as[0::2] == [str(keeper_user.pw_uid)] * (len(ran_as) // 2), ran_as
            assert "allow" in ran_as[1::2] and "list" in ran_as[1::2]
            ignored = int((private / "ignored").read_text().split()[1], 16)
            hup_int_term = 1 << signal.SIGHUP - 1 | 1 << signal.SIGINT - 1 | 1 << signal.SIGTERM - 1
            assert not ignored & hup_int_term, "the program inherited the gate keeper's SIG_IGN"
            as_daemon = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
            tried = gate.spa.world.srv.run(*as_daemon, str(program), "allow", "10.197.1.77", "ssh",
                                           check=False)
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, tried
            assert "10.197.1.77" not in gate.allowed("ssh")
            assert gate.spa.world.srv.run(*as_daemon, "cat", str(journal),
                                          check=False).returncode != 0
            assert gate.spa.wait_for("lease_end", timeout=6)
            assert gate.until(lambda: gate.allowed("ssh") == [], 5), gate.spa.lines
            assert ran.read_text().split()[-1] == "remove"
            assert ran.read_text().split()[0::2] == [str(keeper_user.pw_uid)] * len(
                ran.read_text().split()[0::2])
        finally:
            gate.spa.stop()  # before the user goes: userdel refuses a user with processes


def _open(gate: Gateway, port: int) -> bool:
    code = (f"import socket,sys\ns=socket.socket()\ns.settimeout(1.0)\n"
            f"sys.exit(s.connect_ex(({SRV!r},{port})))")
    return gate.cli.run(sys.executable, "-c", code, check=False).returncode == 0
