"""The tag table's step rotation in slices (issue 14), with a controlled clock.

The next step's tags enter during the current step and the expired step's
leave after the boundary, a few clients at a time; these tests check that
every live tag is present at every moment of it, that a revoked client's
tags are gone at once and stay gone, that a tag early or late is harmless,
and that the rotation survives hundreds of silent steps and clock jumps.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools

import pytest

from spa.core.errors import Reason
from spa.core.keys import derive_keys
from spa.core.knock import STEP_SECONDS, TagTable, knock_tag, step_of, step_start
from spa.core.policy import DEFAULT_SERVICES, ClientPolicy, Policy
from spa.core.verify import Accepted, Refused, Verifier
from spa.core.wire import Action, Request, build_packet

SERVER_ID = bytes(range(16))
START = 1_800_000_000.0  # a step boundary
TICK = 0.2  # the daemon's housekeeping period
SLICE = 7  # clients per slice: small, so a step takes many slices


def key_of(name: str, version: int = 0) -> bytes:
    return hashlib.sha256(f"{name}/{version}".encode()).digest()


def clients(count: int) -> dict[str, bytes]:
    return {f"c{i}": key_of(f"c{i}") for i in range(count)}


def assert_live(table: TagTable, keys: dict[str, bytes], where: str) -> None:
    """Every tag of every client for steps current-skew..current+skew."""
    for name, key in keys.items():
        for step in range(table.step - table.skew, table.step + table.skew + 1):
            assert table.lookup(knock_tag(key, step)) == (name, step), (
                f"{name}'s tag of step {step} missing {where}")


def settle(table: TagTable) -> None:
    while table.slice():
        pass


@pytest.mark.parametrize("skew", [1, 2])
def test_every_live_tag_is_present_at_every_moment_of_the_rotation(skew: int) -> None:
    keys = clients(45)
    table = TagTable(keys, step=100, skew=skew)
    for step in range(100, 160):
        assert_live(table, keys, f"at the start of step {step}")
        slices = 0
        while table.slice(SLICE):
            slices += 1
            assert_live(table, keys, f"after slice {slices} of step {step}")
        # the next step in (and, after the first boundary, the expired one out)
        assert slices >= (1 + (step > 100)) * len(keys) // SLICE, "it took many slices"
        far = step + skew + 1
        assert all(table.lookup(knock_tag(k, far)) == (n, far) for n, k in keys.items()), (
            "the next step's tags are in before its boundary")
        assert len(table) == (2 * skew + 2) * len(keys), "the expired step is out"
        table.advance(step + 1)


def test_late_slices_are_finished_at_the_boundary() -> None:
    """Correctness first: a boundary reached with the slices undone (a busy
    housekeeping thread) finishes them, every live tag is there."""
    keys = clients(30)
    table = TagTable(keys, step=10)
    for step in range(11, 40):
        if step % 3 == 0:
            table.slice(SLICE)  # part of it only
        table.advance(step)
        assert_live(table, keys, f"right after the boundary of {step}")
        assert len(table) == 3 * len(keys) + (table.pending() and len(keys)), (
            "no more than the expired step is left over")


def test_a_revoke_during_slicing_is_at_once_and_stays() -> None:
    keys = clients(40)
    table = TagTable(keys, step=50)
    table.slice(SLICE)  # the next step's slicing has begun
    assert table.lookup(knock_tag(keys["c0"], 52)) is not None
    assert table.lookup(knock_tag(keys["c30"], 52)) is None
    table.remove("c30")  # not yet inserted for the next step
    table.remove("c0")  # already inserted for it
    gone = {name: keys.pop(name) for name in ("c0", "c30")}
    for step in range(50, 60):
        for _ in range(3):
            for name, key in gone.items():
                for s in range(step - 2, step + 3):
                    assert table.lookup(knock_tag(key, s)) is None, f"{name} back at {s}"
            table.slice(SLICE)
        if step == 55:  # a revoke while the expired step is leaving
            table.advance(step + 1)
            table.slice(1)
            table.remove("c39")
            gone["c39"] = keys.pop("c39")
            continue
        settle(table)
        assert_live(table, keys, f"in step {step}")
        table.advance(step + 1)
    assert table.clients == frozenset(keys)


def test_a_client_added_during_slicing_is_live_at_once_and_in_the_next_step() -> None:
    keys = clients(20)
    table = TagTable(keys, step=7)
    table.slice(SLICE)
    table.add("new", key_of("new"))
    keys["new"] = key_of("new")
    assert_live(table, keys, "right after the enroll")
    settle(table)
    table.advance(8)
    assert_live(table, keys, "in the next step")


def test_clock_jumps_forwards_and_backwards_rebuild() -> None:
    keys = clients(12)
    table = TagTable(keys, step=1000)
    generation = table.generation
    for jump in (1000 + 500, 1000 + 3, 1000 - 7, 1000 - 8):
        table.slice(SLICE)
        table.advance(jump)
        assert table.step == jump
        assert_live(table, keys, f"after a jump to {jump}")
        assert len(table) == 3 * len(keys), "nothing of the old steps"
    assert table.generation == generation + 4, "a step back by one is a jump too"


def test_the_journal_gives_exactly_the_live_tags() -> None:
    keys = clients(25)
    table = TagTable(keys, step=3)
    kernel = set(table.start_journal())
    for step in range(3, 30):
        while table.slice(SLICE):
            added, removed = table.drain_changes()
            assert not set(added) & set(removed)
            kernel = (kernel - set(removed)) | set(added)
            assert kernel == set(table.all_tags())
        if step == 12:
            table.remove("c1")
            table.add("c2", key_of("c2", 1))
        if step == 20:
            table.advance(step + 40)  # a jump: the journal holds everything
        table.advance(step + 1)
        added, removed = table.drain_changes()
        kernel = (kernel - set(removed)) | set(added)
        assert kernel == set(table.all_tags())


# ---- through the verifier, with a controlled clock ----------------------------

NAMES = [f"c{i}" for i in range(20)]
SECRETS = {name: hashlib.sha256(b"secret " + name.encode()).digest() for name in NAMES}
POLICY = Policy(dict(DEFAULT_SERVICES),
                {name: ClientPolicy(name, frozenset({"ssh"})) for name in NAMES})
SRC = ipaddress.ip_address("192.0.2.10")
_NONCES = itertools.count(1)


def packet(name: str, sent: float) -> bytes:
    """A knock `name` sealed at `sent` (its tag is that time's step's)."""
    request = Request(round(sent * 1000), Action.OPEN, "ssh", 0, None, "")
    return build_packet(request, derive_keys(SECRETS[name], SERVER_ID), SERVER_ID,
                        nonce=next(_NONCES).to_bytes(24, "big"))


class Housekeeping:
    """What the daemon's housekeeping thread does to the table, at TICK."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def round(self, now: float) -> None:
        table = self.verifier.tags
        pending = table.pending()
        if pending:
            rounds = max(1, int((step_start(table.step) + STEP_SECONDS / 2 - now) / TICK))
            budget = -(-pending // rounds)
            while budget > 0 and table.slice(min(SLICE, budget)):
                budget -= SLICE
        if table.step != step_of(now):
            self.verifier.refresh(now)  # the receive thread's turn


def test_hundreds_of_silent_steps_then_a_knock_at_every_offset_matches() -> None:
    verifier = Verifier(SERVER_ID, SECRETS, POLICY, now=START)
    keeper = Housekeeping(verifier)
    now = START
    for _ in range(round(300 * STEP_SECONDS / TICK)):  # 300 steps, no packet
        now += TICK
        keeper.round(now)
    step = step_of(now)
    assert verifier.tags.step == step
    accepted = 0
    for tenth in range(10 * STEP_SECONDS):  # every 0.1 s of the next step
        at = step_start(step + 1) + tenth / 10
        keeper.round(at)
        for offset in (-29.9, 0.0, 29.9):  # the client's clock off by up to the window
            name = NAMES[(tenth + int(offset)) % len(NAMES)]
            result = verifier.verify(packet(name, at + offset, ), SRC, at)
            assert isinstance(result, Accepted), (tenth, offset, result)
            accepted += 1
    assert accepted == 3 * 10 * STEP_SECONDS


def test_a_tag_present_a_step_early_or_late_is_refused_future_or_stale() -> None:
    """The table holds step s+2's tags during step s (and s-2's just after
    s's boundary): a packet under them, sealed by the real client, is
    refused on its timestamp, never accepted."""
    verifier = Verifier(SERVER_ID, SECRETS, POLICY, now=START)
    step = step_of(START)
    while verifier.tags.slice():
        pass
    end = step_start(step + 1) - 0.001  # the last moment of step s
    early = packet("c1", step_start(step + 2))
    assert verifier.tags.lookup(early[1:9]) == ("c1", step + 2), "in the table already"
    found = verifier.verify(early, SRC, end)
    assert isinstance(found, Refused) and found.reason is Reason.FUTURE, found
    late = packet("c2", step_start(step) - 0.001)  # step s-1's last moment
    verifier.refresh(step_start(step + 1))  # the boundary: s-1's tags leave in slices
    assert verifier.tags.lookup(late[1:9]) == ("c2", step - 1), "not yet sliced out"
    found = verifier.verify(late, SRC, step_start(step + 1))
    assert isinstance(found, Refused) and found.reason is Reason.STALE, found


def test_the_mac_keys_are_derived_at_the_first_matching_tag_only() -> None:
    verifier = Verifier(SERVER_ID, SECRETS, POLICY, now=START)
    assert verifier._hot == {}, "no client's MAC or cipher key before its first knock"
    assert isinstance(verifier.verify(packet("c4", START), SRC, START), Accepted)
    assert set(verifier._hot) == {"c4"}
    verifier.verify(b"\x01" + bytes(159), SRC, START)  # an unknown tag derives nothing
    assert set(verifier._hot) == {"c4"}
    verifier.add_client("c4", hashlib.sha256(b"new").digest())  # a re-key forgets them
    assert verifier._hot == {}
