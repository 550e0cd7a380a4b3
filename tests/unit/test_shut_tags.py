"""The shut tags' hold (spa.server.shut_tags), with a controlled clock."""

from __future__ import annotations

from spa.core.limits import PER_PAIR, FailureLimiter
from spa.server.shut_tags import HOLD_SECONDS, SHUT_RATE, ShutTags, read_shut
from spa.server.sources import SHUT_SAMPLE

T0 = 1_800_000_000.0
TAG, OTHER = b"T" * 8, b"O" * 8


def test_a_tag_seen_shut_once_a_second_stays_shut_and_lifts_after_the_hold() -> None:
    """Seen in any one reading of every second (the sampled copies of a
    steady flood cross the limit at some point in each second): shut at
    every 0.2 s round for 60 s, the same value each time (no rebuilt
    program); after the last sighting, lifted within HOLD_SECONDS + 1 s."""
    shut, held = ShutTags(), []
    for tick in range(300):
        now = T0 + tick * 0.2
        if tick % 5 == 4:  # late in each second: the worst case
            shut.observe({TAG: ("198.51.100.7",)}, now)
        if tick >= 4:
            held.append(shut.current(now))
    assert all(value == {TAG: ("198.51.100.7",)} for value in held)
    last = T0 + 299 * 0.2  # the last round saw it
    lifted = next(t for t in range(1, 100) if shut.current(last + t * 0.2) == {})
    assert 0 < lifted * 0.2 <= HOLD_SECONDS + 1 + 1e-9


def test_sources_follow_the_latest_reading_and_tags_lift_apart() -> None:
    shut = ShutTags()
    shut.observe({TAG: ("a",), OTHER: ()}, T0)
    shut.observe({TAG: ("b", "a")}, T0 + 1.5)
    shut.observe({TAG: ("b", "a")}, T0 + 1.5)  # the same reading again: no change
    assert shut.current(T0 + 1.9) == {OTHER: (), TAG: ("b", "a")}
    assert shut.current(T0 + 1 + HOLD_SECONDS) == {TAG: ("b", "a")}
    assert shut.current(T0 + 2 + HOLD_SECONDS) == {}


def test_read_shut_gives_each_tag_its_clients_known_sources() -> None:
    """From the limiter's two methods alone: over the limit in this second,
    and the sources its client authenticated from, most recent first."""
    limiter = FailureLimiter(per_tag=3, new_reserve=0)
    limiter.trust("alice", "198.51.100.7", T0 - 100)
    limiter.trust("alice", "2001:db8::7", T0 - 10)
    live_until = T0 + 1.0  # the seal lasts while the tag can pass the window
    for i in range(5):
        if not limiter.blocked(TAG, f"203.0.113.{i}", "alice", T0, live_until):
            limiter.failed(TAG, f"203.0.113.{i}", "alice", T0, live_until)
    limiter.failed(OTHER, "203.0.113.9", "bob", T0, live_until)  # under its limit
    assert read_shut(limiter, T0 + 0.5) == {TAG: ("2001:db8::7", "198.51.100.7")}
    assert read_shut(limiter, T0 + 1.0) == {}, "the next second"


def test_a_flood_from_one_source_shuts_its_tag_too() -> None:
    """One source stops at its own pair's limit (PER_PAIR failures a
    second) and seals nothing; the copies refused after it before any
    cryptography count toward shutting the tag in the kernel all the same
    (every one of them wakes the receive path)."""
    limiter = FailureLimiter()
    for _ in range(SHUT_RATE + 10):
        if not limiter.blocked(TAG, "203.0.113.1", "alice", T0, T0 + 60):
            limiter.failed(TAG, "203.0.113.1", "alice", T0, T0 + 60)
    assert limiter.shut_tags(T0) == {}, "it seals nothing"
    assert read_shut(limiter, T0 + 1.5) == {TAG: ()}, "the last second's count holds"
    assert read_shut(limiter, T0 + 2.5) == {}, "gone once a whole second passed without"


def test_a_shut_tags_sampled_copies_count_as_the_flood_they_stand_for() -> None:
    """Once shut, the kernel lets one copy in SHUT_SAMPLE through: a steady
    flood keeps the tag shut on its samples alone; one that fell below
    SHUT_RATE lets it lift; a tag not shut needs the full rate."""
    limiter = FailureLimiter()
    samples = SHUT_RATE // SHUT_SAMPLE + 1
    for _ in range(samples + PER_PAIR):
        if not limiter.blocked(TAG, "203.0.113.1", "alice", T0, T0 + 60):
            limiter.failed(TAG, "203.0.113.1", "alice", T0, T0 + 60)
    assert read_shut(limiter, T0 + 0.5, {TAG}) == {TAG: ()}
    assert read_shut(limiter, T0 + 0.5) == {}, "not shut yet: a few refusals are no flood"
