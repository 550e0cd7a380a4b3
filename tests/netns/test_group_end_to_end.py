"""Issue 18's end-to-end test: a group of two real `spa-server` daemons on
the real 3-member etcd cluster (tests/etcd_world.py: TLS, RBAC), each in a
namespace of its own with nftables and a real sshd, set up with the admin
commands as an admin would, and the real `spa-client` knocking one address
the two members share (as a VRRP or anycast pair would):

    etcd e1 e2 e3 --- bridge (cluster's client ns, 10.218.0.0/24) ---+--- gwa .11
                                                                     +--- gwb .12
    gwa 10.221.1.1 ---- cli 10.221.1.2           (10.221.0.1, the shared
    gwb 10.221.2.1 ---- cli 10.221.2.2            address, on both members)
    gwb 10.221.3.1 ---- att 10.221.3.2

The client's own addresses (10.221.9.N, one per test, so one test's leases
never stand in for another's) sit on its loopback; its route to the shared
address goes through gwa or gwb, which is how a test moves it from one
member to the other (a failover).  One set-up for the module: the group, its
roles, both members and their daemons; each test enrolls its own client.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.layers.inet import UDP
from scapy.utils import rdpcap

from spa.group import layout
from spa.netns import Namespace, Sshd, Topology, start_sshd
from spa.server.logline import event_of
from spa.server.privsep import SERVICE_USERS
from tests.etcd_world import SUBNET, EtcdCluster, _add_user, _ctl_argv
from tests.integration.procs import command
from tests.netns.conftest import HERE, KNOCK_PORT, nft_elements

VIP = "10.221.0.1"  # the address both members answer on
LINKS = {"gwa": ("10.221.1.1", "10.221.1.2"), "gwb": ("10.221.2.1", "10.221.2.2")}
ETCD_SIDE = {"gwa": f"{SUBNET}.11", "gwb": f"{SUBNET}.12"}
ATT_GW, ATT = "10.221.3.1", "10.221.3.2"
CLIENT_NET = "10.221.9"
WAIT = 15.0  # seconds a watch event or a grant may take on a loaded machine
TIMEOUT = "1"  # seconds per etcd call and endpoint, for the members
LEASE = 8  # seconds: a lease that must end on time while etcd has no quorum
METRICS = "127.0.0.1:9712"  # each member's /metrics, on its own namespace's loopback


@dataclass
class Member:
    """One spa-server daemon in its own namespace, with its sshd."""

    name: str
    ns: Namespace
    root: Path
    sshd: Sshd
    cli_link: str = ""  # its end of the link to the client
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.root / "server.toml"

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self.ns.run(*command("spa-server"), "--config", str(self.config), *args,
                           check=False, timeout=60)
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def start(self) -> None:
        self.lines = []
        self.proc = self.ns.popen([*command("spa-server"), "--config", str(self.config), "run"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        assert self.wait_for("started "), self.lines

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(event_of(line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float = WAIT) -> bool:
        """Whether a line holding `text` is (or comes within `timeout`) in the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(text):
                return True
            time.sleep(0.05)
        return False

    def count(self, text: str) -> int:
        return sum(1 for line in list(self.lines) if text in line)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=15)
            self.proc = None

    def elements(self) -> list[str]:
        return nft_elements(self.ns)

    def metric(self, sample: str) -> float:
        """One sample of the daemon's /metrics ([metrics] listen, on the
        namespace's own loopback), e.g. 'spa_group_claims_total{result="replay"}';
        0 where it has none yet."""
        code = ("import sys,urllib.request\nsys.stdout.write(urllib.request.urlopen("
                f"'http://{METRICS}/metrics',timeout=5).read().decode())")
        text = self.ns.run(sys.executable, "-c", code).stdout
        found = [line.split()[-1] for line in text.splitlines() if line.startswith(sample + " ")]
        return float(found[0]) if found else 0.0

    def events(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = json.loads(self.admin("events", "--json").stdout)
        return rows


@dataclass
class Site:
    cluster: EtcdCluster
    topo: Topology
    root: Path
    group: str
    cli: Namespace
    att: Namespace
    members: dict[str, Member] = field(default_factory=dict)
    sources: int = 0  # client addresses handed out

    @property
    def gwa(self) -> Member:
        return self.members["gwa"]

    @property
    def gwb(self) -> Member:
        return self.members["gwb"]

    def admin_login(self) -> list[str]:
        return ["--admin-user", f"{self.group}-admin", "--admin-password-file",
                str(self.root / "admin-password")]

    def tls(self, member: str) -> list[str]:
        return [*(a for e in self.cluster.endpoints for a in ("--endpoint", e)),
                "--ca", str(self.root / "ca.crt"), "--cert", str(self.root / f"{member}.crt"),
                "--key", str(self.root / f"{member}.key")]

    def new_source(self) -> str:
        """A client address of its own for a test, on the client's loopback."""
        self.sources += 1
        address = f"{CLIENT_NET}.{self.sources}"
        self.cli.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        return address

    def route(self, member: str, source: str) -> None:
        """The client reaches the shared address through `member`, from `source`."""
        self.cli.run("ip", "route", "replace", f"{VIP}/32", "via", LINKS[member][0], "src",
                     source)

    def enroll(self, name: str) -> None:
        """`spa-server enroll` at gwa (the group's, written to etcd), the URI
        into the client's profile `grp`; back once both members hold it."""
        reloads = {m.name: m.count("reloaded ") for m in self.members.values()}
        done = self.gwa.admin("enroll", name, "--service", "ssh", "--endpoint", VIP,
                              "--uri-only", *self.admin_login())
        uri = done.stdout.strip()
        assert uri.startswith("spa1://"), done.stderr
        assert (self.root / "admin-password").read_text().strip() not in done.stdout + done.stderr
        added = self.client(name, "enroll", uri, "--name", "grp")
        assert added.returncode == 0, added.stderr
        for member in self.members.values():  # a running member takes it from its watch
            if member.proc is not None:
                assert _until(lambda m=member: m.count("reloaded ") > reloads[m.name]), \
                    member.lines[-3:]

    def client(self, who: str, *args: str, timeout: float = 30
               ) -> subprocess.CompletedProcess[str]:
        return self.cli.run(*command("spa-client"), "--config-dir", str(self.root / f"c-{who}"),
                            *args, check=False, timeout=timeout)

    def knock(self, who: str, member: str, source: str, *args: str
              ) -> subprocess.CompletedProcess[str]:
        self.route(member, source)
        return self.client(who, "open", "ssh", "grp", *args)

    def ssh(self, member: str, source: str) -> subprocess.CompletedProcess[str]:
        """A real ssh login to the shared address, through `member`."""
        self.route(member, source)
        return self.cli.run(*self.members[member].sshd.login_argv(VIP, "echo in-at-$(hostname)"),
                            check=False, timeout=40)

    def tcp_open(self, ns: Namespace, port: int = 22) -> bool:
        code = ("import socket,sys\ns=socket.socket()\ns.settimeout(1.5)\n"
                f"sys.exit(s.connect_ex(({VIP!r},{port})))")
        return ns.run(sys.executable, "-c", code, check=False).returncode == 0

    def keys(self, kind: str, client: str) -> list[str]:
        """The group's keys of one kind (claims, leases) for `client`, as etcd's root."""
        prefix = f"{layout.group_prefix(self.group)}{kind}/{client}/"
        return [k for k in self.cluster.ctl("get", "--prefix", "--keys-only", prefix).split()
                if k]


def _until(condition: object, timeout: float = WAIT) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _files(site: Site, pki_root: Path, member: str) -> None:
    """A member's etcd files in the site's directory: the CA and certificate
    readable, the key 0600 and the service user's (the daemon reads them
    after its drop to that user, spa.server.privsep.daemon_user; docs/groups.md)."""
    site.cluster.pki.issue(f"{site.group}-{member}", cn=None)
    for src, dst, mode in ((site.cluster.pki.ca_file, "ca.crt", 0o644),
                           (pki_root / f"{site.group}-{member}.crt", f"{member}.crt", 0o644),
                           (pki_root / f"{site.group}-{member}.key", f"{member}.key", 0o600)):
        shutil.copyfile(src, site.root / dst)
        (site.root / dst).chmod(mode)
    user = next(found for name in SERVICE_USERS if (found := _user(name)) is not None)
    os.chown(site.root / f"{member}.key", user.pw_uid, user.pw_gid)


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _secret(path: Path, text: str) -> None:
    path.write_text(text + "\n")
    path.chmod(0o600)


def _roles(site: Site, passwords: dict[str, str]) -> None:
    """What `spa-server group roles` prints, run as etcd's root (a `user
    add` gets its password on standard input, as etcdctl asks)."""
    done = site.gwa.ns.run(*command("spa-server"), "group", "roles", "--group", site.group,
                           "--member", "gwa", "--member", "gwb")
    for line in done.stdout.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv or argv[1:] == ["auth", "enable"]:
            continue  # a comment; RBAC is on already
        assert argv[0] == "etcdctl"
        if argv[1:3] == ["user", "add"]:
            _add_user(site.cluster, argv[3], passwords[argv[3]])
        else:
            site.cluster.ctl(*argv[1:])


def _wire(site: Site) -> None:
    topo = site.topo
    for name, ip in ETCD_SIDE.items():
        site.cluster.attach(site.members[name].ns, ip)
    for name, (gw, cli) in LINKS.items():
        ns = site.members[name].ns
        inner, _ = topo.link(ns, [f"{gw}/24"], site.cli, [f"{cli}/24"])
        site.members[name].cli_link = inner
        ns.run("ip", "addr", "add", f"{VIP}/32", "dev", inner)
        ns.run("ip", "route", "add", f"{CLIENT_NET}.0/24", "via", cli)
    topo.link(site.gwb.ns, [f"{ATT_GW}/24"], site.att, [f"{ATT}/24"])
    site.att.run("ip", "route", "add", f"{VIP}/32", "via", ATT_GW)


@contextlib.contextmanager
def open_site(cluster: EtcdCluster, root: Path) -> Iterator[Site]:
    root.chmod(0o711)  # the service user reaches its key and state below
    topo = Topology()
    group = f"e2e{secrets.token_hex(3)}"
    site = Site(cluster, topo, root, group, topo.ns("cli"), topo.ns("att"))
    try:
        for name in LINKS:
            ns = topo.ns(name)
            (root / name).mkdir(mode=0o711)
            site.members[name] = Member(name, ns, root / name, start_sshd(ns, root / name))
        _wire(site)
        passwords = {f"{group}-{who}": secrets.token_urlsafe(16)
                     for who in ("admin", "gwa", "gwb")}
        _secret(root / "admin-password", passwords[f"{group}-admin"])
        for name, member in site.members.items():
            _files(site, cluster.root, name)
            _secret(member.root / "password", passwords[f"{group}-{name}"])
        _roles(site, passwords)
        for name, member in site.members.items():
            member.admin("init", "--listen-port", str(KNOCK_PORT), "--state-dir",
                         str(member.root / "state"), "--service", "ssh")
            if name == "gwa":
                member.admin("group", "init", "--group", group, *site.tls(name),
                             *site.admin_login())
            member.admin("group", "join", "--group", group, "--member", name,
                         "--password-file", str(member.root / "password"), "--timeout",
                         TIMEOUT, *site.tls(name))
        for member in site.members.values():
            with member.config.open("a") as config:
                config.write(f'\n[metrics]\nlisten = "{METRICS}"\n')
            member.start()
        yield site
    finally:
        for member in site.members.values():
            member.kill()
            member.sshd.stop()
        topo.cleanup()
        for i in range(len(cluster.members)):
            cluster.restart(i)
        with contextlib.suppress(RuntimeError):
            cluster.wait_healthy()
            cluster.ctl("del", "--prefix", layout.group_prefix(group))


@pytest.fixture(scope="module")
def site(etcd_cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Site]:
    with open_site(etcd_cluster, tmp_path_factory.mktemp("group-e2e")) as made:
        yield made


@pytest.fixture
def quorum(site: Site) -> Iterator[EtcdCluster]:
    """The cluster, every member of it running again after the test."""
    try:
        yield site.cluster
    finally:
        for i in range(len(site.cluster.members)):
            site.cluster.restart(i)
        site.cluster.wait_healthy()


def test_one_enrollment_opens_at_both_members_behind_one_address(site: Site) -> None:
    me = site.new_source()
    site.enroll("alice")
    for member in ("gwa", "gwb"):
        site.route(member, me)
        assert not site.tcp_open(site.cli), f"ssh hidden at {member} before the knock"
    knocked = site.knock("alice", "gwa", me)
    assert knocked.returncode == 0, knocked.stdout + knocked.stderr
    assert site.gwa.wait_for(f"client=alice src={me}")
    login = site.ssh("gwa", me)
    assert login.returncode == 0 and login.stdout.strip().startswith("in-at-"), login.stderr
    # the lease gwa granted is in gwb's firewall too (shared through etcd)
    assert _until(lambda: f"svc_ssh_v4 {me}" in site.gwb.elements()), site.gwb.lines[-5:]
    # one profile, the same URI: a knock that reaches gwb is gwb's own grant
    accepted = f"accepted action=open client=alice src={me}"
    grants_at_b = site.gwb.count(accepted)
    knocked = site.knock("alice", "gwb", me)
    assert knocked.returncode == 0, knocked.stdout + knocked.stderr
    assert _until(lambda: site.gwb.count(accepted) > grants_at_b), site.gwb.lines
    assert site.ssh("gwb", me).returncode == 0
    # one claim per accepted knock (a re-sent packet is a knock of its own)
    claims = site.keys("claims", "alice")
    assert len(claims) == site.gwa.count(accepted) + site.gwb.count(accepted) >= 2, claims


def _capture_one_knock(site: Site, who: str, source: str, tmp: Path) -> bytes:
    """The real client's knock at gwa (accepted there), as it crossed the wire."""
    pcap = tmp / f"{who}.pcap"
    dump = site.gwa.ns.popen(["tcpdump", "-i", site.gwa.cli_link, "-w", str(pcap), "-U", "-c",
                              "1", "udp", "dst", "port", str(KNOCK_PORT)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert dump.stderr is not None
    assert "listening on" in dump.stderr.readline()
    knocked = site.knock(who, "gwa", source)
    assert knocked.returncode == 0, knocked.stdout + knocked.stderr
    dump.wait(timeout=10)
    payload: bytes = bytes(rdpcap(str(pcap))[0][UDP].payload)
    return payload


def test_a_knock_accepted_by_one_member_and_replayed_to_the_other_is_refused_replay(
        site: Site, tmp_path: Path) -> None:
    me = site.new_source()
    site.enroll("bob")
    payload = _capture_one_knock(site, "bob", me, tmp_path)
    accepted = f"accepted action=open client=bob src={me}"
    assert site.gwa.wait_for(accepted)
    first = next(line for line in site.gwa.lines if "client=bob" in line)
    assert first.startswith(accepted), first  # the captured packet is one gwa accepted
    claims = site.keys("claims", "bob")
    assert len(claims) == site.gwa.count(accepted), claims
    counted = {result: site.gwb.metric(f'spa_group_claims_total{{result="{result}"}}')
               for result in ("replay", "claimed")}
    # the same bytes, from an address no lease holds, to the other member
    site.att.run(sys.executable, "-c",
                 "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                 f"s.sendto(bytes.fromhex(sys.argv[1]),({VIP!r},{KNOCK_PORT}))", payload.hex())
    assert site.gwb.wait_for(f"refused reason=replay client=bob src={ATT}"), site.gwb.lines[-5:]
    assert not site.tcp_open(site.att), "the replay opened nothing for its sender"
    assert not any(ATT in e for e in site.gwb.elements())
    refused = [e for e in site.gwb.events()
               if e["reason"] == "replay" and e["source"] == ATT and e["client"] == "bob"]
    assert sum(int(e["count"]) for e in refused) == 1  # type: ignore[call-overload]
    # no second claim, no lease for the replay's sender: the only lease is
    # the one gwa granted to bob's own address (shared with gwb by design)
    assert site.keys("claims", "bob") == claims
    assert _until(lambda: site.gwb.metric('spa_group_claims_total{result="replay"}')
                  == counted["replay"] + 1)
    assert site.gwb.metric('spa_group_claims_total{result="claimed"}') == counted["claimed"]
    leases = site.keys("leases", "bob")
    assert len(leases) == 1 and f"/{me}/" in leases[0], leases
    assert not site.gwb.count("accepted action=open client=bob")


def _stamped(ns: Namespace, argv: list[str], lines: list[str]) -> subprocess.Popen[str]:
    """`argv` in `ns`, each line it prints after the wall clock it was read at
    (stamp_lines.py), into `lines`."""
    proc = ns.popen([sys.executable, str(HERE / "stamp_lines.py"), *argv],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    return proc


def test_revoke_close_ends_the_leases_in_both_members_firewalls_within_a_second(
        site: Site) -> None:
    me = site.new_source()
    site.enroll("carol")
    knocked = site.knock("carol", "gwa", me, "--duration", "120")
    assert knocked.returncode == 0, knocked.stdout + knocked.stderr
    element = f"svc_ssh_v4 {me}"
    assert _until(lambda: element in site.gwb.elements())
    assert element in site.gwa.elements()
    traces: dict[str, list[str]] = {"gwa": [], "gwb": [], "etcd": []}
    monitors = [_stamped(site.members[name].ns, ["nft", "monitor"], traces[name])
                for name in ("gwa", "gwb")]
    monitors.append(_stamped(site.cluster.client, [
        *_ctl_argv(site.cluster), "watch", "--prefix",
        f"{layout.group_prefix(site.group)}revoked/"], traces["etcd"]))
    try:
        assert _until(lambda: all(lines for lines in traces.values()))
        time.sleep(0.5)  # nft monitor and etcdctl watch subscribed (neither says when)
        began = time.time()
        revoke = site.gwa.ns.popen([*command("spa-server"), "--config", str(site.gwa.config),
                                    "revoke", "carol", "--close", *site.admin_login()],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        said, err = revoke.communicate(timeout=30)
        assert revoke.returncode == 0 and "carol is revoked" in said, (said, err)
        assert _until(lambda: element not in site.gwa.elements() + site.gwb.elements())
        assert _until(lambda: any("revoked/carol" in line for line in traces["etcd"]))
        time.sleep(0.3)  # the monitors' last lines
    finally:
        for proc in monitors:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
    # etcd's watch (etcdctl's, as the members') saw the write: time zero
    written = min(float(line.split()[0]) for line in traces["etcd"] if "revoked/carol" in line)
    ended = {}
    for name in ("gwa", "gwb"):
        gone = [float(line.split()[0]) for line in traces[name]
                if "delete element" in line and me in line]
        assert gone, (name, traces[name])
        ended[name] = gone[0]
    delay = max(ended.values()) - written
    print(f"\nrevocation to the firewalls, from etcd's watch event: gwa "
          f"{(ended['gwa'] - written) * 1000:.0f} ms, gwb {(ended['gwb'] - written) * 1000:.0f}"
          f" ms (the revoke command started {(written - began) * 1000:.0f} ms before the "
          "event: its own start-up and login)")
    assert delay < 5.0  # the goal is 1 s (docs/benchmarks.md); bound for a loaded machine
    for member in ("gwa", "gwb"):
        site.route(member, me)
        assert not site.tcp_open(site.cli), f"carol's lease still open at {member}"


def test_with_one_etcd_member_killed_a_new_knock_still_opens_at_both(
        site: Site, quorum: EtcdCluster) -> None:
    me = site.new_source()
    site.enroll("dave")
    quorum.kill(0)  # the endpoint every member tries first
    accepted = f"accepted action=open client=dave src={me}"
    for member in site.members.values():
        before = member.count(accepted)
        knocked = site.knock("dave", member.name, me, "--timeout", "15")
        assert knocked.returncode == 0, knocked.stdout + knocked.stderr
        assert _until(lambda m=member, n=before: m.count(accepted) > n), member.name
    assert len(site.keys("claims", "dave")) >= 2


def test_without_etcd_quorum_no_new_grant_leases_end_on_time_grants_resume(
        site: Site, quorum: EtcdCluster) -> None:
    me, other = site.new_source(), site.new_source()
    site.enroll("erin")
    knocked = site.knock("erin", "gwa", me, "--duration", str(LEASE))
    assert knocked.returncode == 0, knocked.stdout + knocked.stderr
    granted = time.monotonic()
    element = f"svc_ssh_v4 {me}"
    assert _until(lambda: element in site.gwb.elements())
    quorum.kill(0)
    quorum.kill(1)  # one of three left: no quorum
    assert element in site.gwa.elements() and element in site.gwb.elements()
    site.route("gwb", other)
    unreachable = site.gwb.metric('spa_group_claims_total{result="unreachable"}')
    sent = site.client("erin", "open", "ssh", "grp", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    assert site.gwb.wait_for(f"refused reason=group_unreachable client=erin src={other}"), \
        site.gwb.lines[-5:]
    assert not site.tcp_open(site.cli), "no grant without a claim"
    assert not any(other in e for e in site.gwa.elements() + site.gwb.elements())
    refused = [e for e in site.gwb.events() if e["reason"] == "group_unreachable"]
    assert sum(int(e["count"]) for e in refused) >= 1  # type: ignore[call-overload]
    assert _until(lambda: site.gwb.metric('spa_group_claims_total{result="unreachable"}')
                  > unreachable)
    # the lease granted before ends on time in both kernels, etcd or not
    assert _until(lambda: element not in site.gwa.elements() + site.gwb.elements(), LEASE + 4)
    ended = time.monotonic() - granted
    print(f"\na {LEASE} s lease ended at both members {ended:.1f} s after its grant, etcd "
          "without quorum")
    assert ended >= LEASE - 1  # not early: its end was set at the grant
    quorum.restart(0)
    quorum.restart(1)
    quorum.wait_healthy()
    knocked = site.knock("erin", "gwb", other, "--timeout", "20")
    assert knocked.returncode == 0, knocked.stdout + knocked.stderr
    assert site.gwb.wait_for(f"accepted action=open client=erin src={other}")


def test_another_groups_login_cannot_join_this_group(site: Site) -> None:
    """group a's member login (tests/etcd_world.py) reads nothing of this group:
    `group join` with it stops in one line and leaves the config as it was."""
    config, password = site.root / "stranger.toml", site.root / "stranger-password"
    _secret(password, site.cluster.passwords["a-1"])
    site.gwb.ns.run(*command("spa-server"), "--config", str(config), "init", "--state-dir",
                    str(site.root / "stranger-state"), "--backend", "memory")
    before = config.read_text()
    done = site.gwb.ns.run(*command("spa-server"), "--config", str(config), "group", "join",
                           "--group", site.group, "--member", "stranger", "--user", "a-1",
                           "--password-file", str(password), "--timeout", TIMEOUT,
                           *site.tls("gwb"), check=False, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and "permission denied" in done.stderr
    assert site.cluster.passwords["a-1"] not in done.stdout + done.stderr
    assert config.read_text() == before


def test_member_a_killed_during_a_lease_member_b_already_lets_the_client_in(
        site: Site) -> None:
    """Last: it kills gwa's daemon."""
    me = site.new_source()
    site.enroll("frank")
    knocked = site.knock("frank", "gwa", me, "--duration", "120")
    assert knocked.returncode == 0, knocked.stdout + knocked.stderr
    assert site.ssh("gwa", me).returncode == 0
    assert _until(lambda: f"svc_ssh_v4 {me}" in site.gwb.elements())
    site.gwa.kill()  # SIGKILL: no goodbye to etcd or to gwb
    login = site.ssh("gwb", me)  # the failover: no new knock
    assert login.returncode == 0, login.stderr
    assert not site.gwb.count("client=frank"), "gwb judged no knock of frank's"
