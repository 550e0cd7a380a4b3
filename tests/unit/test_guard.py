"""The gate keeper with fakes: what wakes it, what it says, how it fails."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from spa.backends.base import Held
from spa.backends.nftwatch import Change, Commit
from spa.server.errors import LocalError
from spa.server.events import Event
from spa.server.guard import POLL_SECONDS, Guard

SPA = (Change("element", False, "inet", "spa"),)
OTHER = (Change("rule", False, "inet", "filter"),)


class FakeWatch:
    def __init__(self, batches: list[list[Commit] | None]) -> None:
        self.batches: deque[list[Commit] | None] = deque(batches)
        self.closed = False

    def wait(self, timeout: float) -> list[Any] | None:
        if not self.batches:
            time.sleep(0.01)
            return []
        return self.batches.popleft()

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    name = "fake"

    def __init__(self, watch: FakeWatch | None = None) -> None:
        self.checks = 0
        self.whole: list[bool] = []  # per check: were the grants compared too
        self.broken: str | None = None
        self.error: str | None = None
        self._watch = watch

    def repair(self, wanted: Held, *, now: float, grants: bool = True) -> str | None:
        self.checks += 1
        self.whole.append(grants)
        if self.error is not None:
            raise LocalError(self.error)
        problem, self.broken = self.broken, None
        return problem

    def watch(self) -> FakeWatch | None:
        return self._watch


def guard(backend: object, logs: list[str], events: list[Event],
          clock: list[float] | None = None) -> Guard:
    now = clock or [1000.0]
    return Guard(backend, lock=threading.Lock(), wanted=dict, clock=lambda: now[0],
                 log=logs.append, record=events.append)


def run_watch(backend: FakeBackend, keeper: Guard, watch: FakeWatch) -> None:
    stop = threading.Event()
    thread = keeper.start_watching(stop)
    assert thread is not None
    deadline = time.monotonic() + 5
    while watch.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    stop.set()
    thread.join(timeout=5)
    assert watch.closed


def test_commits_of_our_own_threads_never_wake_a_check_and_others_do() -> None:
    """The kernel names the committing thread, not the process: grants made
    by the receive thread must not cost a check each."""
    mine = threading.get_native_id()
    watch = FakeWatch([[Commit(mine, SPA)], [Commit(1, OTHER)], [Commit(1, SPA)], None])
    backend = FakeBackend(watch)
    logs: list[str] = []
    keeper = guard(backend, logs, [])
    run_watch(backend, keeper, watch)
    assert backend.checks == 2, "a foreign commit on our table, and lost notifications"
    assert keeper.state.watched


def test_a_repair_is_one_warning_one_event_and_a_state_change() -> None:
    backend = FakeBackend()
    logs: list[str] = []
    events: list[Event] = []
    changes: list[str] = []
    keeper = Guard(backend, lock=threading.Lock(), wanted=lambda: {}, clock=lambda: 5.0,
                   log=logs.append, record=events.append,
                   on_change=lambda state: changes.append(state.state))
    problem = "table inet spa was removed by another program"
    backend.broken = problem
    assert keeper.check(time.monotonic()) == problem
    assert keeper.check(time.monotonic()) is None
    assert [e.outcome for e in events] == ["firewall"] and events[0].reason == "removed"
    assert len(logs) == 1 and logs[0].startswith("warning firewall: table inet spa was removed")
    assert "restored with 0 leases in " in logs[0]
    assert changes == ["restored"] and keeper.state.repairs == 1


def test_a_failing_repair_says_so_once_a_minute_and_status_shows_failing() -> None:
    backend = FakeBackend()
    logs: list[str] = []
    clock = [1000.0]
    keeper = guard(backend, logs, [], clock)
    backend.error = "nftables: operation not permitted"
    for step in range(30):
        clock[0] = 1000.0 + step
        keeper.check(time.monotonic())
    assert keeper.state.state == "failing"
    assert len([line for line in logs if line.startswith("error firewall:")]) == 1
    clock[0] = 1061.0
    keeper.check(time.monotonic())
    assert len([line for line in logs if line.startswith("error firewall:")]) == 2
    backend.error = None
    keeper.check(time.monotonic())
    assert keeper.state.state == "ok"


def test_without_notifications_the_poll_comes_every_two_ticks() -> None:
    backend = FakeBackend()
    clock = [1000.0]
    keeper = guard(backend, [], [], clock)
    keeper.start_watching(threading.Event())  # no watch: polls only
    for tick in range(50):  # housekeeping every 0.2 s for 10 s
        clock[0] = 1000.0 + tick * 0.2
        keeper.poll(clock[0])
    assert backend.checks == round(10 / POLL_SECONDS)


def test_a_program_that_fights_the_gate_gets_one_line_a_second() -> None:
    """From the adversarial review: 1,000 foreign commits in 10 s gave 1,000
    warning lines and events.  Every repair is still made; the log and the
    event store get one a second, counting the ones between."""
    backend = FakeBackend()
    logs: list[str] = []
    events: list[Event] = []
    clock = [1000.0]
    keeper = guard(backend, logs, events, clock)
    for step in range(100):  # 100 alterations in 2 s
        clock[0] = 1000.0 + step * 0.02
        backend.broken = "the chains, rules or sets of table inet spa were altered"
        keeper.check(time.monotonic())
    assert backend.checks == 100 and keeper.state.repairs == 100
    assert len(logs) == 2, logs
    assert logs[1].endswith("(and 49 more repairs in the last 1 s)"), logs[1]
    assert [e.count for e in events] == [1, 50]
    clock[0] = 1003.0  # the storm is over: the 49 folded since are said at the next round
    keeper.poll(clock[0])
    assert logs[2].startswith("warning firewall: 49 more repair(s) in the last 1 s: ")
    assert sum(e.count for e in events) == 100, "every repair counted once"


def test_the_backstop_reads_the_structure_only_while_notifications_come() -> None:
    """Notifications report every change of a grant; the 5 s backstop then
    lists the table without its elements (a full listing of tens of
    thousands of grants under the lease lock cost the server grants/s).
    A notification, lost notifications, or no notifications at all: whole."""
    backend = FakeBackend()
    clock = [1000.0]
    keeper = guard(backend, [], [], clock)
    keeper.state.watched = True
    keeper._every = 5.0
    clock[0] = 1010.0
    keeper.poll(clock[0])
    keeper.check(time.monotonic())  # what a notification does
    keeper.state.watched = False
    clock[0] = 1020.0
    keeper.poll(clock[0])
    assert backend.whole == [False, True, True]


def test_an_admins_table_with_an_instance_like_name_is_the_host_firewall() -> None:
    """From the adversarial review: a commit that only touched a table named
    `spa_*` was never checked, so an admin's own `inet spa_web` (a policy
    drop in hook input) could close a granted port unseen.  Only grants (set
    elements) in tables named exactly as spa names them are spa's own."""
    def notices(commits: list[Commit]) -> int:
        watch = FakeWatch([commits])
        foreign: list[int] = []
        backend = FakeBackend(watch)
        keeper = Guard(backend, lock=threading.Lock(), wanted=dict,
                       clock=lambda: 1000.0, log=lambda line: None,
                       record=lambda event: None, on_foreign=lambda: foreign.append(1))
        run_watch(backend, keeper, watch)
        return len(foreign)

    admin = tuple(Change(what, False, "inet", "spa_web") for what in ("table", "chain", "rule"))
    assert notices([Commit(1, admin)]) == 1
    assert notices([Commit(1, (Change("rule", False, "inet", "spa_site2"),))]) == 1
    assert notices([Commit(1, (Change("element", False, "inet", "spa_Web"),))]) == 1
    grants = tuple(Change("element", False, "inet", table)
                   for table in ("spa_site2", "spa_hold_site2", "spa", "spa_hold"))
    assert notices([Commit(1, grants)]) == 0
