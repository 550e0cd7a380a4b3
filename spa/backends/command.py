"""The command backend: grants carried out by the admin's own programs on a
firewall spa does not run (a router, a cloud security group), from argv
templates (spa.backends.cmdspec; docs/backends.md).

Invariants (STYLE principle 6; docs/threat-model.md, "A command backend"):
- The same lifecycle as every backend.  Nothing lives in this host's
  firewall: `start` checks the programs and reads the journal.
- `allow`, `remove` and `apply` never wait for a program: they record the
  wanted state of the (address, service) pair and return; WORKERS threads
  run the commands.  So a program that hangs or fails holds up neither the
  receive path nor another pair's grant (each pair is carried out by one
  worker at a time, in order; a newer wish replaces one not yet carried out).
  The pairs of one service take at most WORKERS - 1 workers at once, so a
  service whose program hangs leaves a worker to the others; a retry waits
  out its backoff in the queue, holding no worker.
- Each run has the spec's timeout (its process group killed past it); a
  failure is logged, recorded as a `command` event (a metric) and retried
  after backoff, backoff x 2, ... at most `retries` times, then given up
  with one more line and event.  A wish that changes meanwhile stops the
  retries of the old one.  An `allow` whose journal row cannot be written
  is not run at all (a line, an event `reason=journal`): no grant goes out
  that a crash could leave unrecorded.
- Grants do not end by themselves (`expires_by_itself` False): the gate
  keeper removes them at their end, as with iptables, also when the daemon
  is gone (spa.server.monitor).  The journal (spa.backends.cmdjournal) holds
  every grant that may be out there, so a restart removes what was added
  before a crash; `held` is the journal and, once after each start, the
  list command's leftovers (an address listed for a service that the
  journal does not hold: `until` 0, so reconcile removes it).  The list
  commands run at once, within one deadline (LIST_DEADLINE).  A start
  removes the journal's grants of a service the config no longer has (by
  the protocol and port the journal recorded), then forgets them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from spa.backends.base import Change, Held, apply_each
from spa.backends.cmdjournal import Journal
from spa.backends.cmdrun import Outcome, Run, program_problem, run_command
from spa.backends.cmdspec import CommandSpec, parse_listing, render, values
from spa.core.policy import Service
from spa.core.wire import IPAddress
from spa.server.errors import LocalError
from spa.server.events import Event

WORKERS = 4  # programs that may run at once (a hung one holds one worker, never the rest)
LIST_DEADLINE = 20.0  # seconds the start's list commands may take together (under the gate
# keeper's lock; systemd's start timeout is 90 s)
LIST_AT_ONCE = 8  # list commands run at once
MAX_LEFTOVERS = 1024  # addresses one start's list may add per service (each removal rewrites
# the journal: n of them cost n x n rows written; a lost journal's grants still wanted are
# allowed again by the reconcile whether or not they are taken)
DRAIN = 10.0  # seconds `stop` waits for wishes still to carry out (the unit allows 15)
Key = tuple[IPAddress, str]


class CommandBackend:
    name = "command"
    expires_by_itself = False

    def __init__(self, spec: CommandSpec, journal: Journal | None, *, run: Run = run_command,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
                 flush_on_stop: bool = False, workers: int = WORKERS) -> None:
        """`journal` None: nothing kept on disk (tests)."""
        self.spec, self._journal, self._run = spec, journal, run
        self._log, self._clock = log, clock
        self.record: Callable[[Event], None] = lambda event: None  # set by the gate keeper
        self.flush_on_stop = flush_on_stop
        self._workers = workers
        self._services: dict[str, Service] = {}
        self._retired: dict[str, Service] = {}  # services gone from the config: their grants
        # are removed (the protocol and port as the journal recorded them)
        self._want: dict[Key, float | None] = {}  # until, or None: remove
        self._out: Held = {}  # what may be out there (the journal)
        self._queue: deque[Key] = deque()
        self._busy: set[Key] = set()
        self._retry: dict[Key, tuple[int, float]] = {}  # the next try's number and when
        # (monotonic) it is due, for a pair whose last try failed
        self._cond = threading.Condition()
        self._saving = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._listed = True  # the list command ran since the start (or there is none)
        self.failures = 0  # failed runs (tests; the metric counts the events)

    # ---- lifecycle ---------------------------------------------------------

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        """Raises LocalError: a program missing or not executable, a journal
        it cannot read or write."""
        for program in self.spec.programs():
            problem = program_problem(program)
            if problem:
                raise LocalError(f"[command] program {program} {problem}")
        out, ports = self._journal.load_with_ports() if self._journal is not None else ({}, {})
        if self._journal is not None:  # one it cannot write stops the start, in one line
            self._journal.save(out, {**ports, **self._retired, **self._services, **services})
        with self._cond:
            self._retired.update({**ports, **self._services})
            self._services = dict(services)
            for name in services:
                self._retired.pop(name, None)
            if not self._threads or self._stopping:
                self._out.update(out)
                self._listed = not self.spec.list
                self._stopping = False
                self._threads = [threading.Thread(target=self._work, name=f"spa-command-{n}",
                                                  daemon=True) for n in range(self._workers)]
                for thread in self._threads:
                    thread.start()
            self._retire()

    def _retire(self) -> None:
        """Remove (then forget) the grants of services the config no longer
        has, by the protocol and port the journal recorded for them (the
        caller holds the lock)."""
        gone = [key for key in self._out if key[1] not in self._services]
        for key in gone:
            if key[1] in self._retired:
                self._enqueue(key, None)
        unknown = sorted({name for _, name in gone if name not in self._retired})
        if unknown:
            self._log(f"warning command: the journal holds grants of {', '.join(unknown)}, "
                      "no longer in the config, with no port recorded (an older journal): "
                      "remove them on the other firewall by hand")

    def allow(self, address: IPAddress, service: Service, until: float, *, now: float) -> None:
        self._wish((address, service.name), until)

    def remove(self, address: IPAddress, service: Service) -> None:
        self._wish((address, service.name), None)

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        apply_each(self, changes, now=now)

    def held(self, *, now: float) -> Held:
        """The journal's grants (and, first after a start, the list command's
        leftovers)."""
        if not self._listed:
            self._listed = True
            self._add_leftovers()
        with self._cond:
            return {key: until for key, until in self._out.items() if key[1] in self._services}

    def stop(self) -> None:
        """With flush_on_stop, remove every grant first; wait up to DRAIN for
        what is still to do, then end the workers."""
        with self._cond:
            if self.flush_on_stop:
                for key in list(self._out):
                    self._enqueue(key, None)
            deadline = time.monotonic() + DRAIN
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cond.wait(0.1)
            if self._queue or self._busy:
                self._log(f"warning command: {len(self._queue) + len(self._busy)} grant "
                          "change(s) not carried out at stop; the next start reconciles them")
            self._stopping = True
            self._cond.notify_all()

    def pending(self) -> int:
        """Wishes not yet carried out (tests, status)."""
        with self._cond:
            return len(self._queue) + len(self._busy)

    # ---- the wishes and the workers ----------------------------------------

    def _wish(self, key: Key, until: float | None) -> None:
        with self._cond:
            self._enqueue(key, until)

    def _enqueue(self, key: Key, until: float | None) -> None:
        if self._want.get(key, "none") != until:
            self._retry.pop(key, None)  # a newer wish: its own first try, now
        self._want[key] = until
        if key not in self._queue:
            self._queue.append(key)
        self._cond.notify_all()

    def _next(self) -> tuple[Key, float | None, int] | float | None:
        """The first queued pair no worker carries out, whose retry is due and
        whose service has a worker to spare (caller holds the lock); else the
        seconds until the first retry is due (None: none waits)."""
        now, soonest = time.monotonic(), None
        spare = max(1, self._workers - 1)  # workers one service may hold
        for key in self._queue:
            if key in self._busy:
                continue
            attempt, due = self._retry.get(key, (0, now))
            if due > now:
                soonest = due - now if soonest is None else min(soonest, due - now)
                continue
            if sum(1 for busy in self._busy if busy[1] == key[1]) >= spare:
                continue
            self._queue.remove(key)
            self._busy.add(key)
            self._retry.pop(key, None)
            return key, self._want.get(key), attempt
        return soonest

    def _work(self) -> None:
        while True:
            with self._cond:
                found = self._next()
                while not isinstance(found, tuple):
                    if self._stopping:
                        return
                    self._cond.wait(found)
                    found = self._next()
            key, until, attempt = found
            try:
                self._carry_out(key, until, attempt)
            except Exception as exc:  # never lose a worker
                self._log(f"error command worker failed: {type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._busy.discard(key)
                    if self._want.get(key, 0.0) is None and key not in self._out:
                        self._want.pop(key, None)
                    self._cond.notify_all()

    def _carry_out(self, key: Key, until: float | None, attempt: int = 0) -> None:
        address, name = key
        with self._cond:
            out = self._out.get(key)
            service = self._services.get(name)
            if service is None and until is None:
                service = self._retired.get(name)
        if service is None or (until is None and out is None) or (
                until is not None and out == until and not attempt):
            return
        try:
            if until is None:
                filled = values(address, service)
                argv = render(self.spec.remove, filled)
            else:
                filled = values(address, service, until=until, now=self._clock())
                argv = render(self.spec.allow, filled)
        except ValueError as exc:
            self._log(f"error command: not run for {name} {address}: {exc}")
            return
        if until is not None and not self._keep(key, until):  # in the journal before it
            self._keep(key, out, save=False)  # may be out there; not written: not run
            self._log(f"error command allow service={name} src={address}: not run, as the "
                      "journal could not record it (a crash would leave it unrecorded)")
            self.record(Event(self._clock(), "command", "allow", "journal", None,
                              str(address), name))
            return
        done = self._try(argv, key, "allow" if until is not None else "remove", until, attempt)
        if done is True and until is None:
            self._keep(key, None)
        elif done is False and until is not None:
            self._keep(key, 0.0)  # may be out there, not as wanted: a reconcile allows
            # it again (a start), or removes it

    def _try(self, argv: list[str], key: Key, action: str, until: float | None,
             attempt: int) -> bool | None:
        """Run argv once: True done; None failed, tried again after its
        backoff (queued, holding no worker); False given up, or superseded."""
        address, name = key
        spec = self.spec
        outcome: Outcome = self._run(argv, spec.timeout)
        if outcome.ok:
            return True
        self.failures += 1
        reason = "timeout" if outcome.code is None and "timed out" in outcome.problem \
            else "failed"
        last = attempt >= spec.retries
        wait = spec.backoff * 2 ** attempt
        self._log(f"error command {action} service={name} src={address}: "
                  f"{os.path.basename(argv[0])}: {outcome.problem} (try {attempt + 1} of "
                  f"{spec.retries + 1}" + ("; giving up)" if last else
                                            f"; again in {wait:g} s)"))
        self.record(Event(self._clock(), "command", action, reason, None, str(address), name))
        if last:
            self.record(Event(self._clock(), "command", action, "gave_up", None, str(address),
                              name))
            return False
        if until is not None:  # until its retry: may be out there, not as wanted (a crash
            self._keep(key, 0.0)  # meanwhile: the next start's reconcile allows it again)
        with self._cond:
            if self._stopping or self._want.get(key, "gone") != until:
                return False  # a newer wish (or the stop) takes over
            self._retry[key] = (attempt + 1, time.monotonic() + wait)
            if key not in self._queue:
                self._queue.append(key)
            self._cond.notify_all()
        return None

    def _keep(self, key: Key, until: float | None, *, save: bool = True) -> bool:
        """Record in the journal (`until` None: the grant is gone); False if
        the file could not be written (said in one line)."""
        with self._cond:
            if until is None:
                self._out.pop(key, None)
            else:
                self._out[key] = until
        if self._journal is None or not save:
            return True
        with self._saving:  # one write at a time, each of the record as it is then: the
            with self._cond:  # last file written is never an older record than one before
                snapshot = dict(self._out)
                known = {**self._retired, **self._services}
            try:
                self._journal.save(snapshot, known)
            except LocalError as exc:
                self._log(f"error command: {exc}")
                return False
        return True

    def _add_leftovers(self) -> None:
        """Run the list command once per service, all at once (at most
        LIST_AT_ONCE), within one deadline (the gate keeper's lock is held
        meanwhile): addresses it lists that the journal does not hold join
        `held` with until 0 (reconcile removes them, or allows them again if
        they are wanted), and so do those the journal holds that it does not
        list (gone from the firewall).  A list not done by the deadline is
        said in one line and its output, if any comes, is ignored."""
        services = list(self._services.values())
        results: dict[str, Outcome] = {}
        lock, finished = threading.Lock(), threading.Event()
        slots = threading.Semaphore(LIST_AT_ONCE)
        budget = min(self.spec.timeout + 1.0, LIST_DEADLINE)
        deadline = time.monotonic() + budget

        def one(service: Service) -> None:
            with slots:
                if time.monotonic() >= deadline:
                    return
                argv = render(self.spec.list, values_of_service(service))
                outcome = self._run(argv, self.spec.timeout)
            with lock:
                results[service.name] = outcome
                if len(results) == len(services):
                    finished.set()

        for service in services:
            threading.Thread(target=one, args=(service,), name="spa-command-list",
                             daemon=True).start()
        if services:
            finished.wait(budget)
        with lock:
            got = dict(results)
        late = [service.name for service in services if service.name not in got]
        if late:
            self._log(f"warning command list service={','.join(late)}: not done within "
                      f"{budget:g} s; leftovers of a crash are not looked for there")
        for service in services:
            if service.name in got:
                self._leftovers_of(service, got[service.name])

    def _leftovers_of(self, service: Service, outcome: Outcome) -> None:
        if not outcome.ok:
            self._log(f"warning command list service={service.name}: "
                      f"{outcome.problem}; leftovers of a crash are not looked for")
            return
        found, bad = parse_listing(outcome.output)
        if bad:
            self._log(f"warning command list service={service.name}: {len(bad)} line(s) "
                      f"that are not one address, skipped (first: {bad[0]!r})")
        listed = {(address, service.name) for address in found}
        with self._cond:
            new = sorted((key for key in listed if key not in self._out), key=str)
            if len(new) > MAX_LEFTOVERS:
                self._log(f"warning command list service={service.name}: {len(new)} "
                          "addresses spa does not hold; removing the first "
                          f"{MAX_LEFTOVERS} (the next start takes more; does the list "
                          "command list only what spa added?)")
            for key in new[:MAX_LEFTOVERS]:
                self._out[key] = 0.0
            for key in [k for k in self._out if k[1] == service.name and k not in listed
                        and k not in self._want]:  # (a wish since the start: its own)
                self._out[key] = 0.0  # in the journal, gone from the firewall: if it is
                # wanted, the reconcile allows it again


def values_of_service(service: Service) -> dict[str, str]:
    """The list command's placeholders (no address)."""
    return {"protocol": service.protocol, "port": str(service.port), "service": service.name}
