"""A member's claims on the nonces of the packets it accepted, and the leases
it grants on them, shared through etcd.

Invariants (docs/groups.md, "Claims", "When etcd cannot be reached",
"Shared leases"):
- Only a packet that passed every local check reaches here (the verifier
  accepted it, the route back matched): junk, unknown tags and bad MACs
  never cost a round trip to etcd.
- A claim is a create-if-absent of claims/<client>/<nonce-hex> attached to
  an etcd lease that outlives the packet's window (claim_until), shared with
  the other claims ending in the same second (spa.group.leasepool).  Only a
  claim that created the key grants; one that found it refuses `replay`;
  one with no answer is decided by on_store_down (spa.group.policy):
  `group_unreachable` by default, or a grant counted and logged as
  unclaimed (local_only).  A claim etcd refuses (its RBAC: the member may
  not write claims/) is never a grant.
- A packet that used up an authenticator code claims the code's time step
  too, once its nonce is claimed (spa.group.otpclaim), in round trips of its
  own after its batch's transaction: a step another member used is refused
  `otp_reused`.  Its lease record is written after that, on its own (it must
  not exist for a knock the step refuses).
- Group commit: the receive thread only queues accepted packets; up to
  `threads` claim threads (`executor`) each take whatever is queued, at most
  BATCH_MAX packets, and claim them in one transaction (kv.create_many).  A
  packet that finds the queue empty goes alone at once: nothing waits for a
  batch to fill.  A transaction that finds some keys taken changes nothing;
  those packets are replays, and the rest go again without them (each round
  takes at least one out, so it ends).  A slow or unreachable etcd delays
  the knocks being claimed, by at most the store's deadline per round, and
  never the packets of other clients behind them on the receive thread.
- A grant's lease is shared in the same transaction: its claim's success
  branch writes leases/<client>/<address>/<service> (an etcd lease that ends
  at the lease's end, from the same pool) or deletes it (a close), so the key
  exists exactly when the claim was made, and every member can install it.
  If that transaction is refused for any reason but an outage (etcd's RBAC
  on leases/, a lease etcd lost twice), the claims go again alone and each
  grant's lease is written on its own afterwards: a write that fails then
  costs the other members that lease, never this grant (logged and counted).
- The grant here and the shared record end at the same moment (one `now`
  per batch), and a batch's grants reach the daemon in one call (one
  firewall commit).  A pending client's first grant writes activated/<client>.
- Leases ahead: once a batch's knocks are granted, the claim thread asks
  etcd now for the next second's shared leases of the ends the batch used
  (the pool's rule, so every key still ends as the pool promises), so the
  knocks of the next second find their leases in the pool instead of
  waiting for a grant on their path.  Only after a claim etcd answered
  (never against an unreachable etcd); a grant that fails here is
  forgotten (the next knock asks for it on its path, as before).  At most
  one lease a second more than needed per end a member serves, and only
  while knocks arrive.
- With `times` on (the daemon's SPA_LOG_CLAIM_TIMES, for benchmarks), each
  batch logs where its time went: queued until a claim thread took it,
  etcd lease grants, the transaction(s), the grant's firewall commit
  (benchmarks/group_knock.py reads these lines).  Nothing else changes.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from spa.core.verify import Accepted
from spa.core.wire import Action
from spa.group import layout
from spa.group.kv import (
    KV,
    MAX_TXN_OPS,
    Delete,
    LeaseExpiredError,
    Put,
    StoreError,
    StoreUnavailableError,
)
from spa.group.leasepool import LeasePool
from spa.group.member import MemberHooks
from spa.group.otpclaim import claim_step
from spa.group.policy import ClaimResult, OnStoreDown, Verdict, decide, decide_otp
from spa.group.records import (
    Activation,
    Claim,
    LeaseRecord,
    claim_until,
    encode_activation,
    encode_claim,
    encode_lease,
)

CLAIM_THREADS = 4  # transactions in flight at once (each waits at most the store's deadline)
# packets in one transaction: each is a compare and up to two writes (its
# claim, its lease record), and etcd takes at most MAX_TXN_OPS of either
BATCH_MAX = MAX_TXN_OPS // 2
TIMES_VARIABLE = "SPA_LOG_CLAIM_TIMES"  # set: log each claim batch's times (benchmarks)


def times_wanted() -> bool:
    """Whether the daemon's environment asks for the claim times' log lines."""
    return bool(os.environ.get(TIMES_VARIABLE))


class Executor(Protocol):
    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object: ...


class Inline:
    """Runs each claim at once, on the caller's thread (tests, benchmarks)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object:
        return fn(*args)


@dataclass(slots=True)
class _Knock:
    """One accepted packet on its way through a batch."""

    result: Accepted
    claim: Put  # its claim key and value (lease 0 until a round picks one)
    claim_end: float  # the claim must live until then (monotonic seconds)
    share_key: bytes  # leases/<client>/<address>/<service>
    record: LeaseRecord | None  # an open's lease (None: a close deletes the key)
    outcome: ClaimResult | None = None
    shared: bool = False  # its lease write went in the claim's transaction


@dataclass(slots=True)
class _Times:
    """Where a batch's time went (perf_counter seconds), for the times log."""

    leases: float = 0.0  # etcd lease grants (the pool's misses)
    grants: int = 0
    txn: float = 0.0  # create_many calls
    rounds: int = 0


class Claimer:
    """Claims, decides, grants or refuses, and shares the grant's lease."""

    def __init__(self, kv: KV, *, group: str, member: str, window: float,
                 on_store_down: OnStoreDown, hooks: MemberHooks,
                 clock: Callable[[], float], log: Callable[[str], None],
                 executor: Executor | None = None,
                 pending: Callable[[str], int | None] = lambda client: None,
                 covers: Callable[[str], bool] = lambda client: True,
                 threads: int = CLAIM_THREADS, batch_max: int = BATCH_MAX,
                 monotonic: Callable[[], float] = time.monotonic,
                 times: bool = False, ahead: bool = True) -> None:
        """`pending`: the enroll_by of a client not yet activated (None:
        not pending); its first grant writes activated/<client>.  `covers`:
        whether a client is the group's (the server's own are not claimed).
        `threads`: claim transactions in flight at once; `monotonic`: the
        clock the shared etcd leases are timed by (a wall clock's step must
        not end a claim early).  `times`: log each batch's times; `ahead`:
        the next second's leases granted after a batch (see the module's
        invariants)."""
        if not 1 <= batch_max <= BATCH_MAX or threads < 1:
            raise ValueError(f"a claim batch holds 1 to {BATCH_MAX} packets, on 1 thread or more")
        self.kv = kv
        self.pending = pending
        self.covers = covers
        self.group = layout.check_group(group)
        self.member = layout.check_member(member)
        self.window = window
        self.on_store_down = on_store_down
        self.hooks = hooks
        self.clock = clock
        self.monotonic = monotonic
        self.log = log
        self.threads = threads
        self.batch_max = batch_max
        if executor is None:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(threads, thread_name_prefix="spa-claim")
        self.executor = executor
        self.pool = LeasePool()
        self.times = times
        self.ahead = ahead
        self._lock = threading.Lock()
        # accepted packets with their nonces and when they were queued (perf_counter)
        self._queue: collections.deque[tuple[Accepted, bytes, float]] = collections.deque()
        self._drains = 0  # claim threads started and not yet gone idle
        self.store_down = False
        self.counts = {"claimed": 0, "replay": 0, "unreachable": 0, "unclaimed_grants": 0,
                       "otp_reused": 0, "leases_shared": 0, "leases_not_shared": 0}
        self.batches = 0  # transactions of claims sent (figures, tests)

    def submit(self, accepted: list[Accepted], nonces: list[bytes]) -> list[Accepted]:
        """Receive thread: queue the batch's accepted packets (with their
        nonces) of the group's clients, to be claimed and settled on the
        claim threads.  Returns the others (the server's own clients: granted
        as on a standalone server, etcd or not)."""
        own: list[Accepted] = []
        mine: list[tuple[Accepted, bytes, float]] = []
        queued = time.perf_counter()
        for result, nonce in zip(accepted, nonces, strict=True):
            if self.covers(result.client):
                mine.append((result, nonce, queued))
            else:
                own.append(result)
        if mine:
            with self._lock:
                self._queue.extend(mine)
                start = self._drains < self.threads
                self._drains += start
            if start:
                self.executor.submit(self._drain)
        return own

    def _drain(self) -> None:
        """A claim thread: settle what is queued, a batch at a time, until
        the queue is empty (a packet queued meanwhile is taken here or by a
        thread started for it)."""
        while True:
            with self._lock:
                if not self._queue:
                    self._drains -= 1
                    return
                taken = [self._queue.popleft()
                         for _ in range(min(self.batch_max, len(self._queue)))]
            self._settle_logged([(result, nonce) for result, nonce, _ in taken],
                                min(queued for _, _, queued in taken))

    def _settle_logged(self, batch: list[tuple[Accepted, bytes]], queued: float) -> None:
        """settle_batch, on a claim thread: what goes wrong is said."""
        try:
            self.settle_batch(batch, queued=queued)
        except Exception as exc:  # the knocks are lost, the member goes on
            clients = ",".join(sorted({result.client for result, _ in batch}))
            self.log(f"error group {self.group}: the knocks of client={clients} were "
                     f"not settled: {type(exc).__name__}: {exc}")

    def settle_batch(self, batch: Sequence[tuple[Accepted, bytes]], *,
                     queued: float | None = None) -> list[Verdict]:
        """Claim the packets in one transaction (more rounds if some are
        replays), then refuse each refused one, grant the granted ones in
        one call (hooks.grant_claimed), then share and activate; the verdicts
        (a knock whose settling raised is logged, and left out).  `queued`:
        when the oldest was queued (perf_counter), for the times log."""
        started = time.perf_counter()
        times = _Times()
        now, mono = self.clock(), self.monotonic()
        knocks = []
        for result, nonce in batch:
            try:
                knocks.append(self._knock(result, nonce, now, mono))
            except ValueError as exc:  # this knock alone is lost, never its batch
                self._lost(result, exc)
        refused_by_rbac = False
        try:
            self._claim_all(knocks, now, mono, times)
        except StoreUnavailableError as exc:  # no answer: on_store_down decides
            self._store_is(down=True, why=exc)
        except StoreError as exc:  # etcd answered no: never a grant, whatever on_store_down says
            self._store_is(down=True, why=exc)
            refused_by_rbac = True
        else:
            self._store_is(down=False)
        later = self.clock()
        decided: list[tuple[_Knock, Verdict]] = []
        for knock in knocks:
            outcome = knock.outcome
            if outcome is None:
                verdict = (Verdict.REFUSE_UNREACHABLE if refused_by_rbac
                           else decide(ClaimResult.UNREACHABLE, self.on_store_down))
            else:
                verdict = decide(outcome, self.on_store_down)
            try:
                decided.append((knock, self._refuse_or_pass(knock,
                                                            self._with_otp(knock, verdict),
                                                            later)))
            except Exception as exc:  # one knock's refusal failed: the others go on
                self._lost(knock.result, exc)
        granted = [(knock, verdict) for knock, verdict in decided if verdict.granted]
        decided_at = time.perf_counter()
        if granted:
            try:  # the batch's grants in one call: one firewall commit for them all
                self.hooks.grant_claimed([knock.result for knock, _ in granted], now)
            except Exception as exc:
                for knock, _ in granted:
                    self._lost(knock.result, exc)
                return [verdict for _, verdict in decided if not verdict.granted]
        if self.times:
            self._say_times(len(knocks), len(granted), queued, started, times, decided_at)
        for knock, verdict in granted:
            if verdict is Verdict.GRANT:
                if knock.shared:
                    self._bump("leases_shared")
                else:
                    self.share(knock.result, now)
                self._activate(knock.result.client)
        if self.ahead:
            self._lease_ahead(knocks, now, mono)
        return [verdict for _, verdict in decided]

    def _lease_ahead(self, knocks: list[_Knock], now: float, mono: float) -> None:
        """The next second's leases of the ends this batch's claims (and lease
        records) used, granted now, off the path of knocks granted already."""
        seconds = set()
        for knock in knocks:
            if knock.outcome is not ClaimResult.CREATED:
                continue
            seconds.add(math.ceil(knock.claim_end) + 1)
            if knock.shared and knock.record is not None:
                seconds.add(math.ceil(mono + (knock.record.until - now)) + 1)
        for second in sorted(seconds):
            try:
                self.pool.lease(second, self.monotonic(), self.kv.grant)
            except (StoreError, ValueError):
                return  # asked for on the path of the knock that needs it, as before

    def _say_times(self, knocks: int, granted: int, queued: float | None, started: float,
                   times: _Times, decided_at: float) -> None:
        done = time.perf_counter()
        waited = 0.0 if queued is None else started - queued
        rest = decided_at - started - times.leases - times.txn
        self.log(f"claim times knocks={knocks} granted={granted} queued_ms={waited * 1000:.3f} "
                 f"leases_ms={times.leases * 1000:.3f} lease_grants={times.grants} "
                 f"txn_ms={times.txn * 1000:.3f} rounds={times.rounds} "
                 f"other_ms={rest * 1000:.3f} grant_ms={(done - decided_at) * 1000:.3f} "
                 f"total_ms={(done - (started if queued is None else queued)) * 1000:.3f}")

    def _lost(self, result: Accepted, exc: Exception) -> None:
        self.log(f"error group {self.group}: the knock of client={result.client} was not "
                 f"settled: {type(exc).__name__}: {exc}")

    def _with_otp(self, knock: _Knock, verdict: Verdict) -> Verdict:
        """A granted knock that used up an authenticator code: its step's claim decides."""
        step = knock.result.otp_step
        if verdict is not Verdict.GRANT or step is None:
            return verdict
        try:
            return decide_otp(self.claim_otp(knock.result.client, step, self.clock()),
                              self.on_store_down)
        except StoreError:  # etcd answered no (not an outage): no grant, ever
            return Verdict.REFUSE_UNREACHABLE

    def claim_otp(self, client: str, step: int, now: float) -> ClaimResult:
        """Use up an authenticator code's step at every member (spa.group.otpclaim).
        Raises StoreError but StoreUnavailableError: etcd answered no (its RBAC,
        a refused login), which no on_store_down turns into a grant."""
        try:
            created = claim_step(self.kv, self.group, client, step, self.member, now)
        except StoreUnavailableError as exc:  # no answer: on_store_down decides
            self._store_is(down=True, why=exc)
            return ClaimResult.UNREACHABLE
        except StoreError as exc:
            self._store_is(down=True, why=exc)
            raise
        return ClaimResult.CREATED if created else ClaimResult.EXISTS

    def _knock(self, result: Accepted, nonce: bytes, now: float, mono: float) -> _Knock:
        key = layout.claim_key(self.group, result.client, nonce).encode()
        until = claim_until(result.request.timestamp_ms / 1000, self.window)
        decision = result.decision
        record = None
        if result.request.action is Action.OPEN:
            record = LeaseRecord(result.client, decision.address, decision.service.name,
                                 decision.service.protocol, decision.service.port,
                                 now + decision.duration, self.member)
        share_key = layout.lease_key(self.group, result.client, decision.address,
                                     decision.service.name).encode()
        return _Knock(result, Put(key, encode_claim(Claim(self.member, now))),
                      mono + (until - now), share_key, record)

    # -- the transactions ----------------------------------------------------

    def _claim_all(self, knocks: list[_Knock], now: float, mono: float,
                   times: _Times) -> None:
        """Set each knock's outcome: CREATED (and shared, if its lease went
        in the same transaction) or EXISTS.  Raises StoreError with the
        knocks it could not decide left at None."""
        pending, seen = [], set()
        for knock in knocks:
            if knock.claim.key in seen:  # a copy in the same batch: the first one claims
                knock.outcome = ClaimResult.EXISTS
            else:
                seen.add(knock.claim.key)
                pending.append(knock)
        try:
            self._commit(pending, now, mono, times, shares=True)
        except StoreUnavailableError:
            raise
        except StoreError as exc:  # perhaps the lease writes': the claims alone
            self.log(f"warning group {self.group}: claims with their leases were refused "
                     f"({exc}); claiming them alone, the leases written after")
            self._commit([k for k in pending if k.outcome is None], now, mono, times,
                         shares=False)

    def _commit(self, pending: list[_Knock], now: float, mono: float, times: _Times, *,
                shares: bool) -> None:
        """Rounds of one transaction each, until every pending knock's claim
        is made or found taken.  One lease etcd has lost is granted anew once."""
        renewed = False
        while pending:
            before = self.pool.granted
            begun = time.perf_counter()
            creates, writes, used = self._ops(pending, now, mono, shares=shares)
            sent = time.perf_counter()
            times.leases += sent - begun
            times.grants += self.pool.granted - before
            try:
                found = self.kv.create_many(creates, writes)
            except LeaseExpiredError:
                if renewed:
                    raise
                renewed = True
                for lease in used:
                    self.pool.drop(lease)
                continue
            finally:
                self._bump_batches()
                times.txn += time.perf_counter() - sent
                times.rounds += 1
            if not found:
                for knock in pending:
                    knock.outcome = ClaimResult.CREATED
                    knock.shared = shares and knock.result.otp_step is None
                return
            left = [k for k in pending if k.claim.key not in found]
            if len(left) == len(pending):
                raise StoreError("etcd named keys taken that were not in the transaction")
            for knock in pending:
                if knock.claim.key in found:
                    knock.outcome = ClaimResult.EXISTS
            pending = left

    def _ops(self, pending: list[_Knock], now: float, mono: float, *,
             shares: bool) -> tuple[list[Put], list[Put | Delete], set[int]]:
        """A round's claims and lease writes (a lease key written by two knocks
        of the batch: the later one's write, as if one after the other)."""
        used: set[int] = set()
        creates = []
        for knock in pending:
            lease = self.pool.lease(knock.claim_end, mono, self.kv.grant)
            used.add(lease)
            creates.append(Put(knock.claim.key, knock.claim.value, lease))
        writes: dict[bytes, Put | Delete] = {}
        for knock in pending if shares else ():
            if knock.result.otp_step is not None:  # written once its step is claimed
                continue
            writes.pop(knock.share_key, None)
            if knock.record is None:
                writes[knock.share_key] = Delete(knock.share_key)
                continue
            lease = self.pool.lease(mono + (knock.record.until - now), mono, self.kv.grant)
            used.add(lease)
            writes[knock.share_key] = Put(knock.share_key, encode_lease(knock.record), lease)
        return creates, list(writes.values()), used

    # -- the verdicts --------------------------------------------------------

    def _refuse_or_pass(self, knock: _Knock, verdict: Verdict, later: float) -> Verdict:
        """Count the verdict; refuse (event, log) a refused knock; say a grant
        without a claim."""
        result = knock.result
        self._count(verdict)
        if not verdict.granted:
            assert verdict.reason is not None
            self.hooks.refuse_claimed(result, verdict.reason, later)
        elif verdict is Verdict.GRANT_UNCLAIMED:
            self.log(f"warning group {self.group}: granted client={result.client} without a "
                     "claim (etcd unreachable; on_store_down = local_only)")
        return verdict

    def _activate(self, client: str) -> None:
        """A pending client's first claimed knock, in time: every member
        takes it as enrolled for good (activated/<client>, by the watch)."""
        enroll_by = self.pending(client)
        if enroll_by is None:
            return
        try:
            self.kv.put(layout.activated_key(self.group, client).encode(),
                        encode_activation(Activation(client, enroll_by)))
        except StoreError as exc:
            self.log(f"error group {self.group}: the activation of client={client} was not "
                     f"written (its next knock writes it): {exc}")
            return
        self.log(f"activated client={client} (its pending enrollment was used in time, "
                 f"at every member of group {self.group})")

    def share(self, result: Accepted, now: float) -> None:
        """Write (open) or delete (close) the grant's lease key for the others,
        on its own (when it could not go with the claim)."""
        decision = result.decision
        key = layout.lease_key(self.group, result.client, decision.address,
                               decision.service.name).encode()
        try:
            if result.request.action is Action.OPEN:
                record = LeaseRecord(result.client, decision.address, decision.service.name,
                                     decision.service.protocol, decision.service.port,
                                     now + decision.duration, self.member)
                mono = self.monotonic()
                lease = self.pool.lease(mono + (record.until - now), mono, self.kv.grant)
                try:
                    self.kv.put(key, encode_lease(record), lease)
                except LeaseExpiredError:
                    self.pool.drop(lease)
                    raise
            else:
                self.kv.delete(key)
        except StoreError as exc:
            self._bump("leases_not_shared")
            self.log(f"error group {self.group}: the lease of client={result.client} was not "
                     f"shared with the other members: {exc}")
            return
        self._bump("leases_shared")

    def close(self) -> None:
        shutdown = getattr(self.executor, "shutdown", None)
        if shutdown is not None:
            shutdown(wait=True, cancel_futures=False)

    def _count(self, verdict: Verdict) -> None:
        self._bump({Verdict.GRANT: "claimed", Verdict.REFUSE_REPLAY: "replay",
                    Verdict.REFUSE_UNREACHABLE: "unreachable",
                    Verdict.GRANT_UNCLAIMED: "unclaimed_grants",
                    Verdict.REFUSE_OTP_REUSED: "otp_reused"}[verdict])

    def _bump(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def _bump_batches(self) -> None:
        with self._lock:
            self.batches += 1

    def _store_is(self, *, down: bool, why: Exception | None = None) -> None:
        """Say when etcd stops and starts answering claims (once each way)."""
        with self._lock:
            changed, self.store_down = self.store_down != down, down
        if not changed:
            return
        if down:
            kind = "unreachable" if isinstance(why, StoreUnavailableError) else "refused"
            self.log(f"error group {self.group}: etcd {kind} for claims: {why}; new grants "
                     + ("are refused (on_store_down = fail_closed)"
                        if self.on_store_down is OnStoreDown.FAIL_CLOSED
                        else "go on the local replay cache alone (on_store_down = local_only)"))
        else:
            self.log(f"group {self.group}: etcd answers claims again")
