"""The daemon: the receive path, housekeeping, reload, persistence.

Invariants (docs/threat-model.md; issue 4's server design):
- One thread receives and verifies.  It owns the verifier: every change to
  keys, tags or policy is queued as a command and run by that thread between
  packets, so nothing else ever mutates what it reads.
- A housekeeping thread expires leases, moves the tag table with the clock
  in slices (never from the last packet: an idle server keeps every live
  tag; spa.core.knock: the next step's tags are in before its boundary, the
  receive thread's part at the boundary is O(1)), gives the kernel filter the
  table's changes (`update_tags` with the deltas when an eBPF map filter
  runs; the whole set at start, reload and clock jumps), reloads the
  config when it changes (or on SIGHUP), saves state and flushes events;
  none of it blocks the receive path for longer than a lock around the
  lease table.
- The receive thread takes what the socket holds (up to a batch) per wake-up,
  verifies each datagram, and hands the batch's grants to the firewall in one
  call (one nftables transaction) before it takes the next batch.
- A packet replayed REPLAYS_TO_BLOCK times in one second has its nonce added
  to the kernel filter (at most MAX_BLOCKED_NONCES, for as long as its tag can
  be live), so a replay flood stops waking Python; a client's new knock has a
  new random nonce and is never caught by it.
- A knock accepted for a client without `allow_other_address` whose source's
  route back does not leave by the interface it came in on is refused
  `spoofed_source` (spa.server.routes; asked only after verify accepted).
- A knock tag over its failure limit (a captured tag flooded) is shut in the
  kernel filter but from the sources its client authenticated from, held a
  second past the last one it was seen in (spa.server.shut_tags); the
  receive thread reads the limiter for housekeeping, which builds the filter.
- A member of a group (spa.group.link): knocks of the group's clients that
  verify accepted are granted or refused on the claimer's threads once their
  nonce is claimed in etcd; the group's client changes come as ClientDeltas
  run by the receive thread like the store's; other members' leases are
  installed from the watch's thread under the lease lock, as a grant is.
- The server never answers a packet.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from spa.backends.base import Backend, apply, reconcile
from spa.core.errors import AFTER_AUTHENTICATION, Reason
from spa.core.knock import SLICE, STEP_SECONDS, step_of, step_start
from spa.core.leases import Allow, FirewallAction, LeaseTable, restore_saved
from spa.core.limits import FailureLimiter, TrustEntry
from spa.core.otp import OtpChecker
from spa.core.policy import (
    Decision,
    Policy,
    Service,
    local_port_names,
    max_durations,
    named_services,
)
from spa.core.verify import Accepted, Refused, Verifier
from spa.core.wire import NONCE_OFFSET, NONCE_SIZE, Action, IPAddress
from spa.group.claims import Claimer
from spa.group.delta import ClientDelta, switch_verifier
from spa.group.records import LeaseRecord
from spa.server import config as config_mod
from spa.server.coexist import Report, closed_ports, report
from spa.server.config import KIND_SPA, OLD_KEY, ClientEntry, ServerConfig, parse_utc
from spa.server.errors import LocalError
from spa.server.events import EVENTS_DB, Event, EventSink
from spa.server.guard import GateGuard, GateState, Guard
from spa.server.gwresolve import Lookups, Outcome, Resolver, system_resolver
from spa.server.gwroute import refuse_own_hosts
from spa.server.metrics import Metrics
from spa.server.notify import Notifier
from spa.server.routes import RouteCheck
from spa.server.scans import SCAN_WINDOW, Knock, ScanDetector
from spa.server.shut_tags import Seen, ShutTags, read_shut
from spa.server.sources import NONCE_PREFIX, Datagram, PacketSource
from spa.server.state import StateDir
from spa.store.clients import ClientStore

TICK = 0.2  # seconds between housekeeping rounds (revoke lands within ~0.5 s)
RECEIVE_TIMEOUT = 0.25  # the receive thread wakes at least this often
COMPACT_EVERY = 10.0  # seconds between replay-cache dumps (a journal covers between)
PRUNE_EVERY = 3600.0  # seconds between event-retention prunes
HOST_CHECK_EVERY = 1.0  # seconds between checks of the host's firewall after it changed
PAUSE_LOG_VARIABLE = "SPA_LOG_RECEIVE_PAUSE"  # set: log the receive thread's pauses each step
ROTATE_BY = STEP_SECONDS / 2  # seconds into a step by which its rotation's slices are done
WARM_ROUNDS = 5  # housekeeping rounds (1 s) in which a start's other live steps go in
# a start with more clients than this, or a delta of more keys (a group member's
# first read), puts in their tags of the current step alone; the other live
# steps' come in WARM_ROUNDS.  At or under it every live step goes in at once
# (3,000 tags: ~5 ms): a knock sealed a step before a restart (in flight, or a
# client's clock behind) is never an unknown tag there.
WARM_LATER_KEYS = 1000
# clients' worth of a warm-up a round at least (~7 ms): up to this many the
# other live steps are in by the first round, not spread over WARM_ROUNDS
WARM_MIN_SLICE = 5 * SLICE
REPLAYS_TO_BLOCK = 20  # copies of one packet in one second that put its nonce in the kernel filter
MAX_BLOCKED_NONCES = 64  # nonces the kernel filter drops at most (5 BPF instructions each)
DROPS_EVERY = 5.0  # seconds between readings of the firewall's drop counters
MAX_KNOCKED_SOURCES = 10_000  # sources remembered as clients' (scan detection)
SHUT_NOW_BATCH = 32  # datagrams in a batch, most of them rate-limited: a flood, shut it now
SHUT_NOW_EVERY = 0.05  # seconds between the receive thread's own looks at the tags to shut
TRUST_SAVE_EVERY = 10.0  # seconds between saves of the limiter's trusted sources, if changed

Clock = Callable[[], float]
Log = Callable[[str], None]


class Companion(Protocol):
    """A listener beside ours (spa.server.compat): `start` after the daemon's
    start, `serve` starts its thread (it stops when `stop` is set), `close`
    at shutdown, before the state is saved."""

    def start(self) -> None: ...

    def serve(self, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class FileStamp:
    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


HOST_WARN_EVERY = 60.0  # seconds between two lines on one named service's failing host


class Server:
    def __init__(self, config: ServerConfig, *, backend: Backend, source: PacketSource,
                 clock: Clock, log: Log, notifier: Notifier | None = None,
                 state: StateDir | None = None, routes: RouteCheck | None = None,
                 guard: Callable[..., GateGuard] = Guard,
                 resolver: Resolver = system_resolver) -> None:
        """`state`: the state directory, already locked by the caller (so a
        second daemon is refused before it binds a socket); else `start`
        locks it.  `routes`: the reverse-path check of knocks' sources (the
        daemon's is the kernel's, spa.server.routes); None checks nothing.
        `guard`: makes the gate's guard (spa.server.remote's when a
        privileged gate keeper holds the firewall).  `resolver`: a named
        gateway service's host names (spa.server.gwresolve)."""
        self.config = config
        self.lookups = Lookups(resolver, clock=clock)
        self._host_warned: dict[str, float] = {}  # service -> its last unresolved-host line
        self.backend = backend
        self.source = source
        self.clock = clock
        self.log = log
        self.routes = routes
        self.state = state if state is not None else StateDir(config.state_dir)
        self._lock = threading.Lock()
        self._commands: deque[Callable[[], None]] = deque()
        # the group's lease changes waiting for the receive thread (_change_leases)
        self._group_changes: list[Callable[[float], list[FirewallAction]]] = []
        self._group_changes_lock = threading.Lock()
        self._reload_requested = threading.Event()
        self.stop_requested = threading.Event()  # the daemon decided to stop itself
        self._dirty = True
        self._open_pairs: set[tuple[object, str]] = set()
        self._config_stamp, self._read_config = _config_reader(config.path, backend)
        self._stamp = self._config_stamp()
        # what the file said of the settings a reload cannot change (run's
        # --backend/--mode may override the file: compare file with file)
        self._file_fixed = _fixed_settings(config)
        with contextlib.suppress(LocalError):
            self._file_fixed = _fixed_settings(self._read_config())
        self._last_compact = self._last_prune = 0.0
        self.notifier = notifier or Notifier(None, None)
        self._heartbeat = 0.0  # monotonic time of the receive loop's last turn
        self._retry_reconcile = False  # a firewall call failed: reconcile next round
        self._filter_generation: int | None = None  # the tag table's, when the kernel got all
        # set by the receive thread once the changes queued before it ran: the whole set then
        self._replace_filter = threading.Event()
        self._tags_lock = threading.Lock()  # the tag table's mutations (spa.core.knock)
        self._filter_kind = "port-only"  # which kernel filter runs (`status`)
        self._filter_room = 0  # and the eBPF tag map's room (a change is logged)
        # the receive thread's longest batch (seconds) and largest backlog,
        # said once a step when SPA_LOG_RECEIVE_PAUSE is set (benchmarks/bench_scale.py)
        self.receive_pause = 0.0
        self.receive_backlog = 0  # the largest batch since (datagrams waiting at once)
        self._say_pause = bool(os.environ.get(PAUSE_LOG_VARIABLE))
        self._pause_samples: list[tuple[float, int]] = []  # (seconds, datagrams) per batch
        self._pause_step = 0
        self._refresh_queued = False  # the receive thread will move the tag table
        self._warm_slice = 0  # clients a round of the live steps a start left out
        self._pending_snapshot: bytes | None = None  # replay snapshot to write
        self._replays: dict[bytes, int] = {}  # nonce prefix -> copies this second
        self._replay_second = -1
        # nonce prefix -> until: written by the receive thread, read by housekeeping
        self._blocked_nonces: dict[bytes, float] = {}
        self._filter_nonces: list[bytes] = []  # what the kernel filter drops now
        self._shut = ShutTags()  # flooded tags the kernel filter shuts (under _filter_lock)
        self._filter_lock = threading.Lock()
        self._last_shut_now = 0.0
        self._shut_seen: tuple[float, Seen] = (0.0, {})  # the receive thread's last reading
        self._shut_queued = False
        self._filter_shut: Seen = {}
        # pending enrollments (enroll_by): those used in time, and those not yet
        self._activated: dict[str, str] = {}  # name -> the enroll_by it met
        # the policy's `activated` (pending clients that met their enroll_by)
        # and those still pending: the receive thread's sets, changed in place
        self._met: set[str] = set()
        self._pending: set[str] = set()
        self._activated_dirty = False
        self._otp_dirty = False
        # a member's restored leases of the group's clients, until the group's first read
        self._unconfirmed: set[tuple[str, IPAddress, str]] = set()
        self._trust_saved = 0  # the limiter's trust_revision last saved
        self._last_trust_save = 0.0
        self._pending_trust: list[TrustEntry] | None = None  # snapshot to write
        self._scans = ScanDetector()
        self._knocked: dict[str, Knock] = {}  # source -> its last authenticated knock
        # a services tuple -> its ports (clients share a few combinations)
        self._ports: dict[tuple[str, ...], frozenset[int]] = {}
        self._last_drops = 0.0
        self._drops_apart = False  # the drop counters are read by their own thread
        self.metrics: Metrics | None = None
        self._facts: dict[str, object] = {}  # what the lock file tells `status`
        self._host_changed = threading.Event()  # another program changed the ruleset
        self._last_host_check = 0.0
        self._host_report: Report | None = None
        self._make_guard = guard
        self.start_notes: list[str] = []  # lines for the log once started (the privileges)
        # listeners beside ours that share the gate (the fwknop compat listener,
        # spa.server.compat): started, served and closed with the daemon
        self.companions: list[Companion] = []
        self._store: ClientStore | None = None  # the client store (opened at start)
        self._store_seq = 0  # the store's version the running clients reflect
        self.clients_read = 0  # client rows read from the store (all at start, then changes)
        self.claims: Claimer | None = None  # a group member's claims (spa.group.link)
        self.guard: GateGuard
        self.verifier: Verifier
        self.leases: LeaseTable
        self.events: EventSink

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Load state, start the backend, reconcile.  Raises LocalError."""
        now = self.clock()
        self.state.ensure()
        self.state.acquire(now)  # one daemon per state directory, before anything else
        replay = self.state.load_replay(self.config.window, now)
        # a fresh dump first: a record torn by a crash never sits in front of
        # the records this run appends
        self.state.compact_now(replay)
        self.state.journal(replay)
        self._activated = self.state.load_activated()
        self._load_clients()
        self._scans = ScanDetector(self.state.load_drop_counters())
        otp = OtpChecker(self.config.otp_secrets(), self.state.load_otp_steps(),
                         on_use=self._otp_used)
        self._grace = self._grace_of(self.config, now)
        limiter = FailureLimiter()
        limiter.restore_trust(self._load_trust(), now)
        self._trust_saved = limiter.trust_revision
        secrets = self.config.secrets(now)
        self.verifier = Verifier(self.config.server_id, secrets,
                                 self._policy_of(self.config), now=now,
                                 window=self.config.window, replay=replay, otp=otp,
                                 limiter=limiter, warm_later=len(secrets) > WARM_LATER_KEYS)
        closed = {n for n, c in self.config.clients.items() if c.close_leases}
        group = self.config.group
        restored = restore_saved(self.state.load_leases(),
                                 clients=self.config.clients if group is None else _AnyName(),
                                 max_durations=max_durations(self.config.services), now=now,
                                 named=named_services(self.config.services))
        if restored.note():
            self.log(f"warning {restored.note()}")
        saved = [lease for lease in restored.kept if lease.client not in closed]
        if group is not None:  # a member: its leases of the group's clients, until the group says
            self._unconfirmed = {(lease.client, lease.address, lease.service) for lease in saved
                                 if lease.client not in self.config.clients}
            if self._unconfirmed:
                self.log(f"group {group.name}: {len(self._unconfirmed)} leases of the group's "
                         "clients restored from the state directory (the group's first read "
                         "keeps those it still holds)")
        self.leases = LeaseTable.from_leases(saved, now=now)
        self.events = EventSink(self.state.files / EVENTS_DB, self.log,
                                retention_days=self.config.event_retention_days)
        self.backend.start(self.config.services, now=now)
        try:
            self._gate_named(self.config.services)
            self._reconcile(now)
        except LocalError as exc:  # the gate is not ours to write (the guard says so): serve
            self.log(f"error firewall: {exc}")
            self._retry_reconcile = True
        self.guard = self._make_guard(
            self.backend, lock=self._lock, wanted=lambda: self.leases.allowed(),
            clock=self.clock, log=self.log, record=self.events.record,
            on_change=self._gate_changed, on_foreign=self._host_changed.set)
        self.verifier.tags.use_lock(self._tags_lock)
        self._warm_slice = _warm_slice(self.verifier.tags.warming())
        self._update_kernel_filter(now, force=True)
        self._facts = {
            "pid": os.getpid(), "started": self._started_at(now), "port": self.config.listen_port,
            "backend": self.backend.name, "mode": self.config.mode,
            "gate": self.guard.state.as_dict(),
            # the hold table's name (False: none); `status` names it
            "hold": self.config.names.hold if getattr(self.backend, "holds", False) else False,
            "filter": self._filter_kind,
        }
        self.log(self._gate_line(self.config.services))
        for note in (getattr(self.backend, "hold_note", ""),
                     getattr(self.backend, "flags_note", "")):
            if note:
                self.log(f"warning firewall: {note}")
        self._check_host(now, force=True)
        self.state.write_server(self._facts)
        if self.config.metrics_listen:
            self.metrics = Metrics()
            self.metrics.serve(self.config.metrics_listen)
        self._save(now)
        for note in self.start_notes:
            self.log(note)
        for companion in self.companions:
            companion.start()
        self.log(f"started port={self.config.listen_port} backend={self.backend.name} "
                 f"mode={self.config.mode} clients={len(self.config.clients)} "
                 f"leases={len(self.leases)}")

    def set_fact(self, key: str, value: object) -> None:
        """A fact `status` shows (a companion's: the compat listener's port)."""
        self._facts = {**self._facts, key: value}
        self.state.write_server(self._facts)

    def set_fact_soon(self, key: str, value: object) -> None:
        """set_fact, from a companion's thread: on the receive thread's next turn."""
        self._queue(lambda: self.set_fact(key, value))

    def _gate_line(self, services: Mapping[str, Service]) -> str:
        """What the gate closes; the memory backend (a try-out) closes nothing."""
        if self.backend.name == "memory":
            return ("gate none: the memory backend closes no port (a try-out; "
                    "--backend nftables or iptables closes them)")
        if self.backend.name == "command":
            return (f"gate {closed_ports(services)} on the firewall the [command] programs "
                    "drive (nothing on this host)")
        return f"gate {closed_ports(services)}"

    def _check_host(self, now: float, *, force: bool = False) -> None:
        """Does the host's firewall let through what the gate lets in?  At
        start, after a reload, and (at most once a second) after another
        program changed the ruleset; said in the log when the answer
        changes, and in `status`."""
        if not (force or self._host_changed.is_set()):
            return
        if not force and now - self._last_host_check < HOST_CHECK_EVERY:
            return
        self._host_changed.clear()
        self._last_host_check = now
        try:
            found = self._read_host()
        except LocalError as exc:
            self.log(f"error check: {exc}")
            return
        if found is None:
            return
        if force or found != self._host_report:
            self.log(f"check: {found.summary}")
            for line in found.lines if found.problems else ():
                if " ok, " not in line:
                    self.log(f"warning check: {line}")
        self._host_report = found
        self._facts = {**self._facts, "check": {"problems": found.problems, "at": now,
                                                 "summary": found.summary}}
        self.state.write_server(self._facts)

    def _read_host(self) -> Report | None:
        """The finding, from the gate keeper when it holds the firewall, else
        from the backend's ruleset (None: nothing to read)."""
        remote = getattr(self.backend, "host_report", None)
        if remote is not None:
            found: Report | None = remote()
            return found
        runner = getattr(self.backend, "runner", None)
        if runner is None:
            return None
        with self._lock:
            return report(runner, self.config)

    def _keep_lock(self) -> None:
        """One daemon per state directory, even if someone removes the lock
        file: take it again at once; if a second daemon got it first, this
        one stops (the newer one serves the same config)."""
        try:
            note = self.state.keep_lock()
        except LocalError as exc:
            self.log(f"error {exc}; stopping this one (pid {os.getpid()})")
            self.stop_requested.set()
            return
        if note is not None:
            self.log(f"warning {note}")
            self.state.write_server(self._facts)

    def _gate_changed(self, gate: GateState) -> None:
        """The guard repaired the gate, or failed to: `status` shows it."""
        self._facts = {**self._facts, "gate": gate.as_dict()}
        self.state.write_server(self._facts)

    def _started_at(self, now: float) -> float:
        info = self.state.running_server() or {}
        started = info.get("started")
        return float(started) if isinstance(started, int | float) else now

    def _reconcile(self, now: float) -> None:
        """Make the backend hold exactly the live leases (after a restart)."""
        wanted = self.leases.allowed()
        reconcile(self.backend, wanted, self.config.services, now=now,
                  destinations=self.leases.destinations())
        self._open_pairs = set(wanted)

    def serve(self, stop: threading.Event) -> None:
        """Receive until `stop` is set, with housekeeping in its own thread."""
        keeper = threading.Thread(target=self._housekeeping_loop, args=(stop,),
                                  name="spa-housekeeping", daemon=True)
        keeper.start()
        self._drops_apart = True  # read by a thread of its own from now on
        threading.Thread(target=self._drops_loop, args=(stop,), name="spa-drops",
                         daemon=True).start()
        for companion in self.companions:
            companion.serve(stop)
        self.guard.start_watching(stop)
        self._gate_changed(self.guard.state)
        self.notifier.ready(f"serving port {self.config.listen_port}/udp, "
                            f"backend {self.backend.name}, mode {self.config.mode}")
        clock = time.perf_counter
        _settle()
        try:
            while not stop.is_set() and not self.stop_requested.is_set():
                self._heartbeat = time.monotonic()
                self.run_commands()
                batch = self.source.receive(RECEIVE_TIMEOUT)
                if batch:
                    began = clock()
                    # what was queued while this thread waited (a revoke) judges
                    # the batch that woke it
                    self.run_commands()
                    try:
                        self.handle_batch(batch)
                    except Exception as exc:  # never let one batch end the server
                        self.log(f"error receive path: {type(exc).__name__}: {exc}")
                    # a benchmark's gauges: the longest batch, and the most datagrams
                    # waiting at once (at a known rate, how long they waited)
                    pause = clock() - began
                    if pause > self.receive_pause:
                        self.receive_pause = pause
                    if len(batch) > self.receive_backlog:
                        self.receive_backlog = len(batch)
                    if self._say_pause:
                        self._pause_samples.append((pause, len(batch)))
        finally:
            stop.set()
            keeper.join(timeout=5)

    def shutdown(self) -> None:
        """Stop cleanly: flush events, save state, stop the backend."""
        now = self.clock()
        self.notifier.stopping()
        for companion in self.companions:
            companion.close()
        self.lookups.close()
        self.run_commands()
        try:
            with self._lock:
                self._apply(self.leases.expire(now), now)
            self.guard.say_folded(now)  # no repair goes uncounted
        except LocalError as exc:  # the gate keeper is gone: save what we know all the same
            self.log(f"error firewall: {exc}")
        self._save(now)
        self.state.save_trust(self.verifier.limiter.dump_trust(now))  # nothing receives now
        self.state.compact_now(self.verifier.replay)
        self.state.close()
        self.source.close()
        with contextlib.suppress(LocalError):
            self.backend.stop()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()  # the gate keeper's end: it stops, and is waited for
        self.events.close()
        if self._store is not None:
            self._store.close()
        if self.metrics is not None:
            self.metrics.close()
        self.log(f"stopped leases={len(self.leases)}")
        self.state.release()  # last: until here no second daemon may start

    def request_reload(self) -> None:
        """SIGHUP: reload the config at the next housekeeping round."""
        self._reload_requested.set()

    # ---- the receive path --------------------------------------------------

    def _queue(self, command: Callable[[], None]) -> None:
        """Have the receive thread run `command` next, woken now if it waits
        (a source without a wake-up takes it at the end of its wait)."""
        self._commands.append(command)
        wake = getattr(self.source, "wake", None)
        if wake is not None:
            wake()

    def run_commands(self) -> None:
        """Apply queued changes to the verifier (receive thread only)."""
        commands = self._commands
        while commands:
            commands.popleft()()

    def handle(self, data: bytes, source: str, ifindex: int = 0) -> Accepted | Refused:
        """Verify one datagram and act on it (see handle_batch)."""
        return self.handle_batch([(data, source, ifindex)])[0]

    def handle_batch(self, batch: list[Datagram]) -> list[Accepted | Refused]:
        """Verify datagrams and act on them; the batch's firewall changes go
        out in one call.  Never answers, never raises for any content.  A
        group's client's packet that verify accepted is Accepted here and
        granted or refused once its nonce is claimed (spa.group.claims, on
        the claimer's threads)."""
        now = self.clock()
        verify, events = self.verifier.verify, self.events
        results: list[Accepted | Refused] = []
        accepted: list[Accepted] = []
        nonces: list[bytes] = []
        for data, source, ifindex in batch:
            result = verify(data, source, now)
            if type(result) is Accepted and not self._route_back(result, source, ifindex, now):
                self.verifier.limiter.distrust(result.client, source)
                result = Refused(Reason.SPOOFED_SOURCE, result.client)  # its nonce is burned
            results.append(result)
            if isinstance(result, Refused):
                events.refuse(now, result.reason.value, result.client, source)
                if result.reason is Reason.REPLAY:
                    self._count_replay(data, now)
                elif result.reason in AFTER_AUTHENTICATION and result.client is not None:
                    self._knocked_from(source, now, self._ports_of(result.client))
            else:
                self._knocked_from(source, now, self._ports_of(result.client))
                accepted.append(result)
                nonces.append(bytes(data[NONCE_OFFSET:NONCE_OFFSET + NONCE_SIZE]))
                if result.client in self._pending:
                    self._activate(result.client)
        if accepted and self.claims is not None:  # the group's clients: granted once claimed
            accepted = self.claims.submit(accepted, nonces)
        if accepted:
            self._grant(accepted, now)
        if len(batch) >= SHUT_NOW_BATCH and sum(
                1 for r in results if type(r) is Refused and r.reason is Reason.RATE_LIMITED
                ) * 2 >= len(batch):
            self._shut_now(now)
        return results

    def _route_back(self, result: Accepted, source: str, ifindex: int, now: float) -> bool:
        """Does the route back to `source` leave by the interface the knock
        came in on?  Asked only of clients without `allow_other_address`
        (one that has it may name any address anyway)."""
        routes = self.routes
        if routes is None:
            return True
        rules = self.verifier.policy.clients.get(result.client)
        if rules is not None and rules.allow_other_address:
            return True
        return routes.leaves_by(source, ifindex, now)

    def _otp_used(self, client: str, step: int) -> None:
        self._otp_dirty = True  # saved by the next housekeeping round

    def _policy_of(self, config: ServerConfig) -> Policy:
        """The config's rules with what this server knows of pending clients
        (before the receive thread starts: one pass over every client)."""
        self._met = {name for name, entry in config.clients.items()
                     if entry.enroll_by and self._activated.get(name) == entry.enroll_by}
        self._pending = {name for name, entry in config.clients.items()
                         if entry.enroll_by and name not in self._met}
        return config.policy(self._met)

    def _activate(self, client: str) -> None:
        """A pending client's knock was accepted in time: it is enrolled for
        good (receive thread; O(1): the policy's set is changed in place)."""
        entry = self.config.clients.get(client)
        if entry is None or not entry.enroll_by:
            return
        self._activated[client] = entry.enroll_by
        self._activated_dirty = True
        self._met.add(client)
        self._pending.discard(client)
        self.log(f"activated client={client} (its pending enrollment was used in time)")

    def _knocked_from(self, source: str, now: float, ports: frozenset[int] | None) -> None:
        """A client's key knocked from `source` (scan detection spares its
        probes of its client's ports); bounded, pruned with the drops."""
        knocked = self._knocked
        if source in knocked or len(knocked) < MAX_KNOCKED_SOURCES:
            knocked[source] = Knock(now, ports or frozenset())

    def _ports_of(self, client: str | None) -> frozenset[int] | None:
        """The ports of the services a client may open (None: no such client);
        one set per combination of services, made again after a reload."""
        if client is None:
            return None
        entry = self.config.clients.get(client)
        if entry is not None:
            names = entry.services
        else:  # a group's client (spa.group.member): its rules say
            rules = self.verifier.policy.clients.get(client)
            if rules is None:
                return None
            names = tuple(sorted(rules.services))
        ports = self._ports.get(names)
        if ports is None:
            services = self.config.services
            ports = frozenset(services[s].port for s in names if s in services)
            self._ports[names] = ports
        return ports

    def _count_replay(self, data: bytes, now: float) -> None:
        second = int(now)
        if second != self._replay_second:
            self._replay_second = second
            self._replays.clear()
        nonce = bytes(data[NONCE_OFFSET:NONCE_OFFSET + NONCE_PREFIX])
        count = self._replays.get(nonce, 0) + 1
        self._replays[nonce] = count
        if count == REPLAYS_TO_BLOCK and len(self._blocked_nonces) < MAX_BLOCKED_NONCES:
            # as long as its tag can be live: the window either side, plus a step
            self._blocked_nonces[nonce] = now + 2 * self.config.window + STEP_SECONDS

    def _grant(self, accepted: list[Accepted], now: float) -> None:
        actions: list[FirewallAction] = []
        with self._lock:
            for result in accepted:
                decision, request = result.decision, result.request
                name = decision.service.name
                opening = request.action is Action.OPEN
                if opening and self._lookup(result):
                    continue  # granted (or refused) once its host's name is resolved
                self.events.record(Event(now, "accepted", str(request.action), None,
                                         result.client, str(decision.address), name,
                                         decision.duration if opening else None))
                if opening:
                    actions += self.leases.grant(result.client, decision.address, name,
                                                 now=now, duration=decision.duration)
                else:
                    actions += self.leases.close(result.client, decision.address, name, now=now)
            self._commit(actions, now)

    def _gate_named(self, services: Mapping[str, Service]) -> None:
        """Resolve each named gateway service's host now (start, reload: not
        the receive thread) and have the gate drop its port on what the name
        gives, before any lease.  Raises LocalError from the backend."""
        found: dict[str, list[IPAddress]] = {}
        for service in services.values():
            if not service.named:
                continue
            for version in (4, 6):
                outcome = self.lookups.resolve(service.host_name, version)
                if not isinstance(outcome, Reason):
                    found.setdefault(service.name, []).append(outcome)
            if service.name not in found:
                self.log(f"warning gateway {service.name}: host {service.host_name} gives no "
                         "usable address now; its port is gated on an address from the first "
                         "lease that gets it (docs/install.md, section 11)")
        gate = getattr(self.backend, "gate_addresses", None)
        if found and gate is not None:
            with self._lock:
                gate(found)

    def _lookup(self, result: Accepted) -> bool:
        """Whether an open of a named gateway service waits for its host's
        name (its pair is not open yet: an open pair keeps its destination),
        resolved off the receive thread.  (Caller holds the lock.)"""
        decision = result.decision
        service = decision.service
        if not service.named or self.leases.destination(decision.address, service.name):
            return False
        self.lookups.submit(service.host_name, decision.address.version,
                             lambda outcome: self._resolved(result, outcome))
        return True

    def _resolved(self, result: Accepted, outcome: Outcome) -> None:
        """The grant a lookup waited for: made, to the address resolved, or
        refused (fail closed) with the reason (the lookups' thread)."""
        now = self.clock()
        decision = result.decision
        name = decision.service.name
        with self._lock:
            if isinstance(outcome, Reason):
                self.events.refuse(now, outcome.value, result.client, str(result.source), name)
                if now - self._host_warned.get(name, -HOST_WARN_EVERY) >= HOST_WARN_EVERY:
                    self._host_warned[name] = now  # (the refusals themselves: events' budget)
                    self.log(f"warning gateway {name}: host {decision.service.host_name} gave "
                             f"no usable IPv{decision.address.version} address "
                             f"({outcome.value}); the grant for client={result.client} is "
                             "refused")
                return
            self.events.record(Event(now, "accepted", "open", None, result.client,
                                     str(decision.address), name, decision.duration))
            actions = self.leases.grant(result.client, decision.address, name, now=now,
                                        duration=decision.duration, destination=outcome)
            self._commit(actions, now)

    def _commit(self, actions: list[FirewallAction], now: float) -> None:
        """Carry out lease changes made under the lock (held by the caller):
        the state is saved at the next round; a firewall error is logged and
        the next housekeeping reconciles."""
        self._dirty = True
        try:
            self._apply(actions, now)
        except LocalError as exc:  # keep serving; the next housekeeping retries
            self.log(f"error firewall: {exc}")
            self._retry_reconcile = True

    # ---- a group's member (spa.group.member, spa.group.claims) -------------

    def grant_claimed(self, results: list[Accepted], now: float) -> None:
        """Claimed knocks' grants, a claim batch's in one commit (from a claim thread)."""
        with self._lock:  # a revocation applied while the claim was in flight: no grant
            clients = self.verifier.policy.clients
            kept = []
            for result in results:
                rule = clients.get(result.client)
                if rule is not None and not rule.revoked:
                    kept.append(result)
                else:
                    self.events.refuse(now, Reason.REVOKED.value, result.client,
                                       str(result.source))
        if kept:
            self._grant(kept, now)

    def refuse_claimed(self, result: Accepted, reason: Reason, now: float) -> None:
        """An accepted knock whose claim refused it (replay, group_unreachable)."""
        self.events.refuse(now, reason.value, result.client, str(result.source))

    def install_lease(self, lease: LeaseRecord) -> None:
        """Another member's lease, here too with the same end (a grant's path)."""
        now = self.clock()
        service = self.config.services.get(lease.service)
        if service is None:
            self.log(f"warning group: a lease of client={lease.client} for service "
                     f"{lease.service} is not installed: no such service in {self.config.path}")
        elif service.named:  # its destination is not in the lease record (yet): never guess
            self.log(f"warning group: a lease of client={lease.client} for service "
                     f"{lease.service} is not installed here: its host is a name, and another "
                     "member's lease does not say what it resolved to")
        elif lease.until > now:
            def install(at: float) -> list[FirewallAction]:
                rule = self.verifier.policy.clients.get(lease.client)
                if lease.until <= at or (rule is not None and rule.revoked):
                    return []
                return self.leases.grant(lease.client, lease.address, lease.service, now=at,
                                         duration=lease.until - at)
            self._change_leases(install)

    def confirm_restored(self, live: Collection[tuple[str, IPAddress, str]]) -> None:
        """The group's first read (spa.group.member): a lease of a group client
        restored at start stays only if the group still holds it (`live`: the
        (client, address, service) of its leases/ keys); one closed at another
        member, or whose client is gone, while this one was down ends now."""
        stale, self._unconfirmed = self._unconfirmed - set(live), set()
        for client, address, service in sorted(stale, key=str):
            self.remove_lease(client, address, service)
        if stale:
            self.log(f"group: {len(stale)} leases restored at start are not the group's any "
                     "more (closed at another member, or their client gone): removed")

    def remove_lease(self, client: str, address: IPAddress, service: str) -> None:
        """A lease the group no longer holds (closed or revoked elsewhere)."""
        self._change_leases(lambda at: self.leases.close(client, address, service, now=at))

    def _change_leases(self, change: Callable[[float], list[FirewallAction]]) -> None:
        """A lease change the group's watch brings (another member's grant or
        close), made in the order it came by the receive thread, woken for it:
        every change queued meanwhile goes out in one firewall commit (a burst
        of another member's grants cost a commit each: the member that only
        installs them spent more CPU a grant than the one granting them,
        benchmarks/group_knock.py)."""
        with self._group_changes_lock:
            first = not self._group_changes
            self._group_changes.append(change)
        if first:
            self._queue(self._apply_group_changes)

    def _apply_group_changes(self) -> None:
        """The receive thread: the queued lease changes, in order, one commit."""
        with self._group_changes_lock:
            changes, self._group_changes = self._group_changes, []
        now = self.clock()
        with self._lock:
            actions = [action for change in changes for action in change(now)]
            self._commit(actions, now)

    def grant_legacy(self, client: str, decisions: tuple[Decision, ...], now: float) -> None:
        """A compat knock accepted (spa.server.compat): its grants, from its
        listener's thread, every event it causes marked legacy.  A named
        gateway service's host is resolved here, on that thread."""
        actions: list[FirewallAction] = []
        found = {d.service.name: self.lookups.resolve(d.service.host_name, d.address.version)
                 for d in decisions if d.service.named}
        with self._lock:
            for decision in decisions:
                name = decision.service.name
                outcome = found.get(name)
                if isinstance(outcome, Reason):
                    self.events.refuse(now, outcome.value, client, str(decision.address), name,
                                       legacy=True)
                    continue
                self.events.record(Event(now, "accepted", "open", None, client,
                                         str(decision.address), name, decision.duration,
                                         legacy=True))
                actions += self.leases.grant(client, decision.address, name, now=now,
                                             duration=decision.duration, destination=outcome)
            self._dirty = True
            try:
                self._apply(actions, now, legacy=True)
            except LocalError as exc:  # keep serving; the next housekeeping retries
                self.log(f"error firewall: {exc}")
                self._retry_reconcile = True

    def _apply(self, actions: list[FirewallAction], now: float, *, legacy: bool = False) -> None:
        """Carry out actions on the backend (caller holds the lock)."""
        apply(self.backend, actions, self.config.services, now=now)
        for action in actions:
            pair = (action.address, action.service)
            if isinstance(action, Allow):
                if pair not in self._open_pairs:
                    self._open_pairs.add(pair)
                    self.events.record(Event(now, "lease_start", None, None, None,
                                             str(action.address), action.service,
                                             round(action.until - now), legacy=legacy))
            else:
                self._open_pairs.discard(pair)
                self.events.record(Event(now, "lease_end", None, None, None,
                                         str(action.address), action.service))

    # ---- housekeeping ------------------------------------------------------

    def _housekeeping_loop(self, stop: threading.Event) -> None:
        while not stop.wait(TICK):
            try:
                self.housekeeping()
            except LocalError as exc:
                self.log(f"error {exc}")
            except Exception as exc:  # keep serving; say what broke
                self.log(f"error housekeeping failed: {type(exc).__name__}: {exc}")

    def housekeeping(self) -> None:
        """One round: expire, stage tags, reload, save, flush.  The client
        store first: a revoke waits for no firewall call of the round."""
        self._poll_store()
        now = self.clock()
        if self._retry_reconcile:  # a firewall call failed: was the gate taken away?
            self.guard.check(time.monotonic())
        self.guard.poll(now)
        self._keep_lock()
        self._check_host(now)
        with self._lock:
            expired = self.leases.expire(now)
            self._dirty |= bool(expired)
            if self._retry_reconcile:
                self._retry_reconcile = False
                self._reconcile(now)
            elif expired:
                self._apply(expired, now)
        self._follow_the_clock(now)
        self._end_grace(now)
        if not self._drops_apart:
            self._read_drops(now)
        self._update_kernel_filter(now)
        self._maybe_reload()
        self._save(now)
        self._save_trust(now)
        self._compact_replay(now)
        written = self.events.flush(now)  # within the event budget of now's second
        if self.metrics is not None:
            self._update_metrics(written)
        alive = time.monotonic() - self._heartbeat < 5 * RECEIVE_TIMEOUT
        self.notifier.watchdog(time.monotonic(), alive)
        if now - self._last_prune >= PRUNE_EVERY:
            self.events.prune(now)
            self._last_prune = now

    def _follow_the_clock(self, now: float) -> None:
        """Move the tag table with the clock, whether or not packets arrive.

        The kernel filter follows the table (`_update_kernel_filter`), and
        the table follows the clock here, so a server that receives nothing
        for hours still holds the live tags (an idle server once kept the
        tags of its last packet's step, and every later knock died in the
        kernel).  Each round does its share of the rotation's slices, so
        they are done ROTATE_BY seconds into the step (the next step's tags
        reach the kernel long before its boundary); once a boundary has
        passed, the receive thread moves the table (O(1) then).
        """
        table, step = self.verifier.tags, step_of(now)
        if self._say_pause and step != self._pause_step:
            samples, self._pause_samples = self._pause_samples, []
            self.log(f"receive pause max {self.receive_pause * 1000:.2f} ms, backlog max "
                     f"{self.receive_backlog} in step {self._pause_step} "
                     f"(clients={len(table.clients)}; {_percentiles(samples)})")
            self.receive_pause, self.receive_backlog, self._pause_step = 0.0, 0, step
        pending = table.pending()
        if pending:
            rounds = max(1, int((step_start(table.step) + ROTATE_BY - now) / TICK))
            # the live steps a start left out go in within WARM_ROUNDS rounds
            budget = max(-(-pending // rounds), min(self._warm_slice, table.warming()))
            while budget > 0:
                done = table.slice(min(SLICE, budget))
                if not done:
                    break
                budget -= done
        if table.step != step and not self._refresh_queued:
            self._refresh_queued = True

            def refresh() -> None:
                self._refresh_queued = False
                self.verifier.refresh(self.clock())

            self._queue(refresh)

    @staticmethod
    def _grace_of(config: ServerConfig, now: float) -> dict[str, float]:
        """NAME~old -> end of grace, for the rotated-out secrets still live."""
        return {key: until for key, until in config.grace_ends().items() if until > now}

    def _update_metrics(self, written: list[Event]) -> None:
        assert self.metrics is not None
        self.metrics.observe(written)
        with self._lock:
            per_service: dict[str, int] = {}
            for (_, service) in self.leases.allowed():
                per_service[service] = per_service.get(service, 0) + 1
        queue_drops = getattr(self.source, "queue_drops", None)
        self.metrics.set_state(per_service, self.config.services,
                               queue_drops() if queue_drops is not None else None)
        if self.claims is not None:
            self.metrics.set_group(dict(self.claims.counts))

    def _drops_loop(self, stop: threading.Event) -> None:
        """The drop counters' readings, apart from housekeeping: a reading of
        8,192 counters a family takes the gate keeper ~0.15 s (65,536 took
        1.1-2.3 s, and a revoke waited behind it in housekeeping: the
        adversarial review let a revoked client in 1 s after `revoke`)."""
        while not stop.wait(TICK):
            try:
                self._read_drops(self.clock())
            except Exception as exc:  # keep serving; say what broke
                self.log(f"error reading the drop counters: {type(exc).__name__}: {exc}")

    def _read_drops(self, now: float) -> None:
        """Every DROPS_EVERY seconds: the firewall's drop counters become
        'dropped' events per (source, service) and 'scan' events."""
        read = getattr(self.backend, "drops", None)
        if read is None or now - self._last_drops < DROPS_EVERY:
            return
        self._last_drops = now
        # a gate keeper's end takes one request at a time by itself: the lease
        # lock is not held across its reading (grants would wait for it)
        serialized = getattr(self.backend, "serialized", False)
        try:
            with contextlib.nullcontext() if serialized else self._lock:
                counters = read()
        except LocalError:
            return  # the gate is away or not ours: the guard repairs it and says so
        cutoff = now - SCAN_WINDOW
        for source, knock in list(self._knocked.items()):  # in place: the receive thread adds
            if knock.when <= cutoff:
                self._knocked.pop(source, None)
        dropped, scans = self._scans.observe(counters, now, self._knocked)
        if dropped:
            self.state.save_drop_counters(self._scans.last)
        by_port = local_port_names(self.config.services)
        for item in dropped:  # counted within the event budget (a spoofed flood folds)
            self.events.tally(Event(now, "dropped", None, None, None, item.source,
                                    by_port.get(item.port, str(item.port)), None,
                                    item.attempts))
        for scan in scans:
            names = ",".join(by_port.get(port, str(port)) for port in scan.ports)
            self.events.tally(Event(now, "scan", None, None, None, scan.source, names, None,
                                    scan.attempts))

    def _end_grace(self, now: float) -> None:
        """Housekeeping: a rotated-out secret whose grace is over stops at once."""
        ended = [key for key, until in self._grace.items() if until <= now]
        if not ended:
            return
        for key in ended:
            del self._grace[key]

        def forget() -> None:
            for key in ended:
                self.verifier.remove_client(key)

        self._queue(forget)
        self._update_kernel_filter(now, force=True)
        self.log(f"grace over: the old secret of {', '.join(k.split('~')[0] for k in ended)} "
                 "no longer works")

    def _update_kernel_filter(self, now: float, *, force: bool = False) -> None:
        """Give a capture source the live tags, so junk never wakes Python.

        The tags are the table's (the next step's are in it well before its
        boundary): at start, reload and clock jumps the whole set
        (`replace_tags`, once the receive thread ran the queued changes),
        else the journal's changes (`update_tags` when an eBPF map filter
        runs; a classic filter gets the whole list again, ~811 tags at most).
        """
        if getattr(self.source, "set_tags", None) is None:
            return
        with self._filter_lock:  # housekeeping's rounds, and the receive thread's shut
            self._build_kernel_filter(now, force)

    def _build_kernel_filter(self, now: float, force: bool) -> None:
        source: Any = self.source
        blocked = self._blocked_nonces
        for nonce, until in list(blocked.items()):
            if until <= now:
                del blocked[nonce]
        nonces = sorted(blocked)
        seen_at, seen = self._shut_seen
        self._shut.observe(seen, seen_at)
        self._read_shut_tags()
        shut = self._shut.current(now)
        table = self.verifier.tags
        if force and self._filter_generation is not None:
            self._queue(self._replace_filter.set)  # after the changes queued before
        extras = nonces != self._filter_nonces or shut != self._filter_shut
        if (self._filter_generation != table.generation or self._replace_filter.is_set()):
            self._replace_filter.clear()
            self._filter_generation = table.generation
            tags = table.start_journal()
            whole = getattr(source, "replace_tags", None) or source.set_tags
            note: str = whole(tags, nonces, shut) if shut else whole(tags, nonces)
        else:
            added, removed = table.drain_changes()
            if not (added or removed or extras):
                return
            if getattr(source, "kernel_map", False):
                note = source.update_tags(added, removed, nonces, shut)
            elif self._filter_kind == "port-only" and not extras and len(table) > _classic_max():
                return  # too many tags for a classic filter, as last time: nothing to do
            else:
                tags = table.all_tags()
                note = (source.set_tags(tags, nonces, shut) if shut
                        else source.set_tags(tags, nonces))
            if not extras:
                if self._note_filter(note):  # a growth, or a fallback: said once
                    self.log(f"{self.config.mode} {note}")
                return
        self.log(f"{self.config.mode} {note}")
        self._filter_nonces = nonces
        self._filter_shut = shut
        self._note_filter(note)

    def _note_filter(self, note: str) -> bool:
        """Which kernel filter runs now, for `status` (written when it
        changes).  Whether it changed: its kind, or the eBPF map's room."""
        kind = getattr(self.source, "filter_kind", None)
        running = (str(kind()) if kind is not None
                   else "classic" if note.startswith("kernel filter on") else "port-only")
        room = int(getattr(self.source, "map_room", 0))
        grew, self._filter_room = room != self._filter_room, room
        if running == self._filter_kind:
            return grew
        self._filter_kind = running
        if self._facts:
            self._facts = {**self._facts, "filter": running}
            self.state.write_server(self._facts)
        return True

    def _shut_now(self, now: float) -> None:
        """Receive thread, in a flood (a batch mostly refused before any
        cryptography): a tag to shut that the filter does not shut yet is
        shut at once, not at the next housekeeping rounds (0.2-0.4 s of a
        flood at line rate lost knocks at every step boundary)."""
        if now - self._last_shut_now < SHUT_NOW_EVERY:
            return
        self._last_shut_now = now
        seen = read_shut(self.verifier.limiter, now, self._filter_shut)
        if seen.keys() <= self._filter_shut.keys():
            return
        self._shut_seen = (now, seen)
        self._update_kernel_filter(now)

    def _read_shut_tags(self) -> None:
        """Have the receive thread (it owns the limiter) read the shut tags
        for the next round."""
        if self._shut_queued:
            return
        self._shut_queued = True

        def read() -> None:
            self._shut_queued = False
            now = self.clock()
            self._shut_seen = (now, read_shut(self.verifier.limiter, now, self._filter_shut))

        self._queue(read)

    def _compact_replay(self, now: float) -> None:
        """Every COMPACT_EVERY seconds: the receive thread snapshots and rotates
        the journal (it owns the cache); this thread writes the snapshot."""
        if self.state.journal_error is not None:
            self.log(f"error replay journal: {self.state.journal_error} (the running server "
                     "still refuses replays; a restart now could forget recent ones)")
            self.state.journal_error = None
        pending = self._pending_snapshot
        if pending is not None:
            self._pending_snapshot = None
            self.state.finish_compaction(pending)
        elif now - self._last_compact >= COMPACT_EVERY:
            self._last_compact = now

            def snapshot() -> None:
                self._pending_snapshot = self.state.rotate_journal(self.verifier.replay)

            self._queue(snapshot)

    def _load_trust(self) -> list[TrustEntry]:
        """The sources clients authenticated from before the restart (a
        damaged file costs that shield, never the start)."""
        try:
            rows = self.state.load_trust()
        except LocalError as exc:
            self.log(f"warning {exc}; no source is trusted until its client knocks again")
            return []
        return [row for row in rows if row[0] in self.config.clients]

    def _save_trust(self, now: float) -> None:
        """At most every TRUST_SAVE_EVERY seconds, when trust changed: the
        receive thread snapshots the limiter (it owns it), the next round
        writes the snapshot."""
        pending = self._pending_trust
        if pending is not None:  # the snapshot ran: nothing else sets it now
            self._pending_trust = None
            self.state.save_trust(pending)
            return
        limiter = self.verifier.limiter
        if (limiter.trust_revision == self._trust_saved
                or now - self._last_trust_save < TRUST_SAVE_EVERY):
            return
        self._last_trust_save = now

        def snapshot() -> None:
            self._trust_saved = limiter.trust_revision
            self._pending_trust = limiter.dump_trust(self.clock())

        self._queue(snapshot)

    def _save(self, now: float) -> None:
        if self._otp_dirty:
            self._otp_dirty = False
            self.state.save_otp_steps(self.verifier.otp.last_steps)
        if self._activated_dirty:
            self._activated_dirty = False
            self.state.save_activated(dict(self._activated))
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            leases = self.leases
            self.state.save_leases(leases, now=now, backend=self.backend.name,
                                   expires_by_itself=self.backend.expires_by_itself)

    def _maybe_reload(self) -> None:
        stamp = self._config_stamp()
        if stamp == self._stamp and not self._reload_requested.is_set():
            return
        self._reload_requested.clear()
        self._stamp = stamp
        try:
            new = self._read_config()
            refuse_own_hosts(new.services, new.path)
        except LocalError as exc:
            self.log(f"error reload failed, keeping the running config: {exc}")
            return
        self._switch_to(new)

    def _load_clients(self) -> None:
        """At start: every client from the store (a server.toml not yet
        migrated adds its own, the store's entry winning), and the store's
        version they reflect.  Raises LocalError."""
        self._store = ClientStore.open(self.state.files, create=True)
        self._store_seq = self._store.version()  # before reading: a change meanwhile is re-read
        clients = dict(self.config.clients)
        for entry in self._store.all():
            clients[entry.name] = entry
            self.clients_read += 1
        self.config = replace(self.config, clients=clients)

    def _poll_store(self) -> None:
        """Housekeeping: one cheap query; when the store changed, read and
        apply only the clients that changed."""
        store = self._store
        if store is None or store.version() == self._store_seq:
            return
        self._store_seq, names = store.changed_since(self._store_seq)
        clients = self.config.clients
        assert isinstance(clients, dict)
        now = self.clock()
        before = {name: clients.get(name) for name in names}
        for name in names:
            entry = store.get(name)
            self.clients_read += 1
            if entry is None:
                clients.pop(name, None)
            else:
                clients[name] = entry
        self._apply_clients(before, now)

    def _apply_clients(self, before: dict[str, ClientEntry | None], now: float) -> None:
        """Re-key, re-rule and close for the clients in `before` (name -> the
        entry the server ran with), from what self.config.clients holds now."""
        clients = self.config.clients
        changed: dict[str, bytes] = {}
        gone: list[str] = []
        closed: list[str] = []
        revoked: list[str] = []
        for name, was in before.items():
            entry = clients.get(name)
            old_keys, new_keys = _keys_of(was, now), _keys_of(entry, now)
            gone += [key for key in old_keys if key not in new_keys]
            changed.update({k: v for k, v in new_keys.items() if old_keys.get(k) != v})
            self._grace.pop(name + OLD_KEY, None)
            if entry is not None and entry.old_secret and entry.old_until:
                until = parse_utc(entry.old_until)
                if until > now:
                    self._grace[name + OLD_KEY] = until
            if entry is not None and entry.close_leases and not (
                    was is not None and was.close_leases):
                closed.append(name)
            elif entry is not None and entry.revoked and not (was is not None and was.revoked):
                revoked.append(name)
        rules = {name: config_mod.client_policy(clients[name]) if name in clients else None
                 for name in before}
        otp = {name: clients[name].otp_secret if name in clients else "" for name in before}
        met = {name for name in before if name in clients and clients[name].enroll_by
               and self._activated.get(name) == clients[name].enroll_by}
        pending = {name for name in before if name in clients and clients[name].enroll_by
                   and name not in met}
        self.apply_client_delta(ClientDelta(
            tuple(before), tuple(gone), changed, {}, rules, otp, frozenset(met),
            frozenset(pending), tuple(closed), tuple(revoked)), "the store")

    def apply_client_delta(self, delta: ClientDelta, origin: str) -> None:
        """Switch clients as `delta` says, on the receive thread (the client
        store's changes and a group's, spa.group.delta), then their tags into
        the kernel filter; `origin` names where the change came from."""
        def switch() -> None:
            """On the receive thread: single entries swapped in the rules it
            reads (Policy stays a value; its clients mapping is the daemon's)."""
            later = len(delta.keys) > WARM_LATER_KEYS  # a member's first read
            switch_verifier(self.verifier, delta, later=later)
            if later:  # their other live steps go in within WARM_ROUNDS rounds
                self._warm_slice = max(self._warm_slice,
                                       _warm_slice(self.verifier.tags.warming()))
            for names, now_in in ((self._met, delta.met), (self._pending, delta.pending)):
                names.difference_update(delta.names)
                names.update(now_in)
            for name in delta.closed:  # said once the rules refuse its knocks
                self._close_revoked(name)
            for name in delta.revoked:
                held_leases = [lease for lease in self.leases.leases() if lease.client == name]
                self.log(f"revoked client={name} leases={len(held_leases)} "
                         "(knocks refused from now on; its leases run out by themselves)")
            # the changed clients' tags into the kernel filter now (the table's
            # journal: a delta, never the whole map), then the line that says
            # the server knows them: a knock after it is not dropped in the kernel
            self._update_kernel_filter(self.clock())
            _settle()
            self.log(f"reloaded clients={len(self.verifier.policy.clients)} "
                     f"changed={len(delta.names)} (from {origin}) keys added={delta.added} "
                     f"removed={len(delta.gone)}")

        self._make_filter_room(delta.added)
        self._queue(switch)

    def _make_filter_room(self, keys: int) -> None:
        """Before new keys' tags go to the receive thread: an eBPF tag map
        without room for them grows here, outside it (after the drop, with
        the gate keeper's maps), so the delta it gives the kernel fits."""
        make_room = getattr(self.source, "make_room", None)
        if make_room is None or not keys:
            return
        with self._filter_lock:
            note: str = make_room(keys * (2 * self.verifier.tags.skew + 3))  # tags a key may have
            if note:
                self.log(f"{self.config.mode} {note}")
                self._note_filter(note)

    def _close_revoked(self, name: str) -> None:
        """A revoke --close ends the client's leases now, and says so."""
        now = self.clock()
        with self._lock:
            closing = self.leases.close_client(name, now=now)
            self._dirty = True
            try:
                self._apply(closing, now)
            except LocalError as exc:  # the next housekeeping reconciles
                self.log(f"error firewall: {exc}")
                self._retry_reconcile = True
        self.log(f"revoked client={name} leases closed (knocks refused from now on)")

    def _switch_to(self, new: ServerConfig) -> None:
        """A new reading of the config file: settings and services.  The
        clients come from the store (`_poll_store`; those the file still
        lists before its migration are kept as they run), so their keys,
        codes and grace are as they were: no pass over every client here,
        and the receive thread's switch swaps the services alone."""
        new = replace(new, clients=self.config.clients)
        old = self.config
        fixed = _fixed_settings(new)
        if fixed != self._file_fixed:
            self.log("warning server_id, listen_port, backend, mode, window and instance "
                     "changes take effect at the next restart")
            self._file_fixed = fixed  # said once per change, not at every reload
        rules = dict(new.services)

        def switch() -> None:
            self.verifier.policy = replace(self.verifier.policy, services=rules)

        services = dict(new.services)
        for name in old.services.keys() - services.keys():
            services[name] = old.services[name]  # keep removing what is open
        if services != dict(old.services):
            try:
                with self._lock:  # the backend keeps its grants; the rules follow
                    self.backend.start(services, now=self.clock())
            except LocalError as exc:  # e.g. a port another instance gates: nothing changed
                self.log(f"error reload refused, keeping the running services: {exc}")
                return
            self.log(f"firewall rules updated for services: {', '.join(sorted(services))}")
            try:
                self._gate_named(new.services)
            except LocalError as exc:
                self.log(f"error firewall: {exc}")
        self.config = replace(new, services=services, server_id=old.server_id,
                              listen_port=old.listen_port, backend=old.backend,
                              mode=old.mode, state_dir=old.state_dir, window=old.window,
                              instance=old.instance)
        self._ports = {}  # a service's port may have changed
        self._queue(switch)
        self._update_kernel_filter(self.clock(), force=True)
        self.log(f"reloaded clients={len(new.clients)} (settings and services)")
        if services != dict(old.services):
            self.log(self._gate_line(services))
            self._check_host(self.clock(), force=True)


class _AnyName:
    """Every client name (a member restores its leases of the group's clients,
    whom its own store does not know: spa.core.leases.restore_saved)."""

    def __contains__(self, name: object) -> bool:
        return True


def _warm_slice(warming: int) -> int:
    """Clients' worth of a start's warm-up a housekeeping round: all of it
    within WARM_ROUNDS rounds, and at least WARM_MIN_SLICE a round."""
    return max(-(-warming // WARM_ROUNDS), WARM_MIN_SLICE)


def _percentiles(samples: list[tuple[float, int]]) -> str:
    """p99 and p99.9 of a step's batches (ms, datagrams): the benchmark's
    gauge beside the max, which one hiccup of a shared machine sets."""
    if not samples:
        return "no batch"
    ms = sorted(pause * 1000 for pause, _ in samples)
    sizes = sorted(size for _, size in samples)
    at = {q: min(len(ms) - 1, int(len(ms) * q)) for q in (0.99, 0.999)}
    return (f"batches={len(ms)} p99 {ms[at[0.99]]:.2f} ms backlog {sizes[at[0.99]]}, "
            f"p99.9 {ms[at[0.999]]:.2f} ms backlog {sizes[at[0.999]]}")


def _settle() -> None:
    """The objects made so far (every client's entry, rules and keys: 10^5
    clients are ~400,000 objects the cyclic GC tracks) move out of its
    reach: a full collection over them held the GIL 114 ms, a pause of the
    receive thread at any step.  They are still freed when unreferenced;
    only a cycle among them would stay."""
    gc.freeze()


def _classic_max() -> int:
    """How many tags a classic socket filter holds (spa.server.capture)."""
    from spa.server.capture import max_tags

    return max_tags()


def _keys_of(entry: ClientEntry | None, now: float) -> dict[str, bytes]:
    """key name -> secret for one client (NAME, and NAME~old in its grace);
    none for a compat client (its keys are the compat listener's)."""
    if entry is None or entry.kind != KIND_SPA:
        return {}
    keys = {entry.name: entry.secret}
    if entry.old_secret and entry.old_until and parse_utc(entry.old_until) > now:
        keys[entry.name + OLD_KEY] = entry.old_secret
    return keys


def _config_reader(path: Path, backend: object
                   ) -> tuple[Callable[[], object], Callable[[], ServerConfig]]:
    """(the config file's version, a fresh reading): through the gate keeper
    when it holds the firewall (it reads the config; the daemon, running as
    the state directory's user, may not), else from the file."""
    stamp = getattr(backend, "config_stamp", None)
    text = getattr(backend, "config_text", None)
    if stamp is not None and text is not None:
        return stamp, lambda: config_mod.parse(path, text().encode())
    return lambda: FileStamp.of(path), lambda: config_mod.load(path)


def _fixed_settings(config: ServerConfig) -> tuple[object, ...]:
    """The settings a reload cannot change (they need a restart)."""
    return (config.server_id, config.listen_port, config.backend, config.mode, config.window,
            config.instance)
