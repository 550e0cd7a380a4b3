"""A real 3-member etcd cluster for the group tests, in network namespaces
the tests create (and delete afterwards).

    member ns e1 --veth--+
    member ns e2 --veth--+-- bridge in the client ns (10.218.0.100)
    member ns e3 --veth--+
     10.218.0.1..3: etcd on 2379 (clients, TLS) and 2380 (peers, TLS)

A throwaway CA (the cryptography library) signs the members' certificates
(serverAuth and clientAuth: etcd's gateway dials its own gRPC port with it),
root's client certificate (CN=root: etcdctl, over gRPC, where the CN names
the user) and the group members' certificates (no CN: etcd refuses a gateway
request whose certificate has one, so they log in as a user with a password).
RBAC is on: role group-NAME may read and write /spa/groups/NAME/ and nothing
else.

The test process reaches the cluster from the client namespace: `inside()`
moves the calling thread there (setns) and back; sockets and threads made
meanwhile stay there.  One cluster per session (pytest fixture
`etcd_cluster`), about 3 s to start.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spa.group.etcd import EtcdAccess, EtcdStore
from spa.netns import Namespace, Topology, can_make_namespaces, sh

SUBNET = "10.218.0"  # inside our namespaces only
CLIENT_IP = f"{SUBNET}.100"
CLIENT_PORT, PEER_PORT = 2379, 2380
GROUPS = ("a", "b")
_CLONE_NEWNET = 0x40000000


def why_not() -> str | None:
    """None if this machine can run the cluster, else why not."""
    for tool in ("etcd", "etcdctl"):
        if shutil.which(tool) is None:
            return f"needs the {tool} program (apt install etcd-server etcd-client)"
    return can_make_namespaces()


# -- a throwaway CA --------------------------------------------------------


@dataclass
class Pki:
    root: Path
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spa-test-etcd-ca")])
        self.cert = (self._builder(name, self.key)
                     .issuer_name(name)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = self._write("ca.crt", self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (x509.CertificateBuilder().subject_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def issue(self, name: str, *, cn: str | None, ips: tuple[str, ...] = (),
              server: bool = False) -> tuple[Path, Path]:
        """A certificate and key signed by the CA: (cert file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"spa-test {name}")]
        if cn is not None:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (self._builder(x509.Name(attrs), key)
                   .issuer_name(self.cert.subject)
                   .add_extension(x509.ExtendedKeyUsage(usages), False))
        if ips:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", key_pem))


# -- the cluster -------------------------------------------------------------


@dataclass
class Member:
    name: str
    ns: Namespace
    ip: str
    data: Path
    log: Path
    proc: subprocess.Popen[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"https://{self.ip}:{CLIENT_PORT}"


@dataclass
class EtcdCluster:
    topo: Topology
    client: Namespace
    pki: Pki
    root: Path
    members: list[Member] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)
    attached: int = 0  # namespaces put on the bridge so far (their veths' numbers)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    @property
    def bridge(self) -> str:
        """The bridge in the client namespace that every member's veth is on."""
        return f"br{self.topo.tag}"[:15]

    def attach(self, ns: Namespace, ip: str) -> None:
        """Put a namespace on the bridge at `ip` (/24, in SUBNET): a veth pair
        of its own, one end in `ns`, the other on the bridge (the etcd members,
        and the spa-server members that reach them)."""
        self.attached += 1
        tag, n = self.topo.tag, self.attached  # not Topology.link()'s a/b names
        inner, outer = f"v{tag}m{n}"[:15], f"v{tag}k{n}"[:15]
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", inner, "netns", ns.name)
        sh("ip", "link", "set", outer, "netns", self.client.name)
        ns.run("ip", "addr", "add", f"{ip}/24", "dev", inner)
        ns.run("ip", "link", "set", inner, "up")
        self.client.run("ip", "link", "set", outer, "master", self.bridge)
        self.client.run("ip", "link", "set", outer, "up")

    def _argv(self, m: Member) -> list[str]:
        crt, key = self.root / f"{m.name}.crt", self.root / f"{m.name}.key"
        cluster = ",".join(f"{o.name}=https://{o.ip}:{PEER_PORT}" for o in self.members)
        tls = ["--trusted-ca-file", str(self.pki.ca_file), "--cert-file", str(crt),
               "--key-file", str(key)]
        peer_tls = ["--peer-trusted-ca-file", str(self.pki.ca_file), "--peer-cert-file",
                    str(crt), "--peer-key-file", str(key), "--peer-client-cert-auth"]
        return ["etcd", "--name", m.name, "--data-dir", str(m.data),
                "--listen-client-urls", f"https://{m.ip}:{CLIENT_PORT}",
                "--advertise-client-urls", m.endpoint,
                "--listen-peer-urls", f"https://{m.ip}:{PEER_PORT}",
                "--initial-advertise-peer-urls", f"https://{m.ip}:{PEER_PORT}",
                "--initial-cluster", cluster, "--initial-cluster-token", self.topo.tag,
                "--initial-cluster-state", "new", "--client-cert-auth", *tls, *peer_tls,
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "warn"]

    def start(self, m: Member) -> None:
        with open(m.log, "a") as log:
            m.proc = m.ns.popen(self._argv(m), stdout=log, stderr=log)

    def kill(self, index: int) -> None:
        """SIGKILL one member (its namespace and address stay: connections
        to it are refused)."""
        m = self.members[index]
        if m.proc is not None:
            m.proc.kill()
            m.proc.wait()
            m.proc = None

    def restart(self, index: int) -> None:
        """Start a killed member again from its data directory."""
        if self.members[index].proc is None:
            self.start(self.members[index])

    def ctl(self, *args: str, timeout: float = 20) -> str:
        """etcdctl as root (its certificate's CN names the user), from the
        client namespace, against every member."""
        crt, key = self.root / "root.crt", self.root / "root.key"
        done = self.client.run("etcdctl", f"--endpoints={','.join(self.endpoints)}",
                               f"--cacert={self.pki.ca_file}", f"--cert={crt}", f"--key={key}",
                               "--dial-timeout=2s", "--command-timeout=5s", *args,
                               check=False, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = self.client.run(
                "etcdctl", f"--endpoints={','.join(self.endpoints)}",
                f"--cacert={self.pki.ca_file}", f"--cert={self.root / 'root.crt'}",
                f"--key={self.root / 'root.key'}", "--dial-timeout=1s",
                "--command-timeout=2s", "endpoint", "health", check=False, timeout=20)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = " | ".join(m.log.read_text()[-300:] for m in self.members)
                raise RuntimeError(f"etcd cluster not healthy: {done.stderr.strip()} {logs}")
            time.sleep(0.2)

    def access(self, group: str, *, user: str | None = None, timeout: float = 2.0
               ) -> EtcdAccess:
        """How member 1 of `group` reaches the cluster (its certificate, no
        CN; its user and password)."""
        who = user or f"{group}-1"
        return EtcdAccess(self.endpoints, self.pki.ca_file, self.root / "member.crt",
                          self.root / "member.key", user=who,
                          password=self.passwords.get(who, "wrong"), timeout=timeout,
                          watch_idle=10.0)

    def store(self, group: str, **kwargs: float) -> EtcdStore:
        return EtcdStore(self.access(group, **kwargs))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the calling thread in the client namespace (sockets and
        threads it makes meanwhile stay there)."""
        with in_namespace(self.client.name):
            yield


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """setns(2) for the calling thread, and back afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            yield
        finally:
            if libc.setns(home, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")
    finally:
        os.close(home)
        os.close(target)


def _wire(cluster: EtcdCluster) -> None:
    client = cluster.client
    client.run("ip", "link", "add", cluster.bridge, "type", "bridge")
    client.run("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", cluster.bridge)
    client.run("ip", "link", "set", cluster.bridge, "up")
    for m in cluster.members:
        cluster.attach(m.ns, m.ip)


def _rbac(cluster: EtcdCluster) -> None:
    """root (by certificate), then a role and a user per group."""
    cluster.ctl("user", "add", "root", "--no-password")
    cluster.ctl("user", "grant-role", "root", "root")
    for group in GROUPS:
        user, password = f"{group}-1", secrets.token_urlsafe(18)
        cluster.passwords[user] = password
        cluster.ctl("role", "add", f"group-{group}")
        cluster.ctl("role", "grant-permission", f"group-{group}", "--prefix=true", "readwrite",
                    f"/spa/groups/{group}/")
        _add_user(cluster, user, password)
        cluster.ctl("user", "grant-role", user, f"group-{group}")
    cluster.ctl("auth", "enable")


def _ctl_argv(cluster: EtcdCluster) -> list[str]:
    return ["etcdctl", f"--endpoints={','.join(cluster.endpoints)}",
            f"--cacert={cluster.pki.ca_file}", f"--cert={cluster.root / 'root.crt'}",
            f"--key={cluster.root / 'root.key'}"]


def _add_user(cluster: EtcdCluster, user: str, password: str) -> None:
    """etcdctl user add, the password on its stdin (never on argv)."""
    proc = subprocess.run(cluster.client.argv(*_ctl_argv(cluster), "user", "add", user,
                                              "--interactive=true"),
                          input=f"{password}\n{password}\n", capture_output=True, text=True,
                          timeout=20, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"etcdctl user add {user}: {proc.stderr.strip()}")


@contextlib.contextmanager
def open_cluster(root: Path, data: Path | None = None) -> Iterator[EtcdCluster]:
    """Three etcd members in namespaces, TLS and RBAC on; all removed after.
    `data`: where the members' data directories go (default: under `root`;
    benchmarks put them on a tmpfs to compare with the disk)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root if data is None else data
    data.mkdir(parents=True, exist_ok=True)
    topo = Topology()
    cluster: EtcdCluster | None = None
    try:
        client = topo.ns("etc")
        pki = Pki(root)
        cluster = EtcdCluster(topo, client, pki, root)
        for i in (1, 2, 3):
            ip = f"{SUBNET}.{i}"
            ns = topo.ns(f"e{i}")
            pki.issue(f"e{i}", cn=f"etcd-e{i}", ips=(ip,), server=True)
            cluster.members.append(Member(f"e{i}", ns, ip, data / f"e{i}.data",
                                          root / f"e{i}.log"))
        pki.issue("root", cn="root")
        pki.issue("member", cn=None)
        _wire(cluster)
        for m in cluster.members:
            cluster.start(m)
        cluster.wait_healthy()
        _rbac(cluster)
        yield cluster
    finally:
        if cluster is not None:
            for i in range(len(cluster.members)):
                cluster.kill(i)
        topo.cleanup()


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    reason = why_not()
    if reason is not None:
        pytest.skip(reason)
    with open_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def port_open(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        return True
    except OSError:
        return False
