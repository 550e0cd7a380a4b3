"""The gate keeper: puts our firewall back when another program removes or
alters it (`nft flush ruleset`, `systemctl restart nftables`, `iptables -F`).

Invariants (docs/threat-model.md, "The host firewall is reloaded"):
- nftables: a thread waits on the kernel's change notifications; a commit by
  another process that touches our table (this instance's: another spa
  instance's grants in its own tables neither check nor count as a change
  of the host's firewall; any table, chain, rule or set changed does), or
  lost notifications, is checked at once (the
  measured window from flush to restored table is in docs/benchmarks.md).
  Our own commits (from any of our threads: the kernel names the thread)
  never trigger a check.
- Every backend is also checked by `poll` from housekeeping: iptables every
  POLL_SECONDS (it sends no notification: that is its window), nftables every
  BACKSTOP seconds in case a notification was missed (its structure only:
  the notifications report every change of a grant).
- A check and a repair run under the daemon's lease lock, so no grant is in
  flight; the repair installs exactly the live leases at their remaining time
  in one transaction (nftables) or rule by rule (iptables).
- A repair says so: one warning line (`firewall: table inet spa was removed
  by another program; restored with N leases in X ms`), an event (outcome
  `firewall`, counted in the metrics) and the gate's state in `status`; a
  program that alters the gate over and over gets one line and one event a
  second at most, counting the repairs between (every one is still made, and
  every one is counted: the last folded ones at the next housekeeping round
  after the second).  A
  repair that fails is an error line at most once per ERROR_EVERY, and the
  gate is `failing` in `status` until a check passes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from spa.backends.base import Held
from spa.backends.names import DEFAULT_NAMES, FAMILY, Names, is_instance_table
from spa.server.errors import LocalError
from spa.server.events import Event

BACKSTOP = 5.0  # seconds between checks of a backend that sends notifications
POLL_SECONDS = 0.4  # seconds between checks of one that does not (iptables): 2 ticks
ERROR_EVERY = 60.0  # seconds between repeats of the same failing-repair line
SAY_EVERY = 1.0  # seconds: one repair line and event at most, counting those between
SLACK = 0.05  # seconds: a poll due within this is done now (housekeeping ticks every 0.2 s)
WAIT = 1.0  # seconds the watcher waits on the kernel before it looks at `stop`


class Watch(Protocol):
    def wait(self, timeout: float) -> list[Any] | None: ...

    def close(self) -> None: ...


class GateGuard(Protocol):
    """What the daemon asks of a guard (this module's, or the gate keeper's
    through spa.server.remote)."""

    state: GateState

    def start_watching(self, stop: threading.Event) -> object: ...

    def poll(self, now: float) -> None: ...

    def check(self, woke: float, *, grants: bool = True) -> object: ...

    def say_folded(self, now: float) -> None: ...


@dataclass
class GateState:
    """What `status` shows of the gate."""

    state: str = "ok"  # ok | restored | failing
    repairs: int = 0
    last: str = ""  # what was wrong, or the error
    at: float = 0.0
    watched: bool = False  # kernel notifications, not only polls

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "repairs": self.repairs, "last": self.last,
                "at": self.at, "watched": self.watched}


class Guard:
    def __init__(self, backend: object, *, lock: threading.Lock, wanted: Callable[[], Held],
                 clock: Callable[[], float], log: Callable[[str], None],
                 record: Callable[[Event], None],
                 on_change: Callable[[GateState], None] = lambda state: None,
                 on_foreign: Callable[[], None] = lambda: None, armed: bool = True) -> None:
        """`on_foreign`: another program committed a change to the ruleset
        (any table: the host's firewall may have changed).  `armed` False:
        no check repairs anything until `armed` is set, once the backend was
        started (the gate keeper's guard runs before the daemon's first
        request: a repair then installed our table without any service)."""
        self.armed = armed
        self._repair: Callable[..., str | None] | None = getattr(backend, "repair", None)
        self._watch_of: Callable[[], Watch | None] | None = getattr(backend, "watch", None)
        self._lock, self._wanted, self._clock = lock, wanted, clock
        self._log, self._record, self._on_change = log, record, on_change
        self._on_foreign = on_foreign
        names = getattr(backend, "names", DEFAULT_NAMES)
        # the table whose foreign commits are checked at once: this instance's
        # (another instance's commits to its own table are none of ours)
        self._table = names.table if isinstance(names, Names) else DEFAULT_NAMES.table
        self.state = GateState()
        self._every = BACKSTOP if self._watch_of is not None else POLL_SECONDS
        self._last_check = 0.0
        self._last_error = -ERROR_EVERY
        self._last_said = -SAY_EVERY  # the last repair line (one a second at most)
        self._quiet = 0  # repairs since it
    # ---- triggers ------------------------------------------------------------

    def start_watching(self, stop: threading.Event) -> threading.Thread | None:
        """The notification thread, if the backend has notifications."""
        watch = self._watch_of() if self._watch_of is not None else None
        if watch is None:
            self._every = POLL_SECONDS
            return None
        self.state.watched = True
        thread = threading.Thread(target=self._watch_loop, args=(watch, stop),
                                  name="spa-gate-watch", daemon=True)
        thread.start()
        return thread

    def _watch_loop(self, watch: Watch, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                commits = watch.wait(WAIT)
                foreign = [c for c in commits or () if not _our_thread(c.pid)]
                if commits is None or any(c.touches(FAMILY, self._table) for c in foreign):
                    self.check(time.monotonic())
                if commits is None or any(_host_firewall(c) for c in foreign):
                    self._on_foreign()
        except Exception as exc:  # keep the daemon; the polls still guard
            self._log(f"error firewall watch stopped ({type(exc).__name__}: {exc}); "
                      f"checking every {POLL_SECONDS} s instead")
            self._every = POLL_SECONDS
            self.state.watched = False
        finally:
            watch.close()

    def poll(self, now: float) -> None:
        """Housekeeping: check when the poll is due.  While notifications
        come, they report every change of a grant: the backstop checks the
        table's structure only (cheap with tens of thousands of grants)."""
        if now - self._last_check >= self._every - SLACK or now < self._last_check:
            self.check(time.monotonic(), grants=not self.state.watched)
        if self._quiet and (now - self._last_said >= SAY_EVERY or now < self._last_said):
            self.say_folded(now)

    # ---- the check -------------------------------------------------------------

    def check(self, woke: float, *, grants: bool = True) -> str | None:
        """Repair if needed; returns what was wrong.  `woke`: monotonic time
        the trigger arrived (the repair's reported time counts from it);
        `grants` False: the structure only (see `poll`)."""
        if self._repair is None or not self.armed:
            return None
        with self._lock:
            now = self._clock()
            self._last_check = now
            wanted = self._wanted()
            try:
                problem = self._repair(wanted, now=now, grants=grants)
            except LocalError as exc:
                self._failing(str(exc), now)
                return None
        took = (time.monotonic() - woke) * 1000
        if problem is None:
            if self.state.state == "failing":
                self._set("restored" if self.state.repairs else "ok", self.state.last, now)
            return None
        live = sum(1 for until in wanted.values() if until > now)
        self.state.repairs += 1
        self._quiet += 1
        if now - self._last_said >= SAY_EVERY or now < self._last_said:
            more = (f" (and {self._quiet - 1} more repairs in the last {SAY_EVERY:.0f} s)"
                    if self._quiet > 1 else "")
            self._log(f"warning firewall: {problem}; restored with {live} "
                      f"lease{'' if live == 1 else 's'} in {took:.1f} ms{more}")
            self._record(Event(now, "firewall", "restore", _kind(problem), count=self._quiet))
            self._last_said, self._quiet = now, 0
        self._set("restored", problem, now, repaired=True)
        return problem

    def say_folded(self, now: float) -> None:
        """The repairs folded since the last line, once the second is over
        and no further repair came to say them (or at shutdown)."""
        if not self._quiet:
            return
        self._log(f"warning firewall: {self._quiet} more repair(s) in the last "
                  f"{SAY_EVERY:.0f} s: {self.state.last}")
        self._record(Event(now, "firewall", "restore", _kind(self.state.last), count=self._quiet))
        self._last_said, self._quiet = now, 0

    def _failing(self, error: str, now: float) -> None:
        if self.state.state != "failing" or now - self._last_error >= ERROR_EVERY:
            self._last_error = now
            self._log(f"error firewall: cannot check or restore the gate: {error}")
        self._set("failing", error, now)

    def _set(self, state: str, last: str, now: float, *, repaired: bool = False) -> None:
        changed = repaired or (state, last) != (self.state.state, self.state.last)
        self.state.state, self.state.last, self.state.at = state, last, now
        if changed:
            self._on_change(self.state)


def _our_thread(pid: int | None) -> bool:
    """Whether a commit came from this process: the kernel names the thread
    (its id, not the process's), so ask /proc for our threads.  Unknown
    (None, or another pid namespace): not ours, so it is checked."""
    return pid is not None and (pid == os.getpid() or os.path.isdir(f"/proc/self/task/{pid}"))


def _host_firewall(commit: Any) -> bool:
    """Whether a foreign commit may have changed the host's firewall: one
    that only changed set elements (another instance's grants, a knock a
    second) in tables named exactly as spa names an instance's tables
    (names.is_instance_table, the predicate the removal uses) did not.  Any
    table, chain, rule or set changed is looked at, so an admin's own table
    that merely has such a name (`inet spa_web`) is checked like any other."""
    changes = getattr(commit, "changes", None)
    if not changes:
        return True
    return any(c.family != FAMILY or c.what != "element" or not is_instance_table(c.table)
               for c in changes)


def _kind(problem: str) -> str:
    """The event's reason: removed (table, chain or jump gone) or altered."""
    return "removed" if "removed" in problem and "grant" not in problem else "altered"
