"""The daemon's end of the gate keeper: a firewall backend and a guard that
are requests over the socketpair (spa.server.gatemsg, spa.server.monitor).

Invariants:
- One request and one reply at a time (a lock): the receive thread's grants,
  housekeeping's expiries and the guard's polls never interleave frames.
- If the gate keeper goes away or stops answering within TIMEOUT, every call
  raises LocalError from then on and `on_lost` is called once: the daemon
  stops, since nothing it grants could reach the firewall.
- A firewall failure in the gate keeper is a LocalError here with its line;
  a refusal (a request the gate keeper would not carry out: a bug, or a
  compromised daemon) is a LocalError that says so.
- Descriptors come back only for `tag_map`, and are kept only as a kit
  (spa.kernel.tagkit.adopt); anything else that came with a reply is closed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from spa.backends.base import Change, Destinations, Held
from spa.core.leases import Allow, Remove
from spa.core.policy import Service
from spa.kernel import tagkit
from spa.kernel.bpf import BpfError
from spa.kernel.tagkit import Kit
from spa.server import gatemsg
from spa.server.coexist import Report
from spa.server.errors import LocalError
from spa.server.events import Event
from spa.server.frames import close_all, receive, receive_with_fds
from spa.server.gatemsg import Apply, Gated, Reconcile, Simple, Start, TagMap
from spa.server.guard import GateState
from spa.server.monitor import GateKeeper, serve

TIMEOUT = 60.0  # seconds a reply may take (an iptables restore of many grants)
CLOSE_WAIT = 10.0  # seconds the gate keeper may take to stop after our end closes
GONE = "the privileged gate keeper is gone; stopping (systemd restarts both)"


class RemoteGate:
    """A Backend whose every call is a request to the gate keeper."""

    serialized = True  # one request at a time (its own lock): callers need no other

    def __init__(self, sock: socket.socket, pid: int | None = None) -> None:
        """`pid`: the gate keeper's process, waited for by `close`."""
        self._sock, self._pid = sock, pid
        self.pid = pid
        sock.settimeout(TIMEOUT)
        self._lock = threading.Lock()
        self._gone = False
        self.on_lost: Callable[[], None] = lambda: None
        self.name = "remote"
        self.expires_by_itself = False
        self.holds = False
        self.hold_note = self.flags_note = ""
        self._host_check = False

    def ask(self, request: gatemsg.Request) -> Any:
        """The reply's value.  Raises LocalError."""
        return self._exchange(request, 0)[0]

    def tag_map(self, mode: str, port: int, entries: int) -> Kit:
        """A kit for the eBPF map filter's growth with a tag map of `entries`,
        made by the gate keeper (spa.server.mapgrant).  Raises LocalError
        (refused, failed, not what was asked, the gate keeper gone)."""
        value, fds = self._exchange(TagMap(mode, port, entries), tagkit.FDS)
        if not isinstance(value, dict) or value.get("entries") != entries:
            close_all(fds)
            raise LocalError(f"the gate keeper's tag map reply is not what was asked: "
                             f"{str(value)[:60]}")
        try:
            return tagkit.adopt(fds, entries)
        except BpfError as exc:
            raise LocalError(f"the gate keeper's tag map is not usable: {exc}") from None

    def _exchange(self, request: gatemsg.Request, most: int) -> tuple[Any, list[int]]:
        """The reply's value and the descriptors that came with it (at most
        `most`; none for a refusal or an error).  Raises LocalError."""
        message = gatemsg.encode_request(request)
        fds: list[int] = []
        with self._lock:
            if self._gone:
                raise LocalError(GONE)
            try:
                self._sock.sendall(gatemsg.frame(message))
                if most:
                    reply, fds = receive_with_fds(self._sock, most)
                else:
                    reply = receive(self._sock)
            except (OSError, gatemsg.RefusedError):
                reply = None
            if reply is None:
                self._gone = True
                self.on_lost()
                raise LocalError(GONE)
        if "ok" in reply:
            return reply["ok"], fds
        close_all(fds)
        if "error" in reply:
            raise LocalError(str(reply["error"]))
        raise LocalError(f"the gate keeper refused a request: {reply.get('refused')}")

    # ---- Backend ---------------------------------------------------------------

    def start(self, services: Mapping[str, Service], *, now: float) -> None:
        info = self.ask(Start(tuple(services)))
        self.name = str(info["name"])
        self.expires_by_itself = bool(info["expires_by_itself"])
        self.holds = bool(info["holds"])
        self.hold_note, self.flags_note = str(info["hold_note"]), str(info["flags_note"])
        self._host_check = bool(info["host_check"])

    def allow(self, address: Any, service: Service, until: float, *, now: float) -> None:
        self.ask(Apply((Allow(address, service.name, until, _destination(service)),)))

    def remove(self, address: Any, service: Service) -> None:
        self.ask(Apply((Remove(address, service.name, _destination(service)),)))

    def apply(self, changes: Sequence[Change], *, now: float) -> None:
        self.ask(Apply(tuple(action for action, _ in changes)))

    def reconcile(self, wanted: Held, *, now: float,
                  destinations: Destinations | None = None) -> None:
        """Hold exactly `wanted` (the gate keeper records it as its own), a
        named service's grants to their `destinations`."""
        dests = destinations or {}
        self.ask(Reconcile(tuple(Allow(address, name, until, dests.get((address, name)))
                                 for (address, name), until in wanted.items())))

    def gate_addresses(self, addresses: Mapping[str, Sequence[Any]]) -> None:
        """A named gateway service's addresses, gated before any lease."""
        self.ask(Gated(tuple((name, address) for name, found in addresses.items()
                             for address in found)))

    def held(self, *, now: float) -> Held:
        return {(gatemsg.parse_address(address), name): float(until)
                for address, name, until in self.ask(Simple("held"))}

    def drops(self) -> dict[tuple[str, int], int]:
        return {(str(source), int(port)): int(count)
                for source, port, count in self.ask(Simple("drops"))}

    def stop(self) -> None:
        self.ask(Simple("stop"))

    def close(self) -> None:
        """Close our end: the gate keeper exits (it stopped the backend at
        `stop`, or stops it now); wait for it, kill it after CLOSE_WAIT."""
        self._gone = True
        self._sock.close()
        pid, self._pid = self._pid, None
        if pid is None:
            return
        deadline = time.monotonic() + CLOSE_WAIT
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    def config_stamp(self) -> tuple[int, ...] | None:
        """Which version of the config file is there (the gate keeper looks)."""
        found = self.ask(Simple("stamp"))
        return None if found is None else tuple(int(part) for part in found)

    def config_text(self) -> str:
        """The config file's text, read by the gate keeper (the daemon runs
        as a user that may not read a root-owned config)."""
        return str(self.ask(Simple("config")))

    def host_report(self) -> Report | None:
        """`spa-server check`'s finding, made by the gate keeper (None: this
        backend has no ruleset to read)."""
        if not self._host_check:
            return None
        found = self.ask(Simple("host"))
        return Report(tuple(str(line) for line in found["lines"]), int(found["problems"]))


class RemoteGuard:
    """The guard's face in the daemon: the gate keeper runs the real one
    (spa.server.guard) on its own record of the grants; polling here fetches
    its state, its events and whether another program changed the ruleset."""

    def __init__(self, backend: RemoteGate, *, record: Callable[[Event], None],
                 on_change: Callable[[GateState], None] = lambda state: None,
                 on_foreign: Callable[[], None] = lambda: None, **_: object) -> None:
        self._gate, self._record = backend, record
        self._on_change, self._on_foreign = on_change, on_foreign
        self.state = GateState()

    def start_watching(self, stop: threading.Event) -> None:
        """The gate keeper watches; nothing to start here."""

    def poll(self, now: float) -> None:
        self._take(self._gate.ask(Simple("gate")))

    def check(self, woke: float, *, grants: bool = True) -> None:
        self._take(self._gate.ask(Simple("check")))

    def say_folded(self, now: float) -> None:
        self._take(self._gate.ask(Simple("fold")))

    def _take(self, reply: dict[str, Any]) -> None:
        for fields in reply["events"]:
            self._record(Event(**fields))
        state = GateState(**reply["state"])
        if state != self.state:
            self.state = state
            self._on_change(state)
        if reply["foreign"]:
            self._on_foreign()


@contextlib.contextmanager
def serving_here(keeper: GateKeeper) -> Iterator[RemoteGate]:
    """A gate keeper answering in a thread of this process over a real
    socketpair, and the daemon's end of it: the split without the fork, for
    tests and benchmarks.  On leaving, both ends close and the thread ends."""
    ours, theirs = socket.socketpair()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(keeper, theirs, stop), daemon=True)
    thread.start()
    try:
        yield RemoteGate(ours)
    finally:
        stop.set()
        ours.close()
        thread.join(timeout=5)
        theirs.close()


def _destination(service: Service) -> Any:
    """A named gateway service's lease's address (`Service.for_destination`)."""
    return service.host if service.named else None
