"""Forged packets behind a live tag, replays: bounded work, known clients kept."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spa.core.verify as verify_mod
from spa.core import wire
from spa.core.errors import Reason
from spa.core.knock import knock_tag, step_of
from spa.core.limits import MAX_TRUSTED_PER_CLIENT, PER_TAG, FailureLimiter
from spa.core.verify import Accepted, Refused, Verifier
from spa.core.wire import PACKET_SIZE
from tests.world import NOW, Knocker, keys, verifier

A = ipaddress.ip_address("192.0.2.10")
B = ipaddress.ip_address("192.0.2.20")


def forged(client: str = "alice") -> bytes:
    """A live tag, random rest: what someone who saw one knock can send."""
    return b"\x01" + knock_tag(keys(client).tag_key, step_of(NOW)) + os.urandom(PACKET_SIZE - 9)


def reason(result: Accepted | Refused) -> Reason | None:
    return result.reason if isinstance(result, Refused) else None


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the cryptography (open_packet: HMAC, then AEAD)."""
    calls = [0]
    real = wire.open_packet

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(verify_mod, "open_packet", wrapper)
    return calls


def test_forgeries_from_one_source_stop_costing_cryptography(counting: list[int]) -> None:
    v = verifier(limiter=FailureLimiter(per_tag=1000, per_pair=5))
    results = [reason(v.verify(forged(), A, NOW)) for _ in range(50)]
    assert results == [Reason.BAD_MAC] * 5 + [Reason.RATE_LIMITED] * 45
    assert counting[0] == 5
    assert reason(v.verify(forged(), B, NOW)) is Reason.BAD_MAC  # another source: counted apart
    assert reason(v.verify(forged(), A, NOW + 1)) is Reason.BAD_MAC  # the next second


def test_a_tag_over_its_limit_is_shut_for_every_new_source(counting: list[int]) -> None:
    v = verifier(limiter=FailureLimiter(per_tag=20, new_reserve=10, per_pair=1000))
    spoofed = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 101)]
    results = [reason(v.verify(forged(), source, NOW)) for source in spoofed]
    assert results == [Reason.BAD_MAC] * 20 + [Reason.RATE_LIMITED] * 80
    assert counting[0] == 20
    # Another client's tag is not affected.
    assert reason(v.verify(forged("carol"), spoofed[-1], NOW)) is Reason.BAD_MAC


def test_a_known_client_gets_in_through_a_flood_of_its_own_tag() -> None:
    """The attacker replays alice's tag from alice's own address and others."""
    v = verifier(limiter=FailureLimiter(per_tag=20, new_reserve=10, per_pair=5,
                                        per_trusted_pair=1000))
    alice = Knocker("alice")
    assert isinstance(v.verify(alice.packet(), A, NOW), Accepted)  # A is now known
    for i in range(200):
        v.verify(forged(), A if i % 2 else ipaddress.ip_address(f"198.51.100.{i % 250}"),
                 NOW + 0.5)
    assert reason(v.verify(forged(), A, NOW + 0.5)) is Reason.BAD_MAC  # trusted: checked
    assert isinstance(v.verify(alice.packet(at=NOW + 0.5), A, NOW + 0.5), Accepted)
    # From an address it never used, it waits for its next tag (the tag is
    # sealed: see test_a_rate_limited_packet_resent_from_another_address_is_not_accepted).
    assert reason(v.verify(alice.packet(at=NOW + 0.5), B, NOW + 0.5)) is Reason.RATE_LIMITED
    assert reason(v.verify(alice.packet(at=NOW + 29), B, NOW + 29)) is Reason.RATE_LIMITED
    assert isinstance(v.verify(alice.packet(at=NOW + 30), B, NOW + 30), Accepted)


def test_replays_cost_no_cryptography_and_do_not_count(counting: list[int]) -> None:
    v = verifier(limiter=FailureLimiter(per_tag=5, new_reserve=2, per_pair=5))
    packet = Knocker("alice").packet()
    assert isinstance(v.verify(packet, A, NOW), Accepted)
    assert counting[0] == 1
    spoofed = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 251)]
    assert {reason(v.verify(packet, s, NOW)) for s in spoofed} == {Reason.REPLAY}
    assert counting[0] == 1
    assert isinstance(v.verify(Knocker("alice").packet(), B, NOW), Accepted)


def test_authenticated_refusals_do_not_count() -> None:
    """A client with a bad clock is not a forger: stale packets never shut its tag."""
    v = verifier(limiter=FailureLimiter(per_tag=3, new_reserve=1, per_pair=3))
    alice = Knocker("alice")
    for _ in range(10):
        assert reason(v.verify(alice.packet(at=NOW - 40), A, NOW)) in (
            Reason.STALE, Reason.UNKNOWN_TAG)
    assert isinstance(v.verify(alice.packet(), A, NOW), Accepted)


TAG = b"t" * 8
LIVE = NOW + 60  # the tag's live_until


def test_revoking_a_client_forgets_its_trusted_sources() -> None:
    limiter = FailureLimiter(per_tag=1, new_reserve=0)
    limiter.trust("alice", "192.0.2.10", NOW)
    limiter.failed(TAG, "198.51.100.1", "alice", NOW, LIVE)  # spends the tag's budget
    assert not limiter.blocked(TAG, "192.0.2.10", "alice", NOW, LIVE)
    limiter.forget("alice")
    assert limiter.blocked(TAG, "192.0.2.10", "alice", NOW, LIVE)
    assert not limiter.blocked(TAG, "192.0.2.10", "alice", NOW + 1, LIVE)  # new second


def test_trust_ends_after_its_time() -> None:
    limiter = FailureLimiter(per_tag=1, new_reserve=0, trust_seconds=10)
    limiter.trust("alice", "a", NOW)
    limiter.failed(TAG, "b", "alice", NOW + 10, LIVE)  # seals the tag
    assert limiter.blocked(TAG, "a", "alice", NOW + 10, LIVE)
    assert limiter.trusted_sources("alice", NOW + 10) == []


def test_memory_stays_bounded_under_spoofed_sources() -> None:
    limiter = FailureLimiter(per_tag=10**9, new_reserve=0, per_pair=2, max_pairs=100)
    for i in range(10_000):
        limiter.failed(TAG, f"s{i}", "bob", NOW, LIVE)
        limiter.trust("alice", f"s{i}", NOW)
    assert len(limiter._pairs) == 100
    assert limiter.trusted_sources("alice", NOW) == [f"s{i}" for i in range(9999, 9983, -1)]
    limiter.failed(TAG, "s0", "bob", NOW, LIVE)  # still counted: tracked before the cap
    assert limiter.blocked(TAG, "s0", "bob", NOW, LIVE)
    assert not limiter.blocked(TAG, "s9999", "bob", NOW, LIVE)  # untracked: counts as new


def test_limits_must_be_positive() -> None:
    for bad in ({"per_tag": 0}, {"per_pair": 0}, {"per_trusted_pair": 0}, {"max_pairs": 0},
                {"trust_seconds": -1}, {"new_reserve": PER_TAG}, {"new_reserve": -1}):
        with pytest.raises(ValueError, match="positive"):
            FailureLimiter(**bad)


def test_the_default_verifier_limits_forgeries() -> None:
    v: Verifier = verifier()
    results = {reason(v.verify(forged(), A, NOW)) for _ in range(500)}
    assert results == {Reason.BAD_MAC, Reason.RATE_LIMITED}


# ---- issue 13, finding 1: one tag's failures lock others out --------------


def forged_at(client: str, at: float) -> bytes:
    """A forgery behind `client`'s tag of the step of `at`."""
    return b"\x01" + knock_tag(keys(client).tag_key, step_of(at)) + os.urandom(PACKET_SIZE - 9)


def test_one_tags_forgeries_from_a_victims_address_never_refuse_another_client_there() -> None:
    """60 bad-MAC packets a second behind alice's live tag (an insider's own,
    or one seen on the wire), forged from bob's address or sent from behind
    his NAT, for two minutes: bob, who never knocked from there before (after
    a restart nobody is trusted), gets in every second with his own tag, and
    alice from an address she never used too."""
    v = verifier()
    bob, alice = Knocker("bob"), Knocker("alice")
    for second in range(120):
        now = NOW + second
        for _ in range(60):
            assert reason(v.verify(forged_at("alice", now), B, now)) in (
                Reason.BAD_MAC, Reason.RATE_LIMITED)
        late = now + 0.9
        assert isinstance(v.verify(bob.packet("https", at=late), B, late), Accepted), second
        elsewhere = ipaddress.ip_address(f"203.0.113.{second % 250 + 1}")
        assert isinstance(v.verify(alice.packet(at=late), elsewhere, late), Accepted), second


def test_the_budget_favours_pairs_not_seen_failing(counting: list[int]) -> None:
    """50 sources (a botnet, a NAT full of neighbours) keep forging alice's tag,
    40 a second each, for a minute: the tag is never shut, what they cost stays
    within the tag's budget, and alice from an address she never used is
    verified and let in every second."""
    v = verifier()
    botnet = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 51)]
    alice = Knocker("alice")
    for second in range(60):
        now = NOW + second
        before = counting[0]
        for _ in range(40):
            for source in botnet:
                v.verify(forged_at("alice", now), source, now)
        assert counting[0] - before <= PER_TAG, second
        assert v.limiter.shut_tags(now) == {}, second
        new = ipaddress.ip_address(f"203.0.113.{second + 1}")
        assert isinstance(v.verify(alice.packet(at=now + 0.5), new, now + 0.5), Accepted), second


def test_a_flood_from_a_trusted_source_costs_bounded_work_and_hands_nothing_over(
        counting: list[int]) -> None:
    """Forging alice's tag from her own known address: at most
    per_trusted_pair HMACs a second; a knock of hers refused there is not
    accepted from the attacker's address afterwards (the tag is sealed for
    untrusted sources), and is from another address she knocked from."""
    v = verifier(limiter=FailureLimiter(per_trusted_pair=30))
    alice = Knocker("alice")
    home, office = A, B
    assert isinstance(v.verify(alice.packet(), home, NOW), Accepted)
    assert isinstance(v.verify(alice.packet(), office, NOW), Accepted)
    for second in range(1, 21):  # every second of NOW's step, its tag throughout
        now = NOW + second
        before = counting[0]
        for _ in range(500):
            v.verify(forged_at("alice", NOW), home, now)
        assert counting[0] - before <= 30, second
        if second == 20:
            knock = alice.packet(at=now + 0.5)
            assert reason(v.verify(knock, home, now + 0.5)) is Reason.RATE_LIMITED
    tag = knock[1:9]
    assert v.limiter.shut_tags(NOW + 21) == {tag: "alice"}
    attacker = ipaddress.ip_address("203.0.113.66")
    assert reason(v.verify(knock, attacker, NOW + 22)) is Reason.RATE_LIMITED
    assert isinstance(v.verify(knock, office, NOW + 23), Accepted)  # her own address


def test_shut_tags_and_trusted_sources_for_the_kernel_filter() -> None:
    """The interface the kernel side builds on: which tags are refused to
    untrusted sources now (and whose), and from where each client is trusted."""
    limiter = FailureLimiter(per_tag=10, new_reserve=5, trust_seconds=100)
    other = b"u" * 8
    for i in range(9):
        limiter.failed(TAG, f"198.51.100.{i}", "alice", NOW, LIVE)
        limiter.failed(other, f"198.51.100.{i}", "bob", NOW, LIVE)
    assert limiter.shut_tags(NOW) == {}
    limiter.failed(TAG, "198.51.100.99", "alice", NOW, LIVE)
    assert limiter.shut_tags(NOW) == {TAG: "alice"}
    assert limiter.shut_tags(NOW + 59.9) == {TAG: "alice"}  # as long as the tag can pass
    assert limiter.shut_tags(LIVE) == {}
    for i in range(MAX_TRUSTED_PER_CLIENT + 4):
        limiter.trust("alice", f"192.0.2.{i}", NOW + i)
    limiter.trust("alice", "192.0.2.10", NOW + 30)  # again: the most recent now
    expected = ["192.0.2.10"] + [f"192.0.2.{i}" for i in range(19, 3, -1) if i != 10]
    assert limiter.trusted_sources("alice", NOW + 30) == expected
    assert len(expected) == MAX_TRUSTED_PER_CLIENT
    assert limiter.trusted_sources("alice", NOW + 118) == ["192.0.2.10", "192.0.2.19"]
    assert limiter.trusted_sources("alice", NOW + 130) == []
    assert limiter.trusted_sources("bob", NOW) == []


def test_trust_is_dumped_and_restored_bounded_and_without_the_expired() -> None:
    limiter = FailureLimiter(trust_seconds=100)
    for i in range(20):
        limiter.trust("alice", f"192.0.2.{i}", NOW + i)
    limiter.trust("bob", "192.0.2.1", NOW)
    saved = limiter.dump_trust(NOW + 50)
    assert len(saved) == MAX_TRUSTED_PER_CLIENT + 1
    restored = FailureLimiter(trust_seconds=100)
    restored.restore_trust([*saved, ("carol", "x", NOW + 10), ("dave", "y", NOW + 10**9)],
                           NOW + 60)
    assert restored.trusted_sources("alice", NOW + 60) == limiter.trusted_sources(
        "alice", NOW + 60)
    assert restored.trusted_sources("bob", NOW + 60) == ["192.0.2.1"]
    assert restored.trusted_sources("bob", NOW + 100) == []  # it ends when it would have
    assert restored.trusted_sources("carol", NOW + 60) == []  # expired: dropped
    assert restored.dump_trust(NOW + 60)[-1] == ("dave", "y", NOW + 160)  # never longer


@given(st.lists(st.tuples(st.integers(0, 3),  # seconds to wait
                          st.integers(0, 5),  # which tag (of which client)
                          st.integers(0, 10**6),  # source
                          st.integers(1, 400)),  # packets
                min_size=1, max_size=40))
@example([(0, 0, 8, 49), (0, 1, 0, 14), (0, 0, 97, 72)])  # a full pair table: trusted unlimited
@settings(max_examples=100)
def test_memory_and_work_stay_bounded_under_any_flood(
        bursts: list[tuple[int, int, int, int]]) -> None:
    """Any sequence of bursts from any sources behind any tags, over many
    seconds, some sources trusted: counters hold at most max_pairs pairs,
    each tag's untrusted failures a second stay within per_tag, each trusted
    pair's within per_trusted_pair, and a pair not seen failing is refused
    only when its tag is shut."""
    limiter = FailureLimiter(per_tag=50, new_reserve=20, per_pair=4, per_trusted_pair=10,
                             max_pairs=64)
    clients = ["alice", "bob", "carol"]
    for i, client in enumerate(clients):
        limiter.trust(client, f"s{i}", NOW)
    now = NOW
    spent: dict[tuple[int, bytes, bool], int] = {}
    for wait, which, source_number, packets in bursts:
        now += wait
        tag, client = bytes([which]) * 8, clients[which % 3]
        for k in range(packets):
            source = f"s{(source_number + k) % 7 if source_number % 2 else source_number + k}"
            trusted = source in limiter.trusted_sources(client, now)
            fresh = ((tag, source) not in limiter._pairs
                     and (tag, source) not in limiter._last_pairs)
            if limiter.blocked(tag, source, client, now, now + 60):
                assert not fresh or trusted or tag in limiter.shut_tags(now)
                continue
            limiter.failed(tag, source, client, now, now + 60)
            key = (int(now), tag, trusted)
            spent[key] = spent.get(key, 0) + 1
            # at most 64 untrusted pairs, and the trusted ones (one per client, any tag)
            assert len(limiter._pairs) <= 64 + 3 * 6 and len(limiter._last_pairs) <= 64 + 3 * 6
            assert len(limiter._tags) <= 6 and len(limiter._sealed) <= 6
    for (_, _, trusted), count in spent.items():
        assert count <= (10 if trusted else 50)  # one trusted source per client here


def test_only_a_knock_that_passed_every_check_makes_its_source_trusted() -> None:
    """From the live fuzz (issue 13): trust came with authentication alone,
    so a key holder's knocks refused by policy (a service it may not open, an
    address it may not name; a revoked client's key still authenticates) made
    any source trusted, and a flood of the tag from there passed the limits.
    Now only an accepted knock trusts its source, and one refused later for
    its forged source is taken back (spa.server.daemon)."""
    v = verifier()
    alice = Knocker("alice")
    elsewhere = ipaddress.ip_address("203.0.113.9")
    refused = v.verify(alice.packet("ssh", address=elsewhere), A, NOW)
    assert reason(refused) is Reason.ADDRESS_NOT_ALLOWED
    assert v.limiter.trusted_sources("alice", NOW) == []
    assert isinstance(v.verify(alice.packet(), A, NOW), Accepted)
    assert v.limiter.trusted_sources("alice", NOW) == [str(A)]
    v.limiter.distrust("alice", A)
    assert v.limiter.trusted_sources("alice", NOW) == []
