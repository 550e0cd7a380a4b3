"""The group's admin commands against a real 3-member etcd cluster with TLS
and RBAC (tests/etcd_world.py), run in process through spa-server's entry
point: group init, join, status, enroll, revoke, rotate, clients; the roles
`spa-server group roles` prints (the admin writes the group, a member reads it and
writes only its claims, leases, activations and member record); another
group's member reads nothing of this one; status fails when etcd has no
quorum."""

from __future__ import annotations

import io
import ipaddress
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spa import cli
from spa.core.keys import derive_keys
from spa.core.uri import parse as parse_uri
from spa.group import layout, rbac
from spa.group.clients import decode_client
from spa.group.etcd import EtcdAccess, EtcdStore
from spa.group.kv import Put, StorePermissionError
from spa.group.records import decode_revocation
from tests.etcd_world import EtcdCluster, _add_user

TIMEOUT = "1"  # seconds per etcd call and endpoint


@dataclass
class Group:
    cluster: EtcdCluster
    name: str
    dir: Path
    config: Path
    admin_password: str
    member_password: str

    @property
    def member_user(self) -> str:
        return f"{self.name}-gw1"

    def tls(self) -> list[str]:
        root = self.cluster.root
        return [*(a for e in self.cluster.endpoints for a in ("--endpoint", e)),
                "--ca", str(self.cluster.pki.ca_file), "--cert", str(root / "member.crt"),
                "--key", str(root / "member.key")]

    def admin(self) -> list[str]:
        return ["--admin-user", f"{self.name}-admin", "--admin-password-file",
                str(self.dir / "admin-password")]

    def member_store(self) -> EtcdStore:
        root = self.cluster.root
        return EtcdStore(EtcdAccess(self.cluster.endpoints, self.cluster.pki.ca_file,
                                    root / "member.crt", root / "member.key",
                                    user=self.member_user, password=self.member_password,
                                    timeout=2.0))


def grant_roles(cluster: EtcdCluster, group: str, admin_password: str,
                member_password: str) -> None:
    """The roles `spa-server group roles` prints (spa.group.rbac), as etcd's root."""
    passwords = {rbac.admin_user(group): admin_password,
                 rbac.member_user(group, "gw1"): member_password}
    for argv in rbac.role_commands(group, ["gw1"]):
        if argv[:2] == ["user", "add"]:
            _add_user(cluster, argv[2], passwords[argv[2]])  # the password on stdin
        else:
            cluster.ctl(*argv)


@pytest.fixture
def group(etcd_cluster: EtcdCluster, tmp_path: Path) -> Iterator[Group]:
    name = "adm" + secrets.token_hex(3)
    admin_password, member_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    grant_roles(etcd_cluster, name, admin_password, member_password)
    for file, secret in (("admin-password", admin_password), ("password", member_password)):
        (tmp_path / file).write_text(secret + "\n")
        (tmp_path / file).chmod(0o600)
    found = Group(etcd_cluster, name, tmp_path, tmp_path / "server.toml", admin_password,
                  member_password)
    try:
        with etcd_cluster.inside():
            yield found
    finally:
        for i in range(len(etcd_cluster.members)):
            etcd_cluster.restart(i)
        etcd_cluster.wait_healthy()


@pytest.fixture
def spa_server(group: Group, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> object:
    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["spa-server", "--config", str(group.config), *args])
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        with pytest.raises(SystemExit) as done:
            cli.main()
        out = capsys.readouterr()
        for text in (out.out, out.err):
            assert group.admin_password not in text and group.member_password not in text
        return int(done.value.code or 0), out.out, out.err

    assert run("init", "--state-dir", str(group.dir / "state"), "--backend", "memory")[0] == 0
    return run


def joined(group: Group, run: object) -> None:
    assert callable(run)
    status, _, err = run("group", "init", "--group", group.name, *group.tls(),
                           *group.admin())
    assert status == 0, err
    status, _, err = run("group", "join", "--group", group.name, "--member", "gw1",
                           "--user", group.member_user, "--password-file",
                           str(group.dir / "password"), "--timeout", TIMEOUT, *group.tls())
    assert status == 0, err


def test_init_join_enroll_revoke_rotate_and_status_on_a_real_cluster(
        group: Group, spa_server: object) -> None:
    run = spa_server
    assert callable(run)
    joined(group, run)
    status, out, err = run("enroll", "alice", "--service", "ssh", "--endpoint",
                           "gw.example", "--uri-only", *group.admin())
    assert status == 0, err
    enrollment = parse_uri(out.strip())
    store = group.member_store()  # what a member reads
    item = store.get(layout.client_key(group.name, "alice").encode())
    assert item is not None
    client = decode_client(item.value, enrollment.server_id)
    assert client.keys == derive_keys(enrollment.secret, enrollment.server_id)
    assert enrollment.secret not in item.value
    status, out, err = run("rotate", "alice", "--endpoint", "gw.example", "--grace", "1m",
                           *group.admin())
    assert status == 0, err
    rotated = parse_uri(next(line.strip() for line in out.splitlines() if "spa1://" in line))
    item = store.get(layout.client_key(group.name, "alice").encode())
    assert item is not None
    assert decode_client(item.value, enrollment.server_id).keys == derive_keys(
        rotated.secret, rotated.server_id)
    status, out, err = run("revoke", "alice", "--close", *group.admin())
    assert status == 0 and f"alice is revoked in group {group.name}" in out, err
    revoked = store.get(layout.revoked_key(group.name, "alice").encode())
    assert revoked is not None and decode_revocation(revoked.value).close
    status, out, err = run("clients")
    assert status == 0 and out.splitlines()[1].split()[:2] == ["alice", "revoked"], out
    status, out, err = run("group", "status")
    assert status == 0, err
    assert out.count(" ok") == 3, out
    assert "clients: 1 (1 revoked, 0 active, 0 pending, 0 expired)" in out


def test_a_member_reads_its_group_writes_only_its_own_keys_and_no_other_group(
        group: Group, spa_server: object) -> None:
    joined(group, spa_server)
    member = group.member_store()
    g = group.name
    meta = member.get(layout.meta_key(g).encode())
    assert meta is not None
    for key in (layout.client_key(g, "mallory"), layout.revoked_key(g, "alice"),
                layout.meta_key(g), layout.member_key(g, "gw2")):
        with pytest.raises(StorePermissionError):
            member.put(key.encode(), b"x")
    with pytest.raises(StorePermissionError):
        member.delete(layout.meta_key(g).encode())
    claim = layout.claim_key(g, "alice", bytes(24)).encode()
    assert member.create(claim, b"claimed")
    # the claimer's transaction: claims and lease records together, on the member's role
    batch = [Put(layout.claim_key(g, "alice", bytes([n]) * 24).encode(), b"claimed")
             for n in (1, 2)]
    lease = layout.lease_key(g, "alice", ipaddress.ip_address("192.0.2.7"), "ssh").encode()
    assert member.create_many(batch, [Put(lease, b"lease")]) == frozenset()
    with pytest.raises(StorePermissionError):  # a write outside its own kinds spoils it all
        member.create_many([Put(layout.claim_key(g, "alice", bytes([3]) * 24).encode(), b"c")],
                           [Put(layout.client_key(g, "mallory").encode(), b"x")])
    assert member.get(layout.claim_key(g, "alice", bytes([3]) * 24).encode()) is None
    assert member.put(layout.member_key(g, "gw1").encode(), b"me") > 0
    other = group.cluster.store("a", timeout=2.0)  # group a's member (tests/etcd_world.py)
    with pytest.raises(StorePermissionError):
        other.get(layout.meta_key(g).encode())
    with pytest.raises(StorePermissionError):
        other.get_prefix(layout.group_prefix(g).encode())
    with pytest.raises(StorePermissionError):
        member.get_prefix(layout.group_prefix("a").encode())


def test_a_member_login_cannot_enroll(group: Group, spa_server: object) -> None:
    run = spa_server
    assert callable(run)
    joined(group, run)
    status, _, err = run("enroll", "mallory", "--service", "ssh", "--endpoint", "gw.example",
                         "--admin-user", group.member_user, "--admin-password-file",
                         str(group.dir / "password"))
    assert status == 2 and "permission denied" in err and len(err.strip().splitlines()) == 1
    assert group.member_store().get(layout.client_key(group.name, "mallory").encode()) is None


def test_status_fails_when_etcd_has_no_quorum(group: Group, spa_server: object) -> None:
    run = spa_server
    assert callable(run)
    joined(group, run)
    group.cluster.kill(0)
    group.cluster.kill(1)
    started = time.monotonic()
    status, out, err = run("group", "status")
    assert status == 1, (out, err)
    assert "etcd: no endpoint answered" in err and out.count(" ok") == 0
    assert time.monotonic() - started < 60


def test_a_standalone_server_moves_in_and_its_clients_uris_keep_working(
        group: Group, spa_server: object) -> None:
    run = spa_server
    assert callable(run)
    status, out, err = run("enroll", "alice", "--service", "ssh", "--endpoint", "203.0.113.1",
                           "--uri-only")
    assert status == 0, err
    before = parse_uri(out.strip())
    status, out, err = run("group", "init", "--group", group.name, "--from-this-server",
                           *group.tls(), *group.admin())
    assert status == 0 and "added 1: alice" in out, err
    status, _, err = run("group", "join", "--group", group.name, "--member", "gw1",
                         "--password-file", str(group.dir / "password"), "--timeout", TIMEOUT,
                         *group.tls())
    assert status == 0, err  # its own id is the group's: nothing to strand
    item = group.member_store().get(layout.client_key(group.name, "alice").encode())
    assert item is not None
    assert decode_client(item.value, before.server_id).keys == derive_keys(
        before.secret, before.server_id)
    status, out, _ = run("clients")
    assert out.splitlines()[1].split()[:2] == ["alice", "active"]


def test_the_daemon_opens_the_store_join_wrote_with_the_members_own_login(
        group: Group, spa_server: object) -> None:
    from spa.server import config as config_mod
    from spa.server import groupstore, runner

    joined(group, spa_server)
    config = config_mod.load(group.config)
    opened = runner._group_store(config)
    assert opened is not None
    settings, kv = opened
    meta = groupstore.read_meta(kv, settings, settings.user)
    groupstore.check_server_id(config, meta)  # join wrote the group's id
    with pytest.raises(StorePermissionError):
        kv.put(layout.client_key(group.name, "mallory").encode(), b"x")
