"""Forged packets behind a live tag, replays: bounded work, known clients kept."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest

import spa.core.verify as verify_mod
from spa.core import wire
from spa.core.errors import Reason
from spa.core.knock import knock_tag, step_of
from spa.core.limits import FailureLimiter
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
    v = verifier(limiter=FailureLimiter(per_tag=1000, per_source=5))
    results = [reason(v.verify(forged(), A, NOW)) for _ in range(50)]
    assert results == [Reason.BAD_MAC] * 5 + [Reason.RATE_LIMITED] * 45
    assert counting[0] == 5
    assert reason(v.verify(forged(), B, NOW)) is Reason.BAD_MAC  # another source: counted apart
    assert reason(v.verify(forged(), A, NOW + 1)) is Reason.BAD_MAC  # the next second


def test_a_tag_over_its_limit_is_shut_for_every_new_source(counting: list[int]) -> None:
    v = verifier(limiter=FailureLimiter(per_tag=20, per_source=1000))
    spoofed = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 101)]
    results = [reason(v.verify(forged(), source, NOW)) for source in spoofed]
    assert results == [Reason.BAD_MAC] * 20 + [Reason.RATE_LIMITED] * 80
    assert counting[0] == 20
    # Another client's tag is not affected.
    assert reason(v.verify(forged("carol"), spoofed[-1], NOW)) is Reason.BAD_MAC


def test_a_known_client_gets_in_through_a_flood_of_its_own_tag() -> None:
    """The attacker replays alice's tag from alice's own address and others."""
    v = verifier(limiter=FailureLimiter(per_tag=20, per_source=5))
    alice = Knocker("alice")
    assert isinstance(v.verify(alice.packet(), A, NOW), Accepted)  # A is now known
    for i in range(200):
        v.verify(forged(), A if i % 2 else ipaddress.ip_address(f"198.51.100.{i % 250}"),
                 NOW + 0.5)
    assert reason(v.verify(forged(), A, NOW + 0.5)) is Reason.BAD_MAC  # trusted: checked
    assert isinstance(v.verify(alice.packet(at=NOW + 0.5), A, NOW + 0.5), Accepted)
    # From an address it never used, it waits for the second (or the step) to end.
    assert reason(v.verify(alice.packet(at=NOW + 0.5), B, NOW + 0.5)) is Reason.RATE_LIMITED
    assert isinstance(v.verify(alice.packet(at=NOW + 1.2), B, NOW + 1.2), Accepted)


def test_replays_cost_no_cryptography_and_do_not_count(counting: list[int]) -> None:
    v = verifier(limiter=FailureLimiter(per_tag=5, per_source=5))
    packet = Knocker("alice").packet()
    assert isinstance(v.verify(packet, A, NOW), Accepted)
    assert counting[0] == 1
    spoofed = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 251)]
    assert {reason(v.verify(packet, s, NOW)) for s in spoofed} == {Reason.REPLAY}
    assert counting[0] == 1
    assert isinstance(v.verify(Knocker("alice").packet(), B, NOW), Accepted)


def test_authenticated_refusals_do_not_count() -> None:
    """A client with a bad clock is not a forger: stale packets never shut its tag."""
    v = verifier(limiter=FailureLimiter(per_tag=3, per_source=3))
    alice = Knocker("alice")
    for _ in range(10):
        assert reason(v.verify(alice.packet(at=NOW - 40), A, NOW)) in (
            Reason.STALE, Reason.UNKNOWN_TAG)
    assert isinstance(v.verify(alice.packet(), A, NOW), Accepted)


def test_revoking_a_client_forgets_its_trusted_sources() -> None:
    limiter = FailureLimiter(per_tag=1, per_source=1)
    limiter.trust("alice", "192.0.2.10", NOW)
    limiter.failed(b"t" * 8, "192.0.2.10", NOW)
    assert not limiter.blocked(b"t" * 8, "192.0.2.10", "alice", NOW)
    limiter.forget("alice")
    assert limiter.blocked(b"t" * 8, "192.0.2.10", "alice", NOW)
    assert not limiter.blocked(b"t" * 8, "192.0.2.10", "alice", NOW + 1)  # new second


def test_trust_ends_after_its_time() -> None:
    limiter = FailureLimiter(per_tag=1, per_source=1, trust_seconds=10)
    limiter.trust("alice", "a", NOW)
    limiter.failed(b"t" * 8, "a", NOW + 10)
    assert limiter.blocked(b"t" * 8, "a", "alice", NOW + 10)


def test_memory_stays_bounded_under_spoofed_sources() -> None:
    limiter = FailureLimiter(per_tag=10**9, per_source=2, max_sources=100, max_trusted=50)
    for i in range(10_000):
        limiter.failed(b"t" * 8, f"s{i}", NOW)
        limiter.trust("alice", f"s{i}", NOW)
    assert len(limiter._sources) == 100
    assert len(limiter._trusted) <= 50
    limiter.failed(b"t" * 8, "s0", NOW)  # still counted: tracked before the cap
    assert limiter.blocked(b"t" * 8, "s0", "bob", NOW)
    assert not limiter.blocked(b"t" * 8, "s9999", "bob", NOW)  # untracked: the tag still counts


def test_limits_must_be_positive() -> None:
    for bad in ({"per_tag": 0}, {"per_source": 0}, {"max_sources": 0}, {"trust_seconds": -1}):
        with pytest.raises(ValueError, match="positive"):
            FailureLimiter(**bad)


def test_the_default_verifier_limits_forgeries() -> None:
    v: Verifier = verifier()
    results = {reason(v.verify(forged(), A, NOW)) for _ in range(500)}
    assert results == {Reason.BAD_MAC, Reason.RATE_LIMITED}
