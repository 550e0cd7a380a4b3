"""A claim goes to etcd's leader first (spa.group.leader, EtcdStore._claim):
the leader is found among the configured endpoints only, learned off the
claim's path, forgotten when it fails or an election shows, and without it
the configured order stands.  On a real cluster (the leader killed):
tests/netns/test_etcd_group.py."""

from __future__ import annotations

from typing import Any

from etcd3gw import exceptions as gw
from hypothesis import given
from hypothesis import strategies as st

from spa.group import leader as lead
from spa.group.etcd import EtcdStore
from spa.group.kv import Put
from tests.unit.test_group_etcd import Stub, _store

URLS = tuple(f"https://10.0.0.{i}:2379" for i in (1, 2, 3))
IDS = ("11", "22", "33")


def _members(urls: tuple[str, ...] = URLS, ids: tuple[str, ...] = IDS) -> dict[str, Any]:
    return {"header": {"raft_term": "2"}, "members": [
        {"ID": i, "name": f"e{n}", "clientURLs": [u]}
        for n, (i, u) in enumerate(zip(ids, urls, strict=True))]}


def _status(leader: str, term: int = 2) -> dict[str, Any]:
    return {"header": {"member_id": "11", "raft_term": str(term)}, "leader": leader,
            "raftTerm": str(term)}


def _ok(term: int = 2) -> dict[str, Any]:
    return {"header": {"revision": "9", "raft_term": str(term)}, "succeeded": True}


def test_the_leader_is_the_configured_endpoint_its_client_urls_name() -> None:
    assert lead.leader_index(URLS, _status("33"), _members()) == 2
    assert lead.leader_index(URLS, _status("11"), _members()) == 0
    # written another way in the config: the same host and port
    assert lead.leader_index(("https://[FD00::1]:2379/", "https://EtcD-2:2379"),
                             _status("22"), _members(
                                 ("https://[fd00::1]:2379", "https://etcd-2:2379", "https://x:1"))
                             ) == 1


def test_no_leader_or_one_outside_the_config_leaves_the_configured_order() -> None:
    assert lead.leader_index(URLS, _status("0"), _members()) is None  # an election going on
    assert lead.leader_index(URLS, _status("44"), _members()) is None  # not a member we know
    elsewhere = ("https://10.9.9.9:2379", URLS[1], URLS[2])  # e1 advertises another address
    assert lead.leader_index(URLS[:1] + URLS[1:], _status("11"), _members(elsewhere)) is None
    assert lead.leader_index(URLS, _status("33"), _members(
        (URLS[0], URLS[1], "http://10.0.0.3:2379"))) is None  # not the https we were given


@given(st.lists(st.sampled_from(["https://a:1", "https://b:2", "https://c:3", "https://d:4",
                                 "http://a:1", "https://A:1/", "junk"]), min_size=1,
                max_size=4),
       st.lists(st.lists(st.sampled_from(["https://a:1", "https://b:2", "https://e:5",
                                          "https://c:3", "bad"]), max_size=3),
                min_size=1, max_size=4),
       st.integers(0, 5))
def test_a_leader_found_is_always_a_configured_endpoint_etcd_names_for_it(
        endpoints: list[str], urls: list[list[str]], which: int) -> None:
    members = {"members": [{"ID": str(i + 1), "clientURLs": u} for i, u in enumerate(urls)]}
    found = lead.leader_index(endpoints, {"leader": str(which)}, members)
    if found is None:
        return
    assert 0 <= found < len(endpoints)
    assert 1 <= which <= len(urls)
    assert lead._host_port(endpoints[found]) in {lead._host_port(u) for u in urls[which - 1]}


def _leading(*stubs: Stub) -> EtcdStore:
    store = _store(*stubs, leader_first=True)
    store._spawn = lambda fn: fn()  # learn at once (a thread of its own in the daemon)
    return store


def _known(store: EtcdStore) -> int | None:
    """The endpoint the store takes for the leader (a call: mypy narrows fields)."""
    return store._leader.index


def test_claims_go_to_the_leader_once_learned_and_other_calls_stay_in_order() -> None:
    first, second, third = (Stub(_status("33"), _members(), {"header": {"revision": "9"}}),
                            Stub(), Stub(_ok(), _ok()))
    store = _leading(first, second, third)
    assert store.create(b"k", b"v") is True
    assert store.create_many([Put(b"k1", b"a")]) == frozenset()
    assert first.paths == ["/maintenance/status", "/cluster/member/list"]
    assert third.paths == ["/kv/txn", "/kv/txn"]
    store.put(b"k", b"v")  # not a claim: the configured order
    assert first.paths[-1] == "/kv/put"
    assert second.paths == []


def test_a_leader_that_fails_is_left_in_the_configured_order_and_learned_again() -> None:
    first = Stub(_status("22"), _members(), _ok(3))
    second = Stub(_ok(), gw.ConnectionFailedError("refused"))
    third = Stub(_ok(), _status("11", 3), _members())
    store = _leading(first, second, third)
    assert store.create(b"k0", b"v") is True  # at e2, the leader
    assert store.create(b"k1", b"v") is True  # e2 refused: failed over to e3
    assert _known(store) is None  # forgotten
    assert store.create(b"k2", b"v") is True  # learned again (asking e3): e1 leads now
    assert _known(store) == 0
    assert first.paths == ["/maintenance/status", "/cluster/member/list", "/kv/txn"]
    assert second.paths == ["/kv/txn", "/kv/txn"]
    assert third.paths == ["/kv/txn", "/maintenance/status", "/cluster/member/list"]


def test_an_answer_from_a_newer_term_makes_the_member_learn_the_leader_again() -> None:
    first = Stub(_status("33", 2), _members(), _status("22", 4), _members())
    second = Stub(_ok(4))
    third = Stub(_ok(2), _ok(4))  # the old leader forwards: its answer shows term 4
    store = _leading(first, second, third)
    assert store.create(b"k0", b"v") is True
    assert store.create(b"k1", b"v") is True
    assert _known(store) is None
    assert store.create(b"k2", b"v") is True
    assert (_known(store), store._leader.term) == (1, 4)
    assert second.paths == ["/kv/txn"]


def test_a_leader_outside_the_config_is_not_asked_for_again_before_retry() -> None:
    now = [100.0]
    first = Stub(_status("44"), _members(), _ok(), _ok(), _status("22"), _members())
    second = Stub(_ok())
    store = _leading(first, second, Stub())
    store._clock = lambda: now[0]
    assert store.create(b"k0", b"v") is True  # 44 is no configured endpoint: e1, in order
    assert store.create(b"k1", b"v") is True  # not asked again yet
    now[0] += lead.RETRY
    assert store.create(b"k2", b"v") is True  # asked again: e2 now
    assert first.paths == ["/maintenance/status", "/cluster/member/list", "/kv/txn",
                           "/kv/txn", "/maintenance/status", "/cluster/member/list"]
    assert second.paths == ["/kv/txn"]


def test_a_failed_learning_leaves_the_claim_in_the_configured_order() -> None:
    refused = gw.ConnectionFailedError("refused")
    first = Stub(refused, _ok())
    second = Stub(refused)
    store = _leading(first, second)
    store._clock = lambda: 7.0
    # learning: e1 refuses the status, e2 too -> unavailable, given up; the
    # claim then starts where failover left the order (e1 again)
    assert store.create(b"k", b"v") is True
    assert _known(store) is None
    assert first.paths == ["/maintenance/status", "/kv/txn"]
    assert second.paths == ["/maintenance/status"]


def test_a_single_endpoint_never_asks_for_the_leader() -> None:
    only = Stub(_ok())
    store = _leading(only)
    assert store.create(b"k", b"v") is True
    assert only.paths == ["/kv/txn"]


def _index(leader: lead.Leader) -> int | None:
    return leader.index  # (a call: mypy narrows fields)


def test_a_leader_learned_at_a_term_older_than_one_seen_is_not_taken() -> None:
    leader = lead.Leader(3)
    assert leader.should_learn(0.0)
    leader.seen_term(3)  # a claim's answer, while the status was on its way
    leader.learned(2, 2, 0.0)  # the status: from before that election
    assert _index(leader) is None
    assert leader.should_learn(0.0)  # at the next claim
    leader.learned(1, 3, 0.0)
    assert (_index(leader), leader.term) == (1, 3)


def test_a_status_without_a_term_does_not_make_every_claim_learn_again() -> None:
    leader = lead.Leader(3)
    assert leader.should_learn(0.0)
    leader.learned(1, 0, 0.0)
    leader.seen_term(2)  # the first answer's term: newer than "none"
    assert leader.should_learn(0.0)
    leader.learned(1, 0, 0.0)
    leader.seen_term(2)
    assert _index(leader) == 1
    assert not leader.should_learn(0.0)


def test_an_answer_not_shaped_as_etcds_is_a_failed_learning_and_learned_again() -> None:
    """A member list etcd would not write (a port of Unicode digits, which
    str.isdigit takes and int refuses; no list of URLs; not an object) made
    leader_index raise: the learning thread died with `learning` still set,
    so the leader was never learned again (every claim went in the
    configured order for the rest of the daemon's life)."""
    for odd in ({"members": [{"ID": "22", "clientURLs": ["https://10.0.0.2:\u00b2"]}]},
                {"members": [{"ID": "22", "clientURLs": None}]},
                {"members": ["22"]}, {"members": None}):
        now = [50.0]
        raised: list[BaseException] = []
        first = Stub(_status("22"), odd, _ok(), _status("22"), _members())
        second = Stub(_ok())
        store = _store(first, second, Stub(), leader_first=True)

        def clock(at: list[float] = now) -> float:
            return at[0]
        store._clock = clock

        def as_a_thread(fn: Any, raised: list[BaseException] = raised) -> None:
            try:
                fn()
            except Exception as exc:  # what the thread's death would hide
                raised.append(exc)
        store._spawn = as_a_thread
        assert store.create(b"k0", b"v") is True  # in the configured order: e1
        assert raised == [] and _known(store) is None, odd
        now[0] += lead.RETRY
        assert store.create(b"k1", b"v") is True  # learned again: e2 leads
        assert _known(store) == 1, odd
        assert second.paths == ["/kv/txn"]
