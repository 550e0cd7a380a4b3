"""spa.server.admission: which connections an admin surface keeps and when it
closes one (issue 13, finding 5), on a controlled clock.  The real sockets
are in tests/integration/test_metrics_endpoint.py and
test_dashboard_process.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa.server.admission import Admission

LIMIT = 4
SECONDS = 10.0


def test_a_waiting_connection_is_due_at_its_deadline_whatever_it_sends() -> None:
    """Step the clock by 0.1 s for 30 s: a connection that keeps sending bytes
    (each one a wait() that must not extend it) is due at 10 s, not before,
    and then forgotten."""
    admission: Admission[str] = Admission(LIMIT, SECONDS)
    assert admission.open("slow", now=0.0) == []
    for step in range(300):
        now = step / 10
        admission.wait("slow", now)
        due = admission.due(now)
        assert due == (["slow"] if now == SECONDS else []), now
    assert len(admission) == 0


def test_an_answer_restarts_the_wait_and_a_busy_connection_is_never_due() -> None:
    admission: Admission[str] = Admission(LIMIT, SECONDS)
    admission.open("browser", now=0.0)
    admission.busy("browser")  # a whole request at 0 s
    for step in range(1, 100):
        assert admission.due(step * 1.0) == []
    admission.wait("browser", now=100.0)  # answered at 100 s: keep-alive
    assert admission.due(109.9) == []
    assert admission.due(110.0) == ["browser"]


def test_a_newcomer_sheds_the_longest_waiting_never_a_busy_one() -> None:
    admission: Admission[str] = Admission(LIMIT, SECONDS)
    for n, name in enumerate(["busy", "a", "b", "c"]):
        assert admission.open(name, now=float(n)) == []
    admission.busy("busy")
    assert admission.open("d", now=5.0) == ["a"]
    assert admission.open("e", now=6.0) == ["b"]
    assert sorted(admission.held()) == ["busy", "c", "d", "e"]
    admission.wait("busy", now=7.0)  # answered: now it waits, the newest
    assert admission.open("f", now=8.0) == ["c"]
    assert admission.open("g", now=9.0) == ["d"]
    assert admission.open("h", now=9.0) == ["e"]
    assert admission.open("i", now=9.0) == ["busy"]


def test_when_every_held_connection_is_busy_the_newcomer_is_refused() -> None:
    admission: Admission[str] = Admission(LIMIT, SECONDS)
    for name in "abcd":
        admission.open(name, now=0.0)
        admission.busy(name)
    assert admission.open("late", now=1.0) == ["late"]
    assert len(admission) == LIMIT
    admission.close("a")
    assert admission.open("late", now=2.0) == []


def test_closing_is_idempotent_and_forgets_the_connection() -> None:
    admission: Admission[str] = Admission(LIMIT, SECONDS)
    admission.open("a", now=0.0)
    admission.close("a")
    admission.close("a")
    admission.busy("a")  # events of a closed connection change nothing
    admission.wait("a", now=1.0)
    assert len(admission) == 0
    assert admission.due(100.0) == []


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Admission(0, SECONDS)
    with pytest.raises(ValueError, match="positive"):
        Admission(LIMIT, 0)


# clock steps exact in binary, so the model's sums are the ones the code makes
OPS = st.lists(st.tuples(st.sampled_from(["open", "busy", "wait", "close", "tick"]),
                         st.integers(0, 5), st.sampled_from([0.0, 0.5, 3.0, 6.5, 9.75, 10.0])),
               max_size=100)


@given(OPS)
def test_whatever_connections_do_the_bound_and_the_deadlines_hold(
        ops: list[tuple[str, int, float]]) -> None:
    """Random opens, bytes, requests, answers, closes and clock steps against a
    plain model: never more than LIMIT held; after each sweep no waiting
    connection has waited SECONDS; a busy one is never shed or due; a
    newcomer is refused only when every held one is busy."""
    admission: Admission[int] = Admission(LIMIT, SECONDS)
    started: dict[int, float] = {}  # waiting -> since when
    busy: set[int] = set()
    now = 0.0
    for op, key, step in ops:
        if op == "tick":
            now += step
            for late in admission.due(now):
                assert late in started and now - started.pop(late) >= SECONDS
            assert all(now - since < SECONDS for since in started.values())
        elif op == "open" and key not in started and key not in busy:
            shed = admission.open(key, now)
            if shed == [key]:
                assert not started and len(busy) == LIMIT
                continue
            assert len(shed) <= 1
            for gone in shed:
                assert gone in started and started[gone] == min(started.values())
                del started[gone]
            started[key] = now
        elif op == "busy" and key in started:
            admission.busy(key)
            del started[key]
            busy.add(key)
        elif op == "wait":  # answered, or (already waiting) a few more bytes came
            admission.wait(key, now)
            if key in busy:
                busy.discard(key)
                started[key] = now
        elif op == "close":
            admission.close(key)
            started.pop(key, None)
            busy.discard(key)
        assert len(admission) == len(started) + len(busy) <= LIMIT
        assert sorted(admission.held()) == sorted([*started, *busy])
