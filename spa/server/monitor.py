"""The gate keeper: the privileged part of the daemon (docs/threat-model.md,
"Privilege separation").

It is the only code that touches the firewall.  It holds CAP_NET_ADMIN and
nothing else (and CAP_BPF while the eBPF map filter runs, to make the maps
of its growth: spa.server.mapgrant), parses no packet, serves nothing,
writes no event store; it carries out the typed requests of
spa.server.gatemsg that the unprivileged daemon sends over a socketpair,
after checking each against its own reading of the config.

Invariants:
- A grant names a service of the gate keeper's config (its port and protocol,
  never the daemon's), one host address, and an end no later than the
  service's max_duration (plus SLACK) from the gate keeper's own clock; a
  request that breaks any of this is refused whole and nothing is changed.
- It keeps its own record of what it granted and ends each grant on time by
  itself, whatever the daemon says or fails to say; the guard (spa.server.
  guard) repairs the gate from that record, never from the daemon's word.
- At most MAX_GRANTS grants are held: one more is refused.
- Its guard repairs nothing before the daemon's first `start`: until then
  there is no gate of ours to keep (a repair then installed a table for no
  service, and the start that followed failed on it).
- When the daemon goes away without asking `stop` (a crash, or a daemon not
  to be trusted), the gate keeper ends the grants that need it on time
  (iptables: no kernel timeout), then stops the backend the way the daemon
  would and exits: the ports stay closed.  It holds no lock meanwhile, so a
  new daemon may start.  After `stop` (a clean shutdown) it stops at once:
  an iptables grant then lasts until the next start, as it always did.
- The clock is an argument (`clock`); `handle` is unit-tested with the memory
  backend, `serve` with a real socketpair.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spa.backends.base import Backend, Destinations, Held, reconcile
from spa.core.gwhost import destination_problem, gateway_host_problem
from spa.core.leases import Allow, Remove
from spa.core.policy import Service
from spa.core.wire import IPAddress
from spa.server import config as config_mod
from spa.server import frames, gatemsg
from spa.server.errors import LocalError
from spa.server.events import Event
from spa.server.frames import receive_message
from spa.server.gatemsg import Apply, Gated, Reconcile, RefusedError, Simple, Start, TagMap
from spa.server.guard import Guard
from spa.server.gwroute import refuse_own_hosts
from spa.server.mapgrant import MapGrants

if TYPE_CHECKING:
    from spa.kernel.tagkit import Kit

SLACK = 2.0  # seconds a grant may end after now + max_duration (the two clocks' read order)
MAX_GRANTS = 1_000_000  # grants held at once (issue 14's 100,000 clients, with room)
TURN = 0.5  # seconds between the gate keeper's own rounds (expiry, guard) when idle

Clock = Callable[[], float]
Log = Callable[[str], None]


class GateKeeper:
    """Carries out checked requests on the real backend."""

    def __init__(self, backend: Backend, *, config_path: Path,
                 services: Mapping[str, Service], clock: Clock, log: Log,
                 read_services: Callable[[Path], Mapping[str, Service]] | None = None,
                 maps: MapGrants | None = None) -> None:
        """`maps`: the tag maps it makes (None: none, no eBPF map filter runs)."""
        self.backend = backend
        self.maps = maps
        self.config_path = config_path
        self.clock, self.log = clock, log
        self.lock = threading.Lock()
        self._read_services = read_services or _services_of
        self.allowed: dict[str, Service] = dict(services)  # what the config names
        self.installed: dict[str, Service] = {}  # what the backend was started with
        self.granted: Held = {}
        self.events: list[Event] = []
        self.foreign = False
        self.stopped = False
        self.outliving = False  # the daemon is gone; only ending grants on time
        self.guard = Guard(backend, lock=self.lock, wanted=lambda: dict(self.granted),
                           clock=clock, log=log, record=self.events.append,
                           on_foreign=self._foreign, armed=False)  # armed by the first start

    def _foreign(self) -> None:
        self.foreign = True

    # ---- requests --------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request's reply: {"ok": ...}, {"error": line} for a firewall
        failure, {"refused": why} for a request it will not carry out.  (A
        tag map's descriptors go only with `answer`'s; here they are closed.)"""
        reply, kit = self.answer(message)
        if kit is not None:
            kit.close()
        return reply

    def answer(self, message: dict[str, Any]) -> tuple[dict[str, Any], Kit | None]:
        """`handle`'s reply and, for a tag map, the kit whose descriptors go
        with it (the caller closes it once sent)."""
        try:
            request = gatemsg.parse_request(message)
            if isinstance(request, TagMap):
                kit = self._tag_map(request)
                return {"ok": {"entries": request.entries}}, kit
            return {"ok": self._carry_out(request)}, None
        except RefusedError as exc:
            self.log(f"error gate keeper refused a request: {exc}")
            return {"refused": str(exc)}, None
        except LocalError as exc:
            return {"error": str(exc)}, None
        except Exception as exc:  # a bug: said, never the gate keeper's end
            self.log(f"error gate keeper failed a request: {type(exc).__name__}: {exc}")
            return {"error": f"the gate keeper failed: {type(exc).__name__}"}, None

    def _tag_map(self, request: TagMap) -> Kit:
        if self.maps is None:
            raise RefusedError("tagmap: no eBPF map filter runs here, so no maps are made")
        kit = self.maps.grant(request)
        self.log(f"gate keeper made a tag map of {request.entries} entries and its program "
                 f"for the daemon ({request.mode} on port {request.port})")
        return kit

    def _carry_out(self, request: gatemsg.Request) -> Any:
        if isinstance(request, Start):
            return self._start(request.services)
        if isinstance(request, Apply):
            return self._apply(request.changes)
        if isinstance(request, Reconcile):
            return self._reconcile(request.grants)
        if isinstance(request, Gated):
            return self._gated(request)
        assert isinstance(request, Simple)
        kind = request.kind
        if kind == "held":
            with self.lock:
                held = self.backend.held(now=self.clock())
            return [[str(address), name, until] for (address, name), until in held.items()]
        if kind == "drops":
            return self._drops()
        if kind == "gate":
            return self._gate()
        if kind == "check":
            self.guard.check(time.monotonic())
            return self._gate()
        if kind == "fold":
            self.guard.say_folded(self.clock())
            return self._gate()
        if kind == "host":
            return self.host_report()
        if kind == "stamp":
            try:
                st = os.lstat(self.config_path)
            except OSError:
                return None
            return [st.st_mtime_ns, st.st_size, st.st_ino]
        if kind == "config":
            return config_mod.read_raw(self.config_path).decode("utf-8", "replace")
        if kind == "stop":
            self.stop()
            return None
        raise RefusedError(f"unknown request {kind!r}")  # pragma: no cover (parse_request)

    def stop(self) -> None:
        """Stop the backend (once: at the daemon's request, or when it is gone)."""
        if self.stopped:
            return
        self.stopped = True
        with self.lock:
            self.backend.stop()

    def _start(self, names: tuple[str, ...]) -> dict[str, Any]:
        """(Re)install the gate for every service of the config, read again
        now: the daemon cannot leave one out (an empty list once left every
        port ungated).  A name the config no longer has is kept only while it
        was installed and the daemon still names it (its grants can then
        still be removed); any other name is refused."""
        try:
            self.allowed = dict(self._read_services(self.config_path))
        except LocalError as exc:
            self.log(f"error gate keeper keeps the services it has: {exc}")
        chosen: dict[str, Service] = dict(self.allowed)
        for name in names:
            if name not in chosen:
                service = self.installed.get(name)
                if service is None:
                    raise RefusedError(f"start: no service {name!r} in {self.config_path}")
                chosen[name] = service
        with self.lock:
            self.backend.start(chosen, now=self.clock())
            self.installed = chosen
            self.guard.armed = True  # from now on the gate is ours to keep
        backend = self.backend
        return {"name": backend.name, "expires_by_itself": backend.expires_by_itself,
                "holds": bool(getattr(backend, "holds", False)),
                "hold_note": str(getattr(backend, "hold_note", "")),
                "flags_note": str(getattr(backend, "flags_note", "")),
                "host_check": getattr(backend, "runner", None) is not None}

    def _checked(self, change: Allow | Remove, now: float) -> Service:
        """The installed service a change names.  Raises RefusedError."""
        service = self.installed.get(change.service)
        if service is None:
            raise RefusedError(f"no service {change.service!r} in the gate")
        problem = destination_problem(service, change)
        if problem:
            raise RefusedError(f"{change.service}: {problem}")
        if isinstance(change, Allow) and not (
                now < change.until <= now + service.max_duration + SLACK):
            raise RefusedError(f"{change.service}: a grant ends within "
                               f"{service.max_duration} s of now")
        return service

    def _reconcile(self, grants: tuple[Allow, ...]) -> None:
        """Hold exactly `grants`; the record becomes them (a restart finds
        grants in the kernel that this process never made)."""
        now = self.clock()
        wanted: Held = {}
        destinations: Destinations = {}
        for grant in grants:
            self._checked(grant, now)
            wanted[(grant.address, grant.service)] = grant.until
            if grant.destination is not None:
                destinations[(grant.address, grant.service)] = grant.destination
        if len(wanted) > MAX_GRANTS:  # (a request holds fewer: gatemsg.MAX_CHANGES)
            raise RefusedError(f"over {MAX_GRANTS} grants")
        with self.lock:
            reconcile(self.backend, wanted, self.installed, now=now, destinations=destinations)
            self.granted = wanted

    def _gated(self, request: Gated) -> None:
        """A named gateway service's addresses to drop its port on, each one
        a gateway may reach (spa/core/gwhost.py).  Raises RefusedError."""
        found: dict[str, list[IPAddress]] = {}
        for name, address in request.addresses:
            service = self.installed.get(name)
            if service is None or not service.named:
                raise RefusedError(f"gated: {name!r} is no named gateway service of the gate")
            problem = gateway_host_problem(address)
            if problem:
                raise RefusedError(f"gated: {address} {problem}")
            found.setdefault(name, []).append(address)
        gate = getattr(self.backend, "gate_addresses", None)
        if gate is not None:
            with self.lock:
                gate(found)

    def _apply(self, changes: tuple[Allow | Remove, ...]) -> None:
        now = self.clock()
        actions: list[tuple[Allow | Remove, Service]] = []
        adding = 0
        for change in changes:  # every change is checked before any is made
            actions.append((change, self._checked(change, now)))
            if isinstance(change, Allow):
                adding += (change.address, change.service) not in self.granted
        if len(self.granted) + adding > MAX_GRANTS:
            raise RefusedError(f"over {MAX_GRANTS} grants")
        with self.lock:
            self.backend.apply(actions, now=now)
            for action, _ in actions:
                key = (action.address, action.service)
                if isinstance(action, Allow):
                    self.granted[key] = action.until
                else:
                    self.granted.pop(key, None)

    def _drops(self) -> list[list[Any]]:
        read = getattr(self.backend, "drops", None)
        if read is None:
            return []
        with self.lock:
            counters = read()
        return [[source, port, count] for (source, port), count in counters.items()]

    def _gate(self) -> dict[str, Any]:
        events, self.events = self.events, []
        foreign, self.foreign = self.foreign, False
        return {"state": self.guard.state.as_dict(), "foreign": foreign,
                "events": [event.as_dict() for event in events]}

    # ---- its own rounds -----------------------------------------------------------

    def expire(self) -> None:
        """End every grant whose time is over, whatever the daemon said."""
        with self.lock:
            now = self.clock()
            ended = [key for key, until in self.granted.items() if until <= now]
            if not ended:
                return
            for key in ended:
                self.granted.pop(key, None)
            if not self.backend.expires_by_itself:
                self.backend.apply([(Remove(address, name), self.installed[name])
                                    for address, name in ended if name in self.installed],
                                   now=now)

    def host_report(self) -> dict[str, Any]:
        """`spa-server check`'s finding against the gate keeper's config."""
        from spa.server.coexist import report

        runner = getattr(self.backend, "runner", None)
        if runner is None:
            raise RefusedError("this backend has no ruleset to check")
        config = config_mod.load(self.config_path)
        with self.lock:
            found = report(runner, config)
        return {"lines": list(found.lines), "problems": found.problems}


def _services_of(path: Path) -> Mapping[str, Service]:
    """Raises LocalError, also for a gateway service whose host is this machine."""
    services = config_mod.load(path).services
    refuse_own_hosts(services, path)
    return services


def serve(keeper: GateKeeper, sock: socket.socket, stop: threading.Event) -> None:
    """Answer the daemon's requests until it closes its end (or asks `stop`
    and closes).  The keeper's own rounds (expiry, the guard's polls) run in
    a thread of their own, so no request, begun or not, ever holds them up.
    When the daemon is gone, a backend whose grants do not end by themselves
    (iptables) is kept until the last grant has ended, then stopped."""
    keeper.guard.start_watching(stop)
    rounds_stop = threading.Event()
    rounds = threading.Thread(target=_rounds, args=(keeper, rounds_stop),
                              name="spa-gate-rounds", daemon=True)
    rounds.start()
    sock.settimeout(TURN)
    try:
        while not stop.is_set():
            try:
                message = receive_message(sock)
            except TimeoutError:
                continue
            except RefusedError as exc:  # a whole frame that is no message: say so, go on
                keeper.log(f"error gate keeper refused a request: {exc}")
                reply: dict[str, Any] = {"refused": str(exc)}
                kit = None
            except OSError:
                break  # the socket failed: the daemon is gone
            else:
                if message is None:
                    break
                reply, kit = keeper.answer(message)
            try:
                frames.send(sock, reply, kit.fds if kit is not None else ())
            except (OSError, RefusedError):
                break
            finally:
                if kit is not None:
                    kit.close()  # the daemon holds its own copies now
    finally:
        if not keeper.stopped:  # gone without asking: a crash, or a daemon not to trust
            _outlive(keeper)
        stop.set()
        rounds_stop.set()
        rounds.join(timeout=5)
        try:
            if not keeper.outliving:  # (after outliving, a new daemon may own the gate)
                keeper.stop()  # the daemon went away without asking: stop as it would have
        except LocalError as exc:
            keeper.log(f"error gate keeper: {exc}")


def _rounds(keeper: GateKeeper, stop: threading.Event) -> None:
    while not stop.wait(TURN):
        try:
            keeper.expire()
            if not keeper.outliving:  # a new daemon may have its own gate keeper by now
                keeper.guard.poll(keeper.clock())
        except LocalError as exc:
            keeper.log(f"error gate keeper: {exc}")
        except Exception as exc:  # never stop ending grants on time
            keeper.log(f"error gate keeper round failed: {type(exc).__name__}: {exc}")


def _outlive(keeper: GateKeeper) -> None:
    """The daemon is gone: grants that need removing are removed at their
    time (the rounds go on), then the keeper may stop."""
    if keeper.backend.expires_by_itself or not keeper.granted:
        return
    keeper.outliving = True
    keeper.log(f"warning gate keeper: the daemon is gone; ending its {len(keeper.granted)} "
               "grant(s) on time before stopping")
    while keeper.granted:
        time.sleep(TURN)


def serve_failure(sock: socket.socket, error: str) -> None:
    """The gate keeper could not start (no backend here, a drop that did not
    take): answer every request with the error until the daemon goes away,
    so the daemon says it in its one line and stops."""
    sock.settimeout(None)
    with contextlib.suppress(OSError, RefusedError):
        while receive_message(sock) is not None:
            frames.send(sock, {"error": error})

