"""The replay cache: expiry, caps (fail closed), save and load."""

from __future__ import annotations

import pytest

from spa.core.errors import FormatError
from spa.core.replay import Check, ReplayCache

N1, N2, N3 = bytes([1]) * 24, bytes([2]) * 24, bytes([3]) * 24


def test_second_sight_is_a_replay_and_clients_are_separate() -> None:
    cache = ReplayCache(30)
    assert cache.check_and_add("alice", N1, 0) is Check.FRESH
    assert cache.check_and_add("alice", N1, 1) is Check.REPLAY
    assert cache.check_and_add("bob", N1, 1) is Check.FRESH
    assert len(cache) == 2


def test_entries_live_two_windows_then_go() -> None:
    cache = ReplayCache(30)
    cache.check_and_add("alice", N1, 100)
    assert cache.check_and_add("alice", N1, 159.9) is Check.REPLAY
    cache.expire(160.001)
    assert len(cache) == 0
    assert cache.check_and_add("alice", N1, 160) is Check.FRESH


def test_per_client_cap_fails_closed_and_spares_others() -> None:
    cache = ReplayCache(30, per_client_cap=2)
    assert cache.check_and_add("alice", N1, 0) is Check.FRESH
    assert cache.check_and_add("alice", N2, 0) is Check.FRESH
    assert cache.check_and_add("alice", N3, 0) is Check.FULL
    assert cache.check_and_add("alice", N1, 0) is Check.REPLAY, "a replay stays a replay"
    assert cache.check_and_add("bob", N3, 0) is Check.FRESH
    assert cache.check_and_add("alice", N3, 61) is Check.FRESH, "room again after expiry"


def test_global_cap_fails_closed_without_evicting() -> None:
    cache = ReplayCache(30, cap=2)
    cache.check_and_add("a", N1, 0)
    cache.check_and_add("b", N1, 0)
    assert cache.check_and_add("c", N1, 0) is Check.FULL
    assert cache.check_and_add("a", N1, 0) is Check.REPLAY, "nothing live was evicted"


def test_dump_and_load_keep_live_entries_only() -> None:
    cache = ReplayCache(30)
    cache.check_and_add("alice", N1, 0)
    cache.check_and_add("bøb", N2, 50)
    loaded = ReplayCache.load(cache.dump(), now=70)
    assert len(loaded) == 1
    assert loaded.check_and_add("bøb", N2, 70) is Check.REPLAY
    assert loaded.check_and_add("alice", N1, 70) is Check.FRESH
    assert loaded.window == 30
    again = ReplayCache.load(loaded.dump(), now=70)
    assert again.dump() == loaded.dump()


@pytest.mark.parametrize(
    "data",
    [b"", b"nonsense", b"SPARPL1\n", b"SPARPL1\n" + bytes(12),
     ReplayCache(30).dump() + b"x"],
)
def test_load_refuses_damaged_files(data: bytes) -> None:
    with pytest.raises(FormatError):
        ReplayCache.load(data, now=0)


def test_load_refuses_truncated_entries() -> None:
    cache = ReplayCache(30)
    cache.check_and_add("alice", N1, 0)
    with pytest.raises(FormatError):
        ReplayCache.load(cache.dump()[:-1], now=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReplayCache(0)


def test_journal_of_new_entries_restores_them_after_a_dump() -> None:
    from spa.core.replay import entry_bytes

    journal: list[bytes] = []
    cache = ReplayCache(30, on_add=lambda e, c, n: journal.append(entry_bytes(e, c, n)))
    base = cache.dump()
    cache.check_and_add("alice", N1, 0)
    cache.check_and_add("bob", N2, 1)
    cache.check_and_add("alice", N1, 2)  # a replay adds nothing
    assert len(journal) == 2
    cut = b"".join(journal) + journal[0][:-3]  # a crash cut the last record short
    restored = ReplayCache.load(base, now=5, journal=cut)
    assert restored.check_and_add("alice", N1, 5) is Check.REPLAY
    assert restored.check_and_add("bob", N2, 5) is Check.REPLAY
    assert len(restored) == 2


def test_a_wider_window_keeps_entries_longer() -> None:
    cache = ReplayCache(30)
    cache.check_and_add("alice", N1, 0)
    cache.set_window(60)
    assert cache.check_and_add("alice", N1, 100) is Check.REPLAY  # 0 + 2*60 > 100
    cache.expire(120.001)
    assert len(cache) == 0
    cache.set_window(10)  # narrower: new entries use it
    cache.check_and_add("bob", N2, 200)
    assert cache.check_and_add("bob", N2, 219) is Check.REPLAY
    cache.expire(220.001)
    assert len(cache) == 0


def test_replay_at_exactly_two_windows_is_still_caught() -> None:
    cache = ReplayCache(30)
    cache.check_and_add("alice", N1, 100)
    assert cache.check_and_add("alice", N1, 160) is Check.REPLAY  # t + 2w, inclusive
    cache.expire(160.001)
    assert len(cache) == 0


def test_widening_the_window_across_a_restart_keeps_entries() -> None:
    """Review finding: load dropped entries before widening them."""
    cache = ReplayCache(30)
    cache.check_and_add("alice", N1, 0)  # expiry 60
    loaded = ReplayCache.load(cache.dump(), now=70, window=120)  # 60 + 2*90 = 240
    assert loaded.window == 120
    assert loaded.check_and_add("alice", N1, 70) is Check.REPLAY


def test_clock_set_back_does_not_block_expiry_of_newer_entries() -> None:
    """Review finding: a FIFO head far in the future blocked all expiry."""
    cache = ReplayCache(30, per_client_cap=100)  # about 61 live a minute at one a second
    cache.check_and_add("alice", N1, 10_000)  # before the clock was set back an hour
    for second in range(200):  # one knock a second after the set-back
        nonce = second.to_bytes(24, "big")
        assert cache.check_and_add("alice", nonce, 6_400 + second) is Check.FRESH, second
