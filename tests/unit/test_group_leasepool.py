"""The shared etcd leases (spa.group.leasepool) on the memory fake, timed by
a controlled clock: one lease per second of expiry, a key never gone before
its end and gone less than 2 s after, long silences, a lease etcd lost."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from spa.core.knock import STEP_SECONDS
from spa.core.verify import DEFAULT_WINDOW
from spa.group.kv import LeaseExpiredError, StoreUnavailableError
from spa.group.leasepool import OUTLIVES_BY, LeasePool
from spa.group.memory import MemoryStore
from spa.group.records import claim_until
from tests.server_world import FakeClock


def test_ends_within_one_second_share_a_lease_and_the_next_second_gets_another() -> None:
    clock = FakeClock(1000.0)
    store = MemoryStore(clock)
    pool = LeasePool()
    now = clock.now
    first = pool.lease(now + 35.2, now, store.grant)  # the second ending at now + 36
    assert pool.lease(now + 35.9, now, store.grant) == first
    assert pool.lease(now + 35.0001, now, store.grant) == first
    assert pool.lease(now + 36.0, now, store.grant) == first
    second = pool.lease(now + 36.01, now, store.grant)
    assert second != first
    assert pool.granted == 2


def test_a_thousand_claims_over_ten_seconds_cost_about_one_grant_a_second() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    pool = LeasePool()
    for _ in range(1000):
        clock.now += 0.01
        pool.lease(clock.now + 65, clock.now, store.grant)
    assert 10 <= pool.granted <= 11
    assert len(pool) <= 11


@given(st.lists(st.tuples(st.floats(0, 3, allow_nan=False),  # time passing before it
                          st.floats(0, 70, allow_nan=False)),  # how long the key must live
                min_size=1, max_size=30))
def test_a_key_lives_until_its_end_and_is_gone_within_two_seconds_after(
        needs: list[tuple[float, float]]) -> None:
    clock = FakeClock(1000.25)
    store = MemoryStore(clock)
    pool = LeasePool()
    keys: list[tuple[bytes, float]] = []
    for i, (wait, life) in enumerate(needs):
        clock.now += wait
        end = clock.now + life
        key = b"/k/%d" % i
        store.put(key, b"v", pool.lease(end, clock.now, store.grant))
        keys.append((key, end))
    start = clock.now
    for key, end in sorted(keys, key=lambda k: k[1]):
        if end - 1e-6 > clock.now:
            clock.now = end - 1e-6
        if end > start:  # alive up to its end (one written for an end past: at least 1 s)
            assert store.get(key) is not None, (key, end, clock.now)
    for key, end in keys:
        clock.now = max(clock.now, end + 2, start + 1)
        assert store.get(key) is None, (key, end, clock.now)


def test_after_a_long_silence_the_leases_gone_are_forgotten_and_new_ones_granted() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    pool = LeasePool()
    for _ in range(5):
        clock.now += 1
        pool.lease(clock.now + 65, clock.now, store.grant)
    assert len(pool) == 5
    clock.now += 3600  # an hour without a knock
    lease = pool.lease(clock.now + 65, clock.now, store.grant)
    assert len(pool) == 1  # the five, long expired, are forgotten
    store.put(b"/k", b"v", lease)  # and the new one is alive in etcd
    clock.now += 64.9
    assert store.get(b"/k") is not None
    clock.now += 1.2
    assert store.get(b"/k") is None


def test_a_lease_etcd_lost_is_dropped_and_the_next_call_grants_anew() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    pool = LeasePool()
    lost = pool.lease(clock.now + 30, clock.now, store.grant)
    store.revoke(lost)  # behind the pool's back (an admin, a restored etcd)
    with pytest.raises(LeaseExpiredError):
        store.put(b"/k", b"v", lost)
    pool.drop(lost)
    fresh = pool.lease(clock.now + 30, clock.now, store.grant)
    assert fresh != lost
    store.put(b"/k", b"v", fresh)
    assert len(pool) == 1


def test_a_grant_that_fails_leaves_nothing_behind_and_a_bad_end_is_refused() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    pool = LeasePool()
    store.unreachable = True
    with pytest.raises(StoreUnavailableError):
        pool.lease(clock.now + 30, clock.now, store.grant)
    assert len(pool) == 0 and pool.granted == 0
    store.unreachable = False
    with pytest.raises(ValueError, match="finite"):
        pool.lease(float("inf"), clock.now, store.grant)
    with pytest.raises(ValueError, match="longest"):
        pool.lease(clock.now + 10**10, clock.now, store.grant)


class Granting:
    """The fake store's grant, remembering when each lease etcd would end."""

    def __init__(self, store: MemoryStore, clock: FakeClock) -> None:
        self.store, self.clock = store, clock
        self.expires: dict[int, float] = {}

    def grant(self, ttl: int) -> int:
        lease = self.store.grant(ttl)
        self.expires[lease] = self.clock.now + ttl
        return lease


EPSILON = 1e-6  # seconds: what float addition may add to a sum of times

# silences between knocks: short ones, and many tag steps' worth landing just
# before, on and just after a second, a step (30 s) and a claim's lifetime
SILENCE = st.one_of(
    st.floats(0, 2, allow_nan=False),
    st.builds(lambda steps, off: max(0.0, steps * STEP_SECONDS + off),
              st.integers(0, 40), st.sampled_from([-1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0])),
    st.builds(lambda whole, off: whole + off, st.integers(0, 80),
              st.sampled_from([-1e-6, 0.0, 1e-6, 0.999])))


@given(st.lists(st.tuples(SILENCE,
                          st.floats(-30, 30, allow_nan=False),  # the packet's age (its clock)
                          st.integers(1, 600)),  # the lease it asks for, seconds
                min_size=1, max_size=25),
       st.sampled_from([1000.0, 1000.25]))
@example([(0.0, 0.0, 10), (11.0, 0.0, 10)], 1000.0)  # now on the very second a lease ends
@example([(389.0, 0.0, 1), (43.000001, 0.0, 1), (-1e-06, 0.0, 1), (389.0, 0.0, 226)],
         1000.0)  # a sum of silences just under a second (float rounding in the check)
def test_over_many_steps_of_silence_the_pool_never_hands_out_a_lease_etcd_has_expired(
        knocks: list[tuple[float, float, int]], start: float) -> None:
    """The claimer's use of the pool (a claim's end, its lease record's end,
    then the next second's of each, ahead; and an end already past) after
    silences of many tag steps, on whole seconds too: every lease handed out
    is alive in the store when it is handed out, and ends no earlier than the
    end asked for (or now) and less than OUTLIVES_BY after."""
    clock = FakeClock(start)
    store = MemoryStore(clock)
    granting = Granting(store, clock)
    pool = LeasePool()
    for i, (silence, age, duration) in enumerate(knocks):
        clock.now += silence
        now = clock.now
        claim_end = claim_until(now - age, DEFAULT_WINDOW)
        for end in (claim_end, now + duration, now - 1):  # the knock's path; a past end
            lease = pool.lease(end, now, granting.grant)
            store.put(b"/k/%d" % i, b"v", lease)  # LeaseExpiredError if etcd has dropped it
            assert now < granting.expires[lease], (now, end)
            assert max(end, now) <= granting.expires[lease] < max(end, now) + OUTLIVES_BY
        for second in (math.ceil(claim_end) + 1, math.ceil(now + duration) + 1):  # ahead
            lease = pool.lease(second, now, granting.grant)
            # (EPSILON: the fake's now + ttl rounds: now = 1820.99999999999977
            # and a TTL of 228 make 2049.0 in floats, 2048.99999999999977 in fact)
            assert second <= granting.expires[lease] < second + 1 + EPSILON
