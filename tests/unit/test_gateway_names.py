"""A gateway service's host by DNS name (issue 17): the name's syntax, the
choice among answers, the cache, lookups off the receive thread, and leases
that keep the address their grant resolved, through a restart
(spa/core/gwhost.py, spa/server/gwresolve.py, spa/core/leases.py)."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from spa.core.errors import Reason
from spa.core.gwhost import CACHE_SECONDS, NameCache, choose, host_name_problem
from spa.core.leases import Allow, Lease, LeaseTable, Remove, restore_saved
from spa.core.policy import Decision
from spa.core.verify import Accepted
from spa.server.gwresolve import FakeResolver, Lookups
from spa.server.metrics import Metrics
from tests.server_world import START, World

ip = ipaddress.ip_address
NAME = "db.internal"
GATEWAY = (f'\n[services.db]\nport = 22\ndefault_duration = 60\nmax_duration = 300\n'
           f'host = "{NAME}"\n')
A, B = "192.0.2.10", "192.0.2.20"


@pytest.mark.parametrize("name", ["db.internal", "db", "DB-1.example.org", "db.internal.",
                                  "a" * 63 + ".b", "xn--bcher-kva.example"])
def test_a_dns_host_name_is_taken(name: str) -> None:
    assert host_name_problem(name) == ""


@pytest.mark.parametrize("name", ["", ".", "db..internal", "-db.internal", "db-.internal",
                                  "db_1.internal", "db internal", "10.20.0", "10.20.0.5.6",
                                  "a" * 64 + ".b", "db/../x", "-oProxyCommand", "db.internal%2",
                                  ("a" * 60 + ".") * 5])
def test_a_malformed_name_is_refused(name: str) -> None:
    assert host_name_problem(name)


def test_the_first_answer_of_the_clients_ip_version_is_chosen_fail_closed() -> None:
    answers = [ip("fd00:20::5"), ip("10.20.0.5"), ip("10.20.0.6")]
    assert choose(answers, 4) == ip("10.20.0.5")
    assert choose(answers, 6) == ip("fd00:20::5")
    assert choose([ip("10.20.0.5")], 6) is Reason.HOST_UNRESOLVED
    assert choose([], 4) is Reason.HOST_UNRESOLVED
    # a first answer no gateway may reach refuses the grant (the next is not tried)
    assert choose([ip("127.0.0.1"), ip("10.20.0.5")], 4) is Reason.HOST_NOT_ALLOWED
    assert choose([ip("fe80::5")], 6) is Reason.HOST_NOT_ALLOWED


def test_the_cache_keeps_an_answer_at_most_its_bound_and_its_size() -> None:
    cache = NameCache(size=2)
    cache.put("DB.internal", 4, ip("10.20.0.5"), now=100.0)
    assert cache.get("db.internal", 4, now=100.0 + CACHE_SECONDS - 0.01) == ip("10.20.0.5")
    assert cache.get("db.internal", 6, now=100.0) is None
    assert cache.get("db.internal", 4, now=100.0 + CACHE_SECONDS) is None
    for i in range(3):
        cache.put(f"h{i}", 4, ip(f"10.0.0.{i + 1}"), now=200.0)
    assert len(cache) == 2 and cache.get("h0", 4, now=200.0) is None


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def test_a_lookup_resolves_fails_and_is_cached_for_a_bounded_time() -> None:
    resolver = FakeResolver({NAME: ["10.20.0.5", "fd00:20::5"]})
    clock = Clock()
    lookups = Lookups(resolver, clock=clock)
    try:
        assert lookups.resolve(NAME, 4) == ip("10.20.0.5")
        assert lookups.resolve(NAME, 6) == ip("fd00:20::5")
        assert lookups.resolve(NAME, 4) == ip("10.20.0.5")
        assert resolver.asked == [(NAME, 4), (NAME, 6)], "the second v4 answer was cached"
        resolver.answers[NAME] = ["10.20.0.7"]
        clock.now += CACHE_SECONDS
        assert lookups.resolve(NAME, 4) == ip("10.20.0.7"), "asked again once the bound passed"
        assert lookups.resolve("nowhere.internal", 4) is Reason.HOST_UNRESOLVED
        assert lookups.resolve("nowhere.internal", 4) is Reason.HOST_UNRESOLVED
        assert resolver.asked.count(("nowhere.internal", 4)) == 2, "a failure is never kept"
    finally:
        lookups.close()


def test_a_resolver_that_does_not_answer_refuses_off_the_callers_thread() -> None:
    """The receive thread only queues: the outcome comes from the lookups'
    own thread, and a resolver that never answers is host_unresolved once
    the timeout passes (it is still hung then)."""
    resolver = FakeResolver({NAME: ["10.20.0.5"]})
    resolver.hang.set()
    lookups = Lookups(resolver, clock=Clock(), timeout=0.3)
    got: list[tuple[object, threading.Thread]] = []
    done = threading.Event()

    def answered(outcome: object) -> None:
        got.append((outcome, threading.current_thread()))
        done.set()

    try:
        lookups.submit(NAME, 4, answered)
        assert done.wait(30)
        assert got[0][0] is Reason.HOST_UNRESOLVED
        assert got[0][1] is not threading.current_thread()
        assert resolver.asked == [(NAME, 4)] and not resolver.released.is_set()
    finally:
        resolver.released.set()
        lookups.close()


def test_each_pair_keeps_the_destination_its_first_grant_resolved() -> None:
    table = LeaseTable()
    first = table.grant("alice", ip(A), "db", now=0, duration=60, destination=ip("10.20.0.5"))
    assert first == [Allow(ip(A), "db", 60, ip("10.20.0.5"))]
    # the name now answers otherwise: a lease from another address gets the new address...
    other = table.grant("alice", ip(B), "db", now=1, duration=60, destination=ip("10.20.0.6"))
    assert other == [Allow(ip(B), "db", 61, ip("10.20.0.6"))]
    # ...and the open pair keeps its own (a renewal, or another client behind the same NAT)
    renewed = table.grant("bob", ip(A), "db", now=2, duration=60, destination=ip("10.20.0.9"))
    assert renewed == [Allow(ip(A), "db", 62, ip("10.20.0.5"))]
    assert table.destinations() == {(ip(A), "db"): ip("10.20.0.5"),
                                    (ip(B), "db"): ip("10.20.0.6")}
    saved = table.leases()
    assert {(lease.address, lease.destination) for lease in saved} == {
        (ip(A), ip("10.20.0.5")), (ip(B), ip("10.20.0.6"))}
    restored = LeaseTable.from_leases(saved, now=3)
    assert restored.destinations() == table.destinations()
    assert table.close("alice", ip(B), "db", now=4) == [Remove(ip(B), "db", ip("10.20.0.6"))]
    assert table.destination(ip(B), "db") is None


def test_a_saved_lease_is_kept_only_with_a_destination_that_fits_its_service() -> None:
    saved = [Lease("alice", ip(A), "db", START + 30, ip("10.20.0.5")),
             Lease("alice", ip(B), "db", START + 30),  # named, no destination
             Lease("alice", ip(A), "ssh", START + 30, ip("10.20.0.5")),  # not named
             Lease("alice", ip(B), "db", START + 30, ip("fd00:20::5"))]  # another IP version
    restored = restore_saved(saved, clients={"alice"}, max_durations={"db": 300, "ssh": 300},
                             now=START, named={"db"})
    assert restored.kept == saved[:1] and restored.dropped == 3


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.init()
    with w.config_path.open("a") as config:
        config.write(GATEWAY)
    w.enroll("alice", "ssh", "db")
    w.resolver = FakeResolver({NAME: ["10.20.0.5"]})
    w.start()
    return w


def knock(world: World, source: str) -> None:
    assert world.server is not None
    assert isinstance(world.server.handle(world.packet("alice", "db", duration=60), source),
                      Accepted)
    world.server.lookups.settle()


def test_a_knock_is_granted_to_the_address_its_name_resolves_to(world: World) -> None:
    knock(world, A)
    assert world.backend.grants == {(ip(A), "db"): START + 60}
    assert world.backend.destinations == {(ip(A), "db"): ip("10.20.0.5")}
    assert [e.outcome for e in world.events()] == ["accepted", "lease_start"]


def test_a_name_that_does_not_resolve_refuses_the_grant_with_its_reason(world: World) -> None:
    assert isinstance(world.resolver, FakeResolver)
    world.resolver.answers.clear()
    world.clock.advance(CACHE_SECONDS)  # past the start's answer
    knock(world, A)
    assert world.backend.grants == {}
    refused = [e for e in world.events() if e.outcome == "refused"]
    assert [(e.reason, e.client, e.source, e.service) for e in refused] == [
        ("host_unresolved", "alice", A, "db")]
    assert any("host db.internal gave no usable IPv4 address (host_unresolved)" in line
               for line in world.logs)
    assert any(line.startswith(f"refused reason=host_unresolved client=alice src={A}")
               for line in world.logs), world.logs
    metrics = Metrics()
    metrics.observe(world.events())
    assert ('spa_knocks_total{outcome="refused",reason="host_unresolved"} 1.0'
            in generate_latest(metrics.registry).decode())
    world.resolver.answers[NAME] = ["127.0.0.1"]
    knock(world, B)
    assert world.backend.grants == {}
    assert [e.reason for e in world.events() if e.outcome == "refused"] == [
        "host_unresolved", "host_not_allowed"]
    assert sum("gave no usable" in line for line in world.logs) == 1, "one line a minute"


def test_two_leases_keep_their_own_addresses_when_the_name_changes(world: World) -> None:
    assert isinstance(world.resolver, FakeResolver)
    assert world.resolver.asked == [(NAME, 4), (NAME, 6)], "the start's, for the gate"
    world.clock.advance(CACHE_SECONDS)
    knock(world, A)
    world.resolver.answers[NAME] = ["10.20.0.6"]
    world.clock.advance(CACHE_SECONDS)
    knock(world, B)
    knock(world, A)  # a renewal: the open pair keeps its address, nothing asked
    assert world.backend.destinations == {(ip(A), "db"): ip("10.20.0.5"),
                                          (ip(B), "db"): ip("10.20.0.6")}
    assert world.resolver.asked[2:] == [(NAME, 4), (NAME, 4)]


def test_a_restart_restores_the_saved_destination_not_a_fresh_answer(world: World) -> None:
    """The name moved meanwhile: the lease keeps the address its grant got
    (the start's lookup only widens the gate's drop to the new address)."""
    assert isinstance(world.resolver, FakeResolver) and world.server is not None
    knock(world, A)
    world.server.shutdown()
    world.server = None
    world.resolver = FakeResolver({NAME: ["10.20.0.99"]})  # the name moved meanwhile
    world.clock.advance(5)
    world.start()
    assert world.backend.grants == {(ip(A), "db"): START + 60}
    assert world.backend.destinations == {(ip(A), "db"): ip("10.20.0.5")}
    assert world.backend.gated == {"db": {ip("10.20.0.99")}}


def test_the_start_gates_what_the_name_gives_before_any_lease(world: World) -> None:
    assert world.backend.gated == {"db": {ip("10.20.0.5")}}
    assert world.backend.grants == {}


def test_a_name_that_gives_nothing_at_start_is_one_warning_and_no_gate(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.init()
    with w.config_path.open("a") as config:
        config.write(GATEWAY)
    w.resolver = FakeResolver({})
    w.start()
    assert w.backend.gated == {}
    assert [line for line in w.logs if "gives no usable address now" in line] == [
        "warning gateway db: host db.internal gives no usable address now; its port is "
        "gated on an address from the first lease that gets it (docs/install.md, section 11)"]


def test_a_compat_knock_resolves_on_its_listeners_thread_and_fails_closed(world: World) -> None:
    """fwknop's packets are granted from the compat listener's own thread:
    the name is resolved there, with the same outcome and events."""
    assert world.server is not None and isinstance(world.resolver, FakeResolver)
    service = world.server.config.services["db"]
    world.server.grant_legacy("alice", (Decision(ip(A), service, 60),), world.clock.now)
    assert world.backend.destinations == {(ip(A), "db"): ip("10.20.0.5")}
    world.resolver.answers.clear()
    world.clock.advance(CACHE_SECONDS)
    world.server.grant_legacy("alice", (Decision(ip(B), service, 60),), world.clock.now)
    assert (ip(B), "db") not in world.backend.grants
    assert [(e.reason, e.legacy) for e in world.events() if e.outcome == "refused"] == [
        ("host_unresolved", True)]
