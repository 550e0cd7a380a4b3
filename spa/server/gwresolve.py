"""Resolving a gateway service's DNS name when a lease starts, off the
receive thread (docs/install.md, section 11; docs/threat-model.md, "Gateway
mode: a host by name").

Invariants:
- The receive thread never waits on a resolver: `Lookups.submit` only
  queues, and answers come back through the caller's `done`, called from
  the lookups' own thread, in the order submitted.
- Every lookup ends within TIMEOUT: a resolver that answers later (or
  never) is `host_unresolved`, and at most LOOKUP_THREADS lookups are ever
  in flight (a stuck one keeps its thread, the next ones wait their turn and
  time out).  More than MAX_PENDING lookups waiting: refused at once.
- A failure is never cached, an answer at most CACHE_SECONDS
  (spa/core/gwhost.py `NameCache`); the choice among answers is
  spa/core/gwhost.py `choose` (the client's IP version, fail closed).
- The resolver is an interface (`Resolver`): the system's (getaddrinfo:
  /etc/hosts, DNS, as nsswitch.conf says) or `FakeResolver` in unit tests.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from spa.core.errors import Reason
from spa.core.gwhost import NameCache, choose
from spa.core.wire import IPAddress

TIMEOUT = 3.0  # seconds a lookup may take before the grant is refused
LOOKUP_THREADS = 2  # lookups in flight at most (each stuck one holds a thread)
MAX_PENDING = 256  # lookups waiting at most; more are refused at once

Resolver = Callable[[str, int], Sequence[IPAddress]]  # (name, IP version) -> answers; OSError
Outcome = IPAddress | Reason  # the destination, or why the grant is refused
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


def system_resolver(name: str, version: int) -> list[IPAddress]:
    """The system's answers for `name` of IP `version`, in its order.
    Raises OSError (socket.gaierror) when it has none."""
    found: list[IPAddress] = []
    for *_, sockaddr in socket.getaddrinfo(name, None, _FAMILY[version], socket.SOCK_STREAM):
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in found:
            found.append(address)
    return found


class FakeResolver:
    """Answers for unit tests: name -> addresses (text); a name not listed
    fails as the system's would.  `asked` records each question; with
    `hang` set, a lookup waits until it is cleared (a resolver that does
    not answer)."""

    def __init__(self, answers: Mapping[str, Sequence[str]] | None = None) -> None:
        self.answers = {name: list(found) for name, found in (answers or {}).items()}
        self.asked: list[tuple[str, int]] = []
        self.hang = threading.Event()
        self.released = threading.Event()

    def __call__(self, name: str, version: int) -> list[IPAddress]:
        self.asked.append((name, version))
        if self.hang.is_set():
            self.released.wait(30)
        if name not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [a for a in map(ipaddress.ip_address, self.answers[name]) if a.version == version]


class Lookups:
    """Names resolved for grants, off the receive thread."""

    def __init__(self, resolver: Resolver = system_resolver, *, clock: Callable[[], float],
                 timeout: float = TIMEOUT, cache: NameCache | None = None) -> None:
        self.resolver, self.clock, self.timeout = resolver, clock, timeout
        self.cache = cache or NameCache()
        self._pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="spa-resolve")
        self._order = ThreadPoolExecutor(1, thread_name_prefix="spa-resolved")
        self._pending = 0
        self._count = threading.Lock()
        self._cached = threading.Lock()  # the cache (the compat listener resolves too)
        self._closed = threading.Event()  # no `done` after `close`

    def submit(self, name: str, version: int, done: Callable[[Outcome], None]) -> None:
        """Resolve `name` for a client of IP `version`; `done` gets the outcome
        (from the lookups' thread).  Never blocks."""
        with self._count:
            full = self._pending >= MAX_PENDING
            if not full:
                self._pending += 1
        if full:  # (still from the lookups' thread: the caller may hold a lock `done` takes)
            self._order.submit(done, Reason.HOST_UNRESOLVED)
            return
        self._order.submit(self._run, name, version, done)

    def resolve(self, name: str, version: int) -> Outcome:
        """The outcome for one name and IP version (waits TIMEOUT at most)."""
        now = self.clock()
        with self._cached:
            cached = self.cache.get(name, version, now)
        if cached is not None:
            return cached
        try:
            answers = self._pool.submit(self.resolver, name, version).result(self.timeout)
        except (FutureTimeout, OSError, UnicodeError, ValueError):
            return Reason.HOST_UNRESOLVED
        outcome = choose(answers, version)
        if not isinstance(outcome, Reason):
            with self._cached:
                self.cache.put(name, version, outcome, now)
        return outcome

    def _run(self, name: str, version: int, done: Callable[[Outcome], None]) -> None:
        try:
            outcome = self.resolve(name, version)
        finally:
            with self._count:
                self._pending -= 1
        if not self._closed.is_set():
            done(outcome)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until every lookup submitted so far has had its `done` (tests,
        and a clean stop).  Raises TimeoutError past `timeout`."""
        self._order.submit(lambda: None).result(timeout)

    def close(self) -> None:
        """Stop taking lookups; one in flight is abandoned (its thread ends with it)."""
        self._closed.set()
        self._order.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
