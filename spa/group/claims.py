"""A member's claims on the nonces of the packets it accepted, and the leases
it grants on them, shared through etcd.

Invariants (docs/groups.md, "Claims", "When etcd cannot be reached",
"Shared leases"):
- Only a packet that passed every local check reaches here (the verifier
  accepted it, the route back matched): junk, unknown tags and bad MACs
  never cost a round trip to etcd.
- A claim is one create-if-absent of claims/<client>/<nonce-hex> attached to
  an etcd lease of claim_ttl seconds.  Only a claim that created the key
  grants; one that found it refuses `replay`; one with no answer is decided
  by on_store_down (spa.group.policy): `group_unreachable` by default, or a
  grant counted and logged as unclaimed (local_only).  A claim etcd
  refuses (its RBAC: the member may not write claims/) is never a grant.
- A packet that used up an authenticator code claims the code's time step
  too, once its nonce is claimed (spa.group.otpclaim): a step another member
  used is refused `otp_reused`.
- Claims run on a pool of threads (`executor`), never on the receive thread:
  a slow or unreachable etcd delays the knocks being claimed, by at most the
  store's deadline, and never the packets of other clients behind them.
- A grant writes leases/<client>/<address>/<service> with an etcd lease that
  ends at the lease's end (lease_ttl), so every member can install it; a
  close deletes it.  A write that fails costs the other members that lease,
  never this grant (logged and counted).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from spa.core.verify import Accepted
from spa.core.wire import Action
from spa.group import layout
from spa.group.kv import KV, StoreError, StorePermissionError, StoreUnavailableError
from spa.group.member import MemberHooks
from spa.group.otpclaim import claim_step
from spa.group.policy import ClaimResult, OnStoreDown, Verdict, decide, decide_otp
from spa.group.records import (
    Activation,
    Claim,
    LeaseRecord,
    claim_ttl,
    encode_activation,
    encode_claim,
    encode_lease,
)

CLAIM_THREADS = 4  # claims in flight at once (each waits at most the store's deadline)


class Executor(Protocol):
    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object: ...


class Inline:
    """Runs each claim at once, on the caller's thread (tests, benchmarks)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> object:
        return fn(*args)


class Claimer:
    """Claims, decides, grants or refuses, and shares the grant's lease."""

    def __init__(self, kv: KV, *, group: str, member: str, window: float,
                 on_store_down: OnStoreDown, hooks: MemberHooks,
                 clock: Callable[[], float], log: Callable[[str], None],
                 executor: Executor | None = None,
                 pending: Callable[[str], int | None] = lambda client: None,
                 covers: Callable[[str], bool] = lambda client: True) -> None:
        """`pending`: the enroll_by of a client not yet activated (None:
        not pending); its first grant writes activated/<client>.  `covers`:
        whether a client is the group's (the server's own are not claimed)."""
        self.kv = kv
        self.pending = pending
        self.covers = covers
        self.group = layout.check_group(group)
        self.member = layout.check_member(member)
        self.window = window
        self.on_store_down = on_store_down
        self.hooks = hooks
        self.clock = clock
        self.log = log
        if executor is None:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(CLAIM_THREADS, thread_name_prefix="spa-claim")
        self.executor = executor
        self._lock = threading.Lock()
        self.store_down = False
        self.counts = {"claimed": 0, "replay": 0, "unreachable": 0, "unclaimed_grants": 0,
                       "otp_reused": 0, "leases_shared": 0, "leases_not_shared": 0}

    def submit(self, accepted: list[Accepted], nonces: list[bytes]) -> list[Accepted]:
        """Receive thread: hand over the batch's accepted packets (with their
        nonces); each of the group's clients' is claimed and settled on the
        pool.  Returns the others (the server's own clients: granted as on
        a standalone server, etcd or not)."""
        own: list[Accepted] = []
        for result, nonce in zip(accepted, nonces, strict=True):
            if self.covers(result.client):
                self.executor.submit(self._settle_logged, result, nonce)
            else:
                own.append(result)
        return own

    def _settle_logged(self, result: Accepted, nonce: bytes) -> None:
        """settle, on the pool: what goes wrong is said (a pool keeps it quiet)."""
        try:
            self.settle(result, nonce)
        except Exception as exc:  # the knock is lost, the member goes on
            self.log(f"error group {self.group}: the knock of client={result.client} was "
                     f"not settled: {type(exc).__name__}: {exc}")

    def claim(self, client: str, nonce: bytes, sent: float, now: float) -> ClaimResult:
        """Create the claim key if absent, attached to a lease of claim_ttl.
        Raises StorePermissionError: etcd answered no (its RBAC), which no
        on_store_down turns into a grant."""
        key = layout.claim_key(self.group, client, nonce).encode()
        try:
            lease = self.kv.grant(claim_ttl(sent, now, self.window))
            created = self.kv.create(key, encode_claim(Claim(self.member, now)), lease)
        except StorePermissionError as exc:
            self._store_is(down=True, why=exc)
            raise
        except StoreError as exc:
            self._store_is(down=True, why=exc)
            return ClaimResult.UNREACHABLE
        self._store_is(down=False)
        return ClaimResult.CREATED if created else ClaimResult.EXISTS

    def claim_otp(self, client: str, step: int, now: float) -> ClaimResult:
        """Use up an authenticator code's step at every member (spa.group.otpclaim);
        raises StorePermissionError as `claim` does."""
        try:
            created = claim_step(self.kv, self.group, client, step, self.member, now)
        except StorePermissionError as exc:
            self._store_is(down=True, why=exc)
            raise
        except StoreError as exc:
            self._store_is(down=True, why=exc)
            return ClaimResult.UNREACHABLE
        return ClaimResult.CREATED if created else ClaimResult.EXISTS

    def settle(self, result: Accepted, nonce: bytes) -> Verdict:
        """Claim one accepted packet (and its authenticator code's step), then
        grant or refuse it as the verdict says."""
        sent = result.request.timestamp_ms / 1000
        try:
            verdict = decide(self.claim(result.client, nonce, sent, self.clock()),
                             self.on_store_down)
            if verdict is Verdict.GRANT and result.otp_step is not None:
                verdict = decide_otp(self.claim_otp(result.client, result.otp_step,
                                                    self.clock()), self.on_store_down)
        except StorePermissionError:  # a member refused its own claims: no grant, ever
            verdict = Verdict.REFUSE_UNREACHABLE
        now = self.clock()
        self._count(verdict)
        if not verdict.granted:
            assert verdict.reason is not None
            self.hooks.refuse_claimed(result, verdict.reason, now)
            return verdict
        if verdict is Verdict.GRANT_UNCLAIMED:
            self.log(f"warning group {self.group}: granted client={result.client} without a "
                     "claim (etcd unreachable; on_store_down = local_only)")
        self.hooks.grant_claimed(result, now)
        if verdict is Verdict.GRANT:
            self.share(result, now)
            self._activate(result.client)
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
        """Write (open) or delete (close) the grant's lease key for the others."""
        decision = result.decision
        key = layout.lease_key(self.group, result.client, decision.address,
                               decision.service.name).encode()
        try:
            if result.request.action is Action.OPEN:
                record = LeaseRecord(result.client, decision.address, decision.service.name,
                                     decision.service.protocol, decision.service.port,
                                     now + decision.duration, self.member)
                lease = self.kv.grant(record.ttl(now))
                self.kv.put(key, encode_lease(record), lease)
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
