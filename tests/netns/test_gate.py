"""Issue 12: the gate is right on real hosts, both ways.

Never shut on its users (an idle server still opens: test_silence.py, which
waits through one silence for this and issue 14), never open to strangers (the
host's firewall reloaded, the daemon killed or restarted).  Real spa-server,
nftables, sshd and ssh in namespaces.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spa.server.state import StateDir
from tests.integration import procs
from tests.netns.conftest import ATT4, CLI4, SRV4, SRV_ATT4, Spa, World
from tests.netns.gatetrace import TRACE_TABLE, GateTrace
from tests.netns.test_ssh_e2e import enroll_alice, tcp_open

HERE = Path(__file__).resolve().parent

class Prober:
    """The attacker probing tcp/22 every 10 ms from its own namespace."""

    def __init__(self, world: World, seconds: float, host: str = SRV_ATT4,
                 port: int = 22) -> None:
        self.proc = world.att.popen([sys.executable, str(HERE / "syn_probe.py"), host, str(port),
                                     "0.01", str(seconds)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "probing"

    def result(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=60)
        found: dict[str, Any] = json.loads(out)
        return found


def hold(spa: Spa, setting: str) -> None:
    """[server] hold_table = SETTING."""
    spa.config.write_text(spa.config.read_text().replace(
        "flush_on_stop = false", f'hold_table = "{setting}"\nflush_on_stop = false'))


@pytest.mark.parametrize("setting", ["auto", "off"])
@pytest.mark.parametrize("command", [("flush", "ruleset"), ("delete", "table", "inet", "spa")],
                         ids=["flush-ruleset", "delete-table"])
def test_the_gate_is_put_back_at_once_with_the_users_lease(spa: Spa, command: tuple[str, ...],
                                                          setting: str) -> None:
    """Issue 12: `nft flush ruleset` (what `systemctl restart nftables` does
    with Debian's default file) or `nft delete table inet spa` once left ssh
    open to everyone until a restart.  Now the daemon hears the kernel's
    change notification and puts the table back within milliseconds, and in
    the meantime its owned hold table (which neither command can touch)
    keeps the gate: an attacker probing every 10 ms gets nothing through
    (the issue allows 2), the user's live lease is back, and the log and
    `status` say what happened.  With hold_table = "off" the window is the
    repair's, which the kernel holds back behind the flush's own commit
    (2-35 ms, docs/benchmarks.md): at most 5 probes here (the issue asked
    for 2, which the hold table does better than)."""
    world = spa.world
    hold(spa, setting)
    spa.start()
    holds = setting != "off"
    enroll_alice(spa)
    assert spa.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "120"
                      ).returncode == 0
    prober = Prober(world, 3.0)
    time.sleep(1.0)
    world.srv.run("nft", *command)
    probes = prober.result()
    assert probes["sent"] > 200, probes
    if holds:
        assert probes["opened"] == [], probes
        assert "table inet spa_hold" in world.srv.run("nft", "list", "tables").stdout
    else:
        assert len(probes["opened"]) <= 5, probes
    assert spa.wait_for("warning firewall: table inet spa was removed by another program; "
                        "restored with 1 lease in "), spa.lines[-5:]
    assert spa.elements() == [f"svc_ssh_v4 {CLI4}"], "the user's lease is back"
    assert world.ssh(world.cli, SRV4, "echo still-in").stdout.strip() == "still-in"
    assert not tcp_open(world, "att", SRV_ATT4, 22)
    status = spa.status_once_it_shows("restored 1 time, last at")
    assert "gate: ok, watched" in status and "restored 1 time, last at" in status, status
    assert ("held meanwhile by the daemon's own table" in status) is holds
    assert not any("nftables refused" in line for line in spa.lines), spa.lines


def test_kill_9_and_restarts_never_open_the_gate(spa: Spa, tmp_path: Path) -> None:
    """Issue 12: a restart or `kill -9` never deletes the table first; the
    table outlives the daemon (the kernel keeps enforcing it), and a start
    replaces its rules in one transaction.  Not one probe gets through, and
    the server sends the attacker not one SYN-ACK meanwhile (the capture,
    shown to see the handshake made before the gate, sees every handshake
    whatever the probe's own socket says).  A failure prints what let the
    packet in: the tables then, the commits around it, and the nft trace of
    the opened connections' packets through every chain (the whole trace
    stays in tmp_path).  Its one opening under load (2026-12-06, in a run of
    the whole file) came from ports the attacker had used in an earlier
    test's open window, which conntrack still held as established:
    test_a_syn_that_conntrack_calls_established_is_still_gated."""
    world = spa.world
    trace = GateTrace(world, tmp_path)
    try:
        assert tcp_open(world, "att", SRV_ATT4, 22), "no gate yet: sshd answers everyone"
        spa.start()
        enroll_alice(spa)
        prober = Prober(world, 8.0)
        time.sleep(0.5)
        spa.stop(signal.SIGKILL)
        time.sleep(1.0)
        tables = world.srv.run("nft", "list", "tables").stdout.splitlines()
        assert sorted(tables) == [f"table inet {TRACE_TABLE}", "table inet spa"], (
            "the hold table went with its owner; ours stays")
        spa.start()
        time.sleep(0.5)
        spa.stop(signal.SIGTERM)
        time.sleep(1.0)
        spa.start()
        probes = prober.result()
    finally:
        trace.close()
    (tmp_path / "probes.json").write_text(json.dumps(probes))
    (tmp_path / "daemon.txt").write_text("\n".join(spa.stamped))
    before = [line for line in trace.syn_acks() if float(line.split()[0]) < probes["start"]]
    assert before, "the capture sees the handshake made before the gate"
    assert probes["sent"] - sum(map(len, probes["failed"].values())) > 500, probes
    assert probes["opened"] == [] and trace.syn_acks() == before, (
        probes, trace.around(probes), "the daemons' lines:", spa.stamped)


STALE_PORT = 29022  # the attacker's port for a stale session: below the ephemeral range,
# so no probe's connect() ever picks it (each test its own: the entry stays)
CONNECT_FROM = """
import errno, socket, struct, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("", int(sys.argv[3])))
sock.settimeout(2)
try:
    sock.connect((sys.argv[1], int(sys.argv[2])))
except TimeoutError:
    print("dropped")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc.errno)))
else:
    print("open")
    if sys.argv[4] == "abort":  # a reset, dropped on its way out: nobody hears it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
sock.close()
"""


def conntrack_states(world: World, port: int) -> list[str]:
    """The server's conntrack entries of the attacker's tcp/22 connections
    from `port`: their TCP states."""
    text = world.srv.run("cat", "/proc/net/nf_conntrack").stdout
    return [line.split()[5] for line in text.splitlines()
            if f"src={ATT4} dst={SRV_ATT4} sport={port} dport=22 " in line]


def test_a_syn_that_conntrack_calls_established_is_still_gated(spa: Spa) -> None:
    """The cause of the kill -9 test's opening under load (2026-12-06): the
    four ports that opened were the ports of four connections the attacker
    had completed in the hold_table = "off" repair window of an earlier
    test on the same namespaces (sshd's log names them twice).  A SYN
    whose addresses and ports match an entry conntrack still holds in an
    established state is not a new connection to conntrack: it "ignores"
    the SYN and lets it pass as established (nf_conntrack_proto_tcp: "SYN
    in ORIGINAL ... we annotate the TCP options and let the packet go
    through").  Our first rule accepted `ct state established`, so the SYN
    reached sshd's listener.
    Made here on purpose: a connection the kernel still tracks as
    established whose two ends are gone without a word (each end's RST
    dropped before conntrack saw it), then the gate, then a new connection
    from the same port.  A SYN without ACK is a new connection whatever
    conntrack says: it must pass the gate like any other."""
    world = spa.world
    make_stale_session(world, STALE_PORT)
    spa.start()
    assert not tcp_open(world, "att", SRV_ATT4, 22), "the gate stands for a new port"
    assert connect_from(world, STALE_PORT) == "dropped", (
        "a SYN from the stale session's port reached sshd")


def make_stale_session(world: World, port: int) -> None:
    """A connection from the attacker's `port` to sshd, made while nothing
    gates (conntrack tracks it), whose two ends are gone without conntrack
    hearing of it (each end's reset dropped before conntrack saw it): the
    kernel still holds it as established."""
    world.srv.run("nft", "add table inet stalesetup; "
                  "add chain inet stalesetup ctin { type filter hook input priority 0; }; "
                  "add rule inet stalesetup ctin ct state new counter; "
                  "add chain inet stalesetup raw { type filter hook output priority -300; }; "
                  f"add rule inet stalesetup raw ip daddr {ATT4} tcp sport 22 "
                  "tcp flags rst drop")
    world.att.run("nft", "add table inet stalesetup; "
                  "add chain inet stalesetup out { type filter hook output priority 0; }; "
                  f"add rule inet stalesetup out tcp sport {port} tcp flags rst drop")
    try:
        made = world.att.run(sys.executable, "-c", CONNECT_FROM, SRV_ATT4, "22", str(port),
                             "abort")
        assert made.stdout.strip() == "open", made
        world.srv.run("ss", "-K", "dst", ATT4, "dport", "=", f":{port}")
        assert conntrack_states(world, port) == ["ESTABLISHED"], "the stale entry to reuse"
    finally:
        world.att.run("nft", "delete", "table", "inet", "stalesetup", check=False)
        world.srv.run("nft", "delete", "table", "inet", "stalesetup", check=False)


def connect_from(world: World, port: int) -> str:
    """A new connection from the attacker's `port` to sshd: "open",
    "dropped" (no answer in 2 s) or the error's name."""
    done = world.att.run(sys.executable, "-c", CONNECT_FROM, SRV_ATT4, "22", str(port), "close")
    return done.stdout.strip()


def test_no_other_program_can_touch_the_hold_table(spa: Spa) -> None:
    """The hold table is owned by the daemon's netlink socket: another
    process (root included) can neither delete nor change it, and a flush of
    the whole ruleset passes it by."""
    world = spa.world
    spa.start()
    enroll_alice(spa)
    assert spa.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "60"
                      ).returncode == 0
    for command in (("delete", "table", "inet", "spa_hold"),
                    ("flush", "chain", "inet", "spa_hold", "input"),
                    ("add", "element", "inet", "spa_hold", "svc_ssh_v4", f"{{ {ATT4} }}")):
        done = world.srv.run("nft", *command, check=False)
        assert done.returncode != 0 and "Operation not permitted" in done.stderr, command
    held = world.srv.run("nft", "list", "set", "inet", "spa_hold", "svc_ssh_v4").stdout
    assert CLI4 in held and ATT4 not in held
    # with the daemon frozen (it cannot repair), our table deleted: the hold
    # alone keeps strangers out and lets the lease in
    assert spa.proc is not None
    spa.proc.send_signal(signal.SIGSTOP)
    try:
        world.srv.run("nft", "delete", "table", "inet", "spa")
        assert not tcp_open(world, "att", SRV_ATT4, 22)
        assert tcp_open(world, "cli", SRV4, 22)
    finally:
        spa.proc.send_signal(signal.SIGCONT)
    assert spa.wait_for("warning firewall: table inet spa was removed"), spa.lines[-5:]


def test_the_boot_gate_closes_the_ports_without_a_daemon_and_keeps_saved_leases(
        spa: Spa) -> None:
    """Issue 12: `spa-server gate` (spa-gate.service, before the network)
    installs the gate from the config and the saved leases and exits; a
    stopped daemon leaves the gate in place."""
    world = spa.world
    enroll_alice(spa)
    assert tcp_open(world, "att", SRV_ATT4, 22), "no gate yet: sshd answers everyone"
    done = spa.admin("gate")
    assert "gate installed (nftables), 0 saved lease(s)" in done.stdout
    assert "closed to everyone" in done.stdout
    assert not tcp_open(world, "att", SRV_ATT4, 22)
    assert world.srv.run("nft", "list", "tables").stdout.splitlines() == ["table inet spa"]
    spa.start()
    assert "keeps the gate itself" in spa.admin("gate").stdout, "never under a running daemon"
    assert spa.client(world.cli, "alice", "open", "ssh", "srv", "--duration", "120"
                      ).returncode == 0
    time.sleep(0.5)  # leases.json within a housekeeping round
    spa.stop(signal.SIGTERM)
    assert not tcp_open(world, "att", SRV_ATT4, 22), "stopping keeps the gate"
    assert tcp_open(world, "cli", SRV4, 22), "and the lease, until it ends"
    world.srv.run("nft", "delete", "table", "inet", "spa")  # as after a reboot
    assert tcp_open(world, "att", SRV_ATT4, 22)
    assert "1 saved lease(s) kept open" in spa.admin("gate").stdout
    assert not tcp_open(world, "att", SRV_ATT4, 22)
    assert tcp_open(world, "cli", SRV4, 22), "the saved lease is open again"
    assert spa.elements() == [f"svc_ssh_v4 {CLI4}"]


def test_the_boot_gate_keeps_no_saved_lease_it_cannot_trust(spa: Spa, tmp_path: Path) -> None:
    """Issue 16's review, F2.  A local user makes the state directory first
    in a 1777 directory, with a 73-year ssh lease for 10.9.9.9: `gate` is
    refused in one line and touches no table.  In the server's own state
    directory, a saved lease of a client nobody enrolled is dropped, and a
    known client's lease ending in 2100 is cut to ssh's max_duration."""
    from tests.integration.test_cli_errors import PLANTED, assert_one_line_error, plant_state_dir

    world = spa.world
    enroll_alice(spa)
    planted_dir = plant_state_dir(tmp_path / "advp")
    planted = tmp_path / "planted.toml"
    planted.write_text(spa.config.read_text().replace(str(tmp_path / "state"),
                                                      str(planted_dir)))
    planted.chmod(0o600)
    done = world.srv.run(*procs.command("spa-server"), "--config", str(planted), "gate",
                         check=False)
    assert_one_line_error(done, f"state directory {planted_dir} would be in", "(mode 1777)")
    assert world.srv.run("nft", "list", "tables").stdout.strip() == "", "no table installed"

    leases = [*PLANTED["leases"], {"client": "alice", "address": CLI4, "service": "ssh",
                                   "expires": 4102444800}]
    (tmp_path / "state" / "leases.json").write_text(json.dumps({**PLANTED, "leases": leases}))
    done = spa.admin("gate")
    assert "1 saved lease(s) kept open" in done.stdout
    assert ("warning saved leases: dropped 1 of an unknown client or service, cut 1 to their "
            "service's max_duration from now") in done.stderr
    assert spa.elements() == [f"svc_ssh_v4 {CLI4}"]
    assert 0 < element_expires(world, "svc_ssh_v4") <= 300


def element_expires(world: World, name: str) -> float:
    """Seconds until the one element of our set `name` ends."""
    found = json.loads(world.srv.run("nft", "-j", "list", "set", "inet", "spa", name).stdout)
    (elem,) = next(item["set"] for item in found["nftables"] if "set" in item)["elem"]
    return float(elem["elem"]["expires"])


def run_in_a_namespace(role: str, code: str) -> Any:
    """What `code` prints as JSON, run by Python in a namespace of its own."""
    from spa.netns import Topology

    topo = Topology()
    try:
        return json.loads(topo.ns(role).run(sys.executable, "-c", code, timeout=60).stdout)
    finally:
        topo.cleanup()


def test_every_alteration_of_our_table_is_found_and_put_back(tmp_path: Path) -> None:
    """The backend's repair against the real kernel, in a namespace of its
    own: each change another program can make to `inet spa` is named, put
    back in one transaction, and then found intact (no repair loop).  The
    last three came from an adversarial review: `flags dormant` unhooked
    every chain unnoticed; a jump between two added chains made the repair
    fail for good (EBUSY); a grant set made again with `size 1` was kept."""
    code = r'''
import ipaddress, json, subprocess, sys, time
from spa.backends.libnft import LibNft
from spa.backends.nftables import NftablesBackend
from spa.core.leases import Allow
from spa.core.policy import DEFAULT_SERVICES
backend = NftablesBackend(LibNft(), hold=False)
now = time.time()
backend.start(DEFAULT_SERVICES, now=now)
user = ipaddress.ip_address("10.0.0.7")
backend.apply([(Allow(user, "ssh", now + 600), DEFAULT_SERVICES["ssh"])], now=now)
wanted = {(user, "ssh"): now + 600}
def nft(*args):
    subprocess.run(["nft", *args], check=True)
def script(text):
    subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)
def a_rule():
    out = subprocess.run(["nft", "-a", "list", "chain", "inet", "spa", "input"],
                         capture_output=True, text=True).stdout
    return [line.split("# handle ")[1] for line in out.splitlines() if "# handle" in line][2]
found = {"intact": backend.repair(wanted, now=time.time())}
for name, change in [
        ("flush", "flush ruleset"), ("delete", "delete table inet spa"),
        ("chain", "flush chain inet spa input"), ("rule", None),
        ("grants", "flush set inet spa svc_ssh_v4"),
        ("stranger", "add element inet spa svc_ssh_v4 { 10.9.9.9 timeout 1h }"),
        ("timeout", "delete element inet spa svc_ssh_v4 { 10.0.0.7 }\n"
                    "add element inet spa svc_ssh_v4 { 10.0.0.7 timeout 2h }"),
        ("extra", "add chain inet spa evil { type filter hook input priority -20; "
                  "policy drop; }"),
        ("set", "add set inet spa foo { type ipv4_addr; }"),
        ("dormant", "add table inet spa { flags dormant; }"),
        ("knot", "add chain inet spa a\nadd chain inet spa b\nadd rule inet spa b jump a\n"
                 "flush chain inet spa input\nflush chain inet spa forward"),
        ("size", "flush chain inet spa input\nflush chain inet spa forward\n"
                 "delete set inet spa svc_ssh_v4\n"
                 "add set inet spa svc_ssh_v4 { type ipv4_addr; flags timeout; size 1; }")]:
    script(change or f"delete rule inet spa input handle {a_rule()}")
    found[name] = [backend.repair(wanted, now=time.time()), backend.repair(wanted, now=time.time())]
out = subprocess.run(["nft", "list", "set", "inet", "spa", "svc_ssh_v4"], capture_output=True,
                     text=True).stdout
found["elements"] = [word for word in out.split() if word.startswith("10.")]
print(json.dumps(found))
'''
    found = run_in_a_namespace("alter", code)
    assert found.pop("intact") is None
    assert found.pop("elements") == ["10.0.0.7"], "exactly the lease, nothing else"
    expect = {"flush": "table inet spa was removed", "delete": "table inet spa was removed",
              "chain": "were altered", "rule": "were altered", "extra": "were altered",
              "set": "were altered", "grants": "1 grant(s) were removed",
              "stranger": "holds 1 grant(s) spa did not make (10.9.9.9 ssh)",
              "timeout": "have another timeout than their lease",
              "dormant": "was given flags dormant", "knot": "were altered",
              "size": "were altered"}
    for name, (first, again) in found.items():
        assert first is not None and expect[name] in first, (name, first)
        assert again is None, (name, "a repaired table is found intact")


def test_a_start_over_our_table_with_plain_drop_sets_installs_the_whole_gate() -> None:
    """From the 10^5-client start: our table held the drop sets and no rule
    (started once for no service, or made so by another program).  The
    drop rules need dynamic sets; kept, the plain ones made nftables refuse
    the start (EINVAL) and the table stayed without a drop rule.  Against
    the real kernel: each start after such a table installs every rule."""
    code = r'''
import json, subprocess, time
from spa.backends.libnft import LibNft
from spa.backends.nftables import NftablesBackend
from spa.core.policy import DEFAULT_SERVICES
found = {}
for how in ("no service first", "another program"):
    subprocess.run(["nft", "flush", "ruleset"], check=True)
    if how == "no service first":
        NftablesBackend(LibNft(), hold=False).start({}, now=time.time())
    else:
        subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
            "add table inet spa\n"
            "add set inet spa drops_v4 { type ipv4_addr . inet_service; size 65536; "
            "flags timeout; timeout 10m; }\n"
            "add set inet spa drops_v6 { type ipv6_addr . inet_service; size 65536; "
            "flags timeout; timeout 10m; }\n"))
    backend = NftablesBackend(LibNft(), hold=False)
    backend.start(DEFAULT_SERVICES, now=time.time())
    found[how] = [subprocess.run(["nft", "list", "chain", "inet", "spa", "input"],
                                 capture_output=True, text=True).stdout,
                  backend.repair({}, now=time.time())]
print(json.dumps(found))
'''
    found = run_in_a_namespace("plain", code)
    for how, (rules, problem) in found.items():
        assert "tcp dport 22 drop" in rules and "update @drops_v4" in rules, (how, rules)
        assert problem is None, (how, "the started gate is found intact")


def test_a_table_another_process_owns_in_our_name_never_opens_the_gate(spa: Spa) -> None:
    """From the adversarial review: another process deletes `inet spa` and
    makes it again `flags owner` (so nobody else may change it).  The daemon
    cannot repair it: `status` says FAILING while the hold table keeps the
    ports closed; a restart meanwhile starts anyway (with the hold table)
    instead of refusing to run; when the squatter exits, the gate is back."""
    world = spa.world
    spa.start()
    enroll_alice(spa)
    squatter = world.srv.popen(["nft", "-i"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    assert squatter.stdin is not None
    try:
        squatter.stdin.write("delete table inet spa; add table inet spa { flags owner; }\n")
        squatter.stdin.flush()
        assert spa.wait_for("error firewall: cannot check or restore the gate"), spa.lines[-5:]
        assert "gate: FAILING since" in spa.status_once_it_shows("gate: FAILING since")
        assert not tcp_open(world, "att", SRV_ATT4, 22), "the hold table keeps strangers out"
        spa.stop(signal.SIGTERM)
        spa.start()  # once refused to start here, leaving no gate at all
        assert not tcp_open(world, "att", SRV_ATT4, 22)
    finally:
        squatter.stdin.close()
        squatter.wait(timeout=10)
    assert spa.wait_for("warning firewall: table inet spa was removed"), spa.lines[-5:]
    assert "gate: ok" in spa.status_once_it_shows("gate: ok")
    assert not tcp_open(world, "att", SRV_ATT4, 22)
    assert spa.client(world.cli, "alice", "open", "ssh", "srv").returncode == 0


def test_a_removed_lock_file_is_taken_again_so_no_second_daemon_starts(spa: Spa) -> None:
    """From the adversarial review: removing state/server.lock let a second
    daemon start beside the first.  Root's daemon locks in /run/spa (root's)
    and, once it runs as the state directory's owner, in the state directory
    too: root removing the first is said within a housekeeping round, and
    the second still refuses a second daemon; removing the second (as its
    owner could) is taken again at once."""
    spa.start()
    lock = StateDir(spa.root / "state").lock_file  # root's daemon: in /run/spa
    lock.unlink()
    assert spa.wait_for(f"warning {lock} was removed (by root: nobody else can); the state "
                        "directory's lock still keeps a second daemon out", timeout=5), (
        spa.lines[-5:])
    second = spa.admin("run", check=False)
    assert second.returncode == 2 and "already running" in second.stderr, second.stderr


def test_a_connect_that_fails_at_once_is_no_opening_to_the_probe() -> None:
    """The probe behind the gate tests: a connect refused at once (here no
    route; under load also EADDRNOTAVAIL or ENOBUFS) sends no SYN, and
    leaves a closed socket that select() calls writable with SO_ERROR 0,
    which the probe once counted as a completed handshake.  Now it is named
    by its errno, and only a socket with a peer is an opening."""
    code = f'''
import json, select, socket, sys
sys.path.insert(0, {str(HERE)!r})
from syn_probe import probe
sock = socket.socket()
sock.setblocking(False)
code = sock.connect_ex(("10.1.2.3", 22))
_, ready, _ = select.select([], [sock], [], 0.05)
trap = [code != 115, bool(ready), sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)]
print(json.dumps({{"trap": trap, "probe": probe("10.1.2.3", 22, 0.05)}}))
'''
    found = run_in_a_namespace("noroute", code)
    assert found["trap"] == [True, True, 0], "the kernel still sets the trap"
    assert found["probe"] == ["ENETUNREACH", 0]
