"""A group's store on a real 3-member etcd cluster (tests/etcd_world.py):
RBAC keeps a member to its group's prefix, one member down changes nothing,
two down make every call fail with StoreUnavailableError within its deadline,
and the store (and a watch) recover when they return; claims go to the
leader, and follow it to the next when it is killed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spa.group.etcd import EtcdStore
from spa.group.kv import Event, StoreError, StorePermissionError, StoreUnavailableError
from tests.etcd_world import EtcdCluster

TIMEOUT = 1.0  # seconds a call waits for one endpoint


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The session's cluster, from inside its client namespace; every member
    running again afterwards."""
    try:
        with etcd_cluster.inside():
            yield etcd_cluster
    finally:
        for i in range(len(etcd_cluster.members)):
            etcd_cluster.restart(i)
        etcd_cluster.wait_healthy()


def _retry(call: object, seconds: float = 15) -> object:
    """call() once the cluster answers (an election after a kill takes a
    moment); the last StoreUnavailableError if it never does."""
    assert callable(call)
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_the_cluster_has_three_started_members(cluster: EtcdCluster) -> None:
    listed = cluster.ctl("member", "list")
    assert listed.count(", started, ") == 3, listed
    store = cluster.store("a", timeout=TIMEOUT)
    assert store.create(b"/spa/groups/a/up", b"yes") in (True, False)
    assert store.get(b"/spa/groups/a/up") is not None


def test_a_member_of_group_a_cannot_read_or_write_group_b(cluster: EtcdCluster) -> None:
    a, b = cluster.store("a", timeout=TIMEOUT), cluster.store("b", timeout=TIMEOUT)
    b.put(b"/spa/groups/b/secret-table", b"b's clients")
    with pytest.raises(StorePermissionError, match="permission denied"):
        a.get(b"/spa/groups/b/secret-table")
    with pytest.raises(StorePermissionError):
        a.get_prefix(b"/spa/groups/b/")
    with pytest.raises(StorePermissionError):
        a.put(b"/spa/groups/b/secret-table", b"overwritten")
    with pytest.raises(StorePermissionError):
        a.get(b"/spa/other")  # nor anything outside /spa/groups/a/
    item = b.get(b"/spa/groups/b/secret-table")
    assert item is not None
    assert item.value == b"b's clients"


def test_a_wrong_password_is_refused_and_never_shown(cluster: EtcdCluster) -> None:
    access = cluster.access("a", timeout=TIMEOUT)
    wrong = "not-" + (access.password or "")
    store = EtcdStore(type(access)(access.endpoints, access.ca_file, access.cert_file,
                                   access.key_file, access.user, wrong, TIMEOUT))
    with pytest.raises(StoreError) as caught:
        store.get(b"/spa/groups/a/x")
    assert not isinstance(caught.value, StoreUnavailableError)
    assert wrong not in str(caught.value)
    assert "a-1" in str(caught.value)


def test_the_root_certificate_does_not_make_a_gateway_client_root(
        cluster: EtcdCluster) -> None:
    """etcd's gateway ignores (refuses) a certificate's CN: holding root's
    certificate gives a gateway client nothing without root's password."""
    access = cluster.access("a", timeout=TIMEOUT)
    store = EtcdStore(type(access)(access.endpoints, access.ca_file,
                                   cluster.root / "root.crt", cluster.root / "root.key",
                                   timeout=TIMEOUT))
    with pytest.raises(StoreError) as caught:
        store.get(b"/spa/groups/b/secret-table")
    assert not isinstance(caught.value, StoreUnavailableError)


def test_with_one_member_killed_the_group_still_works(cluster: EtcdCluster) -> None:
    store = cluster.store("a", timeout=TIMEOUT)
    store.put(b"/spa/groups/a/before", b"1")
    cluster.kill(0)  # the endpoint the store tries first
    _retry(lambda: store.put(b"/spa/groups/a/during", b"2"))
    assert store.create(b"/spa/groups/a/claim-with-two", b"me") is True
    lease = store.grant(10)
    store.put(b"/spa/groups/a/leased", b"v", lease=lease)
    items, _ = store.get_prefix(b"/spa/groups/a/")
    assert {b"/spa/groups/a/before", b"/spa/groups/a/during",
            b"/spa/groups/a/leased"} <= {i.key for i in items}
    store.revoke(lease)


def test_with_two_members_killed_calls_fail_unavailable_then_recover(
        cluster: EtcdCluster) -> None:
    store = cluster.store("a", timeout=TIMEOUT)
    start = store.put(b"/spa/groups/a/w/0", b"before")
    seen: list[Event] = []
    watch = store.watch_prefix(b"/spa/groups/a/w/", start, seen.append)
    try:
        cluster.kill(0)
        cluster.kill(1)
        bound = len(cluster.endpoints) * TIMEOUT + 5  # every endpoint's deadline, and slack
        for call in (lambda: store.get(b"/spa/groups/a/w/0"),
                     lambda: store.put(b"/spa/groups/a/w/1", b"no quorum"),
                     lambda: store.create(b"/spa/groups/a/w/2", b"no quorum")):
            began = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="no endpoint answered"):
                call()
            assert time.monotonic() - began < bound
        cluster.restart(0)
        cluster.restart(1)
        _retry(lambda: store.put(b"/spa/groups/a/w/3", b"after"), seconds=30)
        deadline = time.monotonic() + 30
        while not any(e.key == b"/spa/groups/a/w/3" for e in seen):
            assert time.monotonic() < deadline, seen
            time.sleep(0.1)
        keys = [e.key for e in seen]
        assert keys[0] == b"/spa/groups/a/w/0"
        assert len(keys) == len(set(zip(keys, (e.mod_revision for e in seen), strict=True)))
    finally:
        watch.cancel()


def _leader(cluster: EtcdCluster, alive: tuple[int, ...] = (0, 1, 2)) -> int | None:
    """The index of the member etcd says leads (asking the live ones), or
    None while none does."""
    urls = [cluster.members[i].endpoint for i in alive]
    done = cluster.client.run(
        "etcdctl", f"--endpoints={','.join(urls)}", f"--cacert={cluster.pki.ca_file}",
        f"--cert={cluster.root / 'root.crt'}", f"--key={cluster.root / 'root.key'}",
        "--dial-timeout=1s", "--command-timeout=2s", "endpoint", "status", "-w", "json",
        check=False, timeout=20)
    try:
        statuses = json.loads(done.stdout)
    except ValueError:
        return None
    for status in statuses:
        header = status["Status"]["header"]
        if status["Status"]["leader"] == header["member_id"]:
            return cluster.endpoints.index(status["Endpoint"])
    return None


def test_claims_go_to_the_leader_and_follow_it_when_it_is_killed(cluster: EtcdCluster) -> None:
    store = cluster.store("a", timeout=TIMEOUT)
    store._spawn = lambda fn: fn()  # learn on the claim's thread (the daemon: a thread apart)
    sent: list[int] = []
    txn = store._txn

    def recorded(c: Any, body: dict[str, Any]) -> Any:
        sent.append(store._clients.index(c))
        return txn(c, body)
    store._txn = recorded  # type: ignore[method-assign,assignment]
    if _leader(cluster) == 0:  # the configured order's first: lead elsewhere, to tell apart
        ids = {m["name"]: m["ID"] for m in json.loads(
            cluster.ctl("member", "list", "-w", "json"))["members"]}
        cluster.ctl("move-leader", f"{ids['e3']:x}")
    leader = _leader(cluster)
    assert leader is not None and leader != 0
    assert store.create(b"/spa/groups/a/lead/0", b"x") is True
    assert sent == [leader]  # learned before the first claim, and sent there
    cluster.kill(leader)
    alive = tuple(i for i in range(3) if i != leader)
    assert _retry(lambda: store.create(b"/spa/groups/a/lead/1", b"x")) is True
    deadline = time.monotonic() + 20
    while (now := _leader(cluster, alive)) is None:
        assert time.monotonic() < deadline, "no new leader"
        time.sleep(0.2)
    for n in range(2, 40):  # a claim or two until the store has learned the new leader
        sent.clear()
        assert _retry(lambda n=n: store.create(b"/spa/groups/a/lead/%d" % n, b"x")) is True
        if sent == [now]:
            break
        time.sleep(0.1)
    assert sent == [now] and now != leader
    assert store.create(b"/spa/groups/a/lead/1", b"y") is False  # still a claim: taken
