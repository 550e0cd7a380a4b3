"""The site benchmarks/group_knock.py measures (issue 18): a 3-member etcd
cluster, a group on it made as an admin makes one, a standalone spa-server and
two members, each behind its own veth from the client namespace, in network
namespaces made here and removed by tests/etcd_world.py's cleanup.

    etcd e1, e2, e3 --veth--+
    member m1 -------veth---+-- bridge in the client namespace (10.218.0.0/24)
    member m2 -------veth---+
    client --veth-- standalone s0 (10.201.0.1), --veth-- m1 (10.202.0.1),
           --veth-- m2 (10.203.0.1): knocks on these links, etcd on the bridge

The group `bench` gets the roles `spa-server group roles` prints
(spa.group.rbac), its meta record from `group init`
(spa.server.admin_groupsetup.init) and each member's [group] table from
`group join` (admin_groupsetup.join), each member with its own etcd user,
password file and certificate (its key readable by the daemon's user, as
docs/groups.md says).  Daemons are `spa-server run` as installed (privilege
split, nftables); each server namespace has a TCP service on port 22 behind
its firewall.  Also here: `nft monitor` in a namespace, line by line with
the time each line was read.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench_latency import KNOCK_PORT, SERVICE
from bench_throughput import SPOOFED

from spa.core.uri import Enrollment, parse
from spa.group import rbac
from spa.group.policy import OnStoreDown
from spa.group.settings import GroupSettings
from spa.netns import Namespace
from spa.server import admin, admin_group, admin_groupsetup, groupstore, privsep
from spa.server import config as config_mod
from spa.server.groupstore import Login
from tests.etcd_world import EtcdCluster, _add_user

GROUP = "bench"
MEMBERS = ("m1", "m2")
ETCD_TIMEOUT = 2.0  # seconds per etcd call and endpoint ([group] timeout's default)
START_TIMEOUT = 60.0  # seconds a daemon may take to say it started (a loaded machine)


# -- the servers ----------------------------------------------------------------


@dataclass
class Host:
    """One spa-server in its namespace: its knock link's /16 is 10.NET.0.0."""

    name: str
    ns: Namespace
    net: int
    root: Path
    link: str = ""  # its end of the client link
    proc: subprocess.Popen[str] | None = None
    service: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"10.{self.net}.0.1"

    @property
    def config(self) -> Path:
        return self.root / "server.toml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "spa-server.log"

    def source(self, index: int) -> str:
        """The client's index-th source address on this host's link."""
        return f"10.{self.net}.{1 + index // 250}.{1 + index % 250}"


def wire(cluster: EtcdCluster, hosts: list[Host], members: list[Host], sources: int) -> None:
    """Each host linked to the client namespace (its /16, `sources` addresses
    on the client's end); each member also on the etcd bridge."""
    client = cluster.client
    for host in hosts:
        host.link, client_if = cluster.topo.link(host.ns, [f"{host.address}/16"], client,
                                                 [f"10.{host.net}.0.2/16"])
        batch = "".join(f"addr add {host.source(i)}/16 dev {client_if}\n"
                        for i in range(sources))
        subprocess.run(client.argv("ip", "-batch", "-"), input=batch, text=True, check=True,
                       capture_output=True)
        host.ns.run("ip", "route", "add", str(SPOOFED), "dev", host.link)  # (c)'s sources
    for index, member in enumerate(members, 1):
        cluster.attach(member.ns, f"10.218.0.{10 + index}")


def standalone_config(host: Host, mode: str) -> None:
    admin.init(host.config, listen_port=KNOCK_PORT, backend="nftables",
               state_dir=host.state, force=True)
    host.config.write_text(host.config.read_text().replace('mode = "capture"',
                                                           f'mode = "{mode}"'))


def launch(host: Host) -> None:
    """The service on port 22, then `spa-server run` (wait_started waits for it)."""
    host.service = host.ns.popen([sys.executable, "-c", SERVICE])
    program = Path(sys.executable).parent / "spa-server"
    with host.log.open("w") as log:
        host.proc = host.ns.popen([str(program), "--config", str(host.config), "run"],
                                  stdout=log, stderr=subprocess.STDOUT)


def wait_started(host: Host, mark: str = "started port=", *, timeout: float = START_TIMEOUT,
                 required: bool = True) -> bool:
    """Until the daemon's log holds `mark`; False (or, `required`,
    RuntimeError with the log's tail) if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while mark not in host.log.read_text():
        assert host.proc is not None
        if host.proc.poll() is not None or time.monotonic() > deadline:
            if not required and host.proc.poll() is None:
                return False
            tail = host.log.read_text()[-600:]
            raise RuntimeError(f"{host.name} did not say {mark!r}: {tail}")
        time.sleep(0.05)
    return True


def stop(host: Host) -> None:
    for proc in (host.proc, host.service):
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the group --------------------------------------------------------------------


@dataclass
class Group:
    settings: GroupSettings  # the admin's view (member "admin")
    login: Login
    uris: dict[str, Enrollment] = field(default_factory=dict)


def make_group(cluster: EtcdCluster, root: Path) -> Group:
    """The group's roles and users (as `spa-server group roles` prints them),
    then its meta record (`group init`), as the group's admin."""
    passwords = {rbac.admin_user(GROUP): secrets.token_urlsafe(18)}
    passwords |= {rbac.member_user(GROUP, m): secrets.token_urlsafe(18) for m in MEMBERS}
    for argv in rbac.role_commands(GROUP, MEMBERS):
        if argv[:2] == ["user", "add"]:
            _add_user(cluster, argv[2], passwords[argv[2]])  # the password on stdin
        else:
            cluster.ctl(*argv)
    for member in MEMBERS:
        secret = root / f"{member}.password"
        secret.write_text(passwords[rbac.member_user(GROUP, member)] + "\n")
        secret.chmod(0o600)
    user = rbac.admin_user(GROUP)
    settings = GroupSettings(GROUP, "admin", cluster.endpoints, cluster.pki.ca_file,
                             cluster.root / "member.crt", cluster.root / "member.key", user,
                             Path("/dev/null"), OnStoreDown.FAIL_CLOSED, ETCD_TIMEOUT)
    login = Login(user, passwords[user])
    kv = groupstore.connect(settings, login)
    admin_groupsetup.init(kv, settings, user, server_id=os.urandom(16), now=time.time())
    return Group(settings, login)


def join(cluster: EtcdCluster, host: Host, mode: str, secrets_dir: Path) -> None:
    """A member's config: its own certificate (no CN) and key, readable by the
    daemon's user after the privilege drop, then `group join`."""
    standalone_config(host, mode)
    files = host.root / "etcd"
    files.mkdir(mode=0o711)
    crt, key = cluster.pki.issue(f"spa-{host.name}", cn=None)
    ca = Path(shutil.copy(cluster.pki.ca_file, files / "ca.crt"))
    crt = Path(shutil.copy(crt, files / "member.crt"))
    key = Path(shutil.copy(key, files / "member.key"))
    ca.chmod(0o644)
    crt.chmod(0o644)
    key.chmod(0o600)
    host.state.mkdir(mode=0o700, exist_ok=True)  # root's: the daemon runs as a service user
    daemon = privsep.daemon_user(host.state)
    os.chown(key, daemon.pw_uid, daemon.pw_gid)
    settings = GroupSettings(GROUP, host.name, cluster.endpoints, ca, crt, key,
                             rbac.member_user(GROUP, host.name),
                             secrets_dir / f"{host.name}.password", OnStoreDown.FAIL_CLOSED,
                             ETCD_TIMEOUT)
    admin_groupsetup.join(host.config, settings, groupstore.connect(settings))


def enroll_group(group: Group, member: Host, names: list[str]) -> None:
    kv = groupstore.connect(group.settings, group.login)
    config = config_mod.load(member.config)
    for name in names:
        made = admin_group.enroll(kv, group.settings, group.login.user, config, name, ["ssh"],
                                  member.address, expires=None, now=time.time(), otp=False,
                                  sources=())
        group.uris[name] = parse(made.uri)


# -- watching the firewall ----------------------------------------------------


class NftMonitor:
    """`nft monitor` in a namespace: each line it prints, with the
    perf_counter time this process read it."""

    def __init__(self, ns: Namespace) -> None:
        self.proc = ns.popen(["nft", "monitor"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            with self.changed:
                self.lines.append((now, line))
                self.changed.notify_all()

    def mark(self) -> int:
        with self.changed:
            return len(self.lines)

    def first(self, matches: Callable[[str], bool], since: int, timeout: float
              ) -> float | None:
        """The time of the first line from index `since` that matches."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for at, line in self.lines[since:]:
                    if matches(line):
                        return at
                since = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def element(verb: str, address: str) -> Callable[[str], bool]:
    """A monitor line that adds (verb "add": nft prints `create element`) or
    deletes ("delete") an element of `address` in a set of any table."""
    verb = "(?:add|create)" if verb == "add" else verb
    pattern = re.compile(rf"^{verb} element inet \S+ \S+ .*[{{,] {re.escape(address)}[ ,}}]")
    return lambda line: pattern.search(line) is not None


@contextmanager
def running(hosts: list[Host]) -> Iterator[None]:
    try:
        yield
    finally:
        for host in hosts:
            stop(host)
