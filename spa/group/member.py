"""A server as a member of its group: the group's clients and leases, kept
in step with etcd, applied to the running server.

Invariants (docs/groups.md, "Members"):
- The member reads the kinds of keys it uses (READ_KINDS and meta, one
  snapshot at revision R: get_prefixes) and watches the group from R + 1: no
  change is missed between the read and the watch.  It never reads claims/
  (a busy group holds every nonce of the freshness window there:
  docs/scale.md, "A member's start") nor members/ (presence, not applied
  here).
  It watches every key but the claims (WATCHED: two streams, the ranges
  before and after claims/, which a member never reads: create-if-absent is
  the check), so another member's grant costs it the lease's events, not
  also the claim's (docs/scale.md, "Watch fan-out").  When either watch ends
  by itself (WatchLostError: a compacted revision, a callback that raised)
  or the first read failed, the next tick reads the group afresh and
  applies the difference, and watches both ranges anew; until then the
  server keeps the clients and leases it had (etcd down changes nothing that
  runs).
- Across the two streams nothing is ordered (each is in revision order) and
  the member relies on nothing more: every key is in one stream, and its
  state is each key's last value (records, revocations, activations and
  other members' leases, per key), each event recomputing the view of the
  one client it names from those values.  So once both streams have
  delivered up to a revision, the state is the one the revision order
  gives (tests/unit/test_group_watch_order.py).  Only activated/ is in the
  first stream: a record and its activation may arrive in either order, and
  an activation counts only for the record whose enroll_by it names (a stale
  one never makes a newer enrollment met); a revocation (with close) and the
  leases it ends are in the same stream, in order.
- Each client record is decoded once, as its page of the read arrives (the
  store fetches the next page meanwhile: spa.group.etcd).
- Clients reach the verifier and the kernel's tag filter through the path the
  daemon's own client store takes (ClientDelta, hooks.apply_client_delta):
  a record, revocation or activation added, changed or removed is one delta.
  A revocation with close ends the client's leases at this member too.
- At the first read, the leases the server restored at start for clients
  not in its own store (a member restarted) stay only if the group holds
  them (hooks.confirm_restored): one closed elsewhere meanwhile ends.
- Another member's lease (leases/<c>/<address>/<service>, its `member` not
  ours) is installed in this member's firewall with the same end
  (hooks.install_lease); its key's deletion removes it here.  Our own
  leases' echoes are ignored (the local table already holds them).
- A watch callback never raises: a record that does not decode is logged
  (its key's kind and name, never its value) and skipped.
- While etcd does not answer, reads are retried with a growing pause (up to
  MAX_RETRY_PAUSE), the failure said once and the recovery once.
- The claims are spa.group.claims'; the member only routes packets there.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Protocol

from spa.core.errors import Reason
from spa.core.keys import ClientKeys
from spa.core.verify import Accepted
from spa.core.wire import IPAddress
from spa.group import layout
from spa.group.clients import GroupClient, decode_client
from spa.group.codec import RecordError
from spa.group.delta import ClientDelta, ClientView, group_delta
from spa.group.kv import (
    KV,
    Event,
    EventKind,
    Item,
    StoreError,
    Watch,
    WatchLostError,
    prefix_end,
)
from spa.group.layout import GroupNameError, Kind
from spa.group.records import (
    LeaseRecord,
    Revocation,
    decode_activation,
    decode_lease,
    decode_meta,
    decode_revocation,
)

TICK = 0.2  # seconds between the member thread's looks at its watch and the grace ends
MAX_RETRY_PAUSE = 5.0  # seconds between reads at most while etcd does not answer
# lease removals remembered for the echo of a grant of ours that follows one (the
# echo comes within the watch's delay: thousands of removals is seconds of them)
REMOVED_KEPT = 4096
# the kinds a member's read takes (with the meta key): what _take applies
READ_KINDS = (Kind.CLIENT, Kind.REVOKED, Kind.ACTIVATED, Kind.LEASE)


class MemberError(Exception):
    """The group cannot be joined as configured (one line for the operator)."""


class MemberHooks(Protocol):
    """What the member asks of the daemon (spa.server.daemon.Server)."""

    def apply_client_delta(self, delta: ClientDelta, origin: str) -> None: ...

    def install_lease(self, lease: LeaseRecord) -> None: ...

    def remove_lease(self, client: str, address: IPAddress, service: str) -> None: ...

    def confirm_restored(self, live: Collection[tuple[str, IPAddress, str]]) -> None: ...

    def grant_claimed(self, results: list[Accepted], now: float) -> None: ...

    def refuse_claimed(self, result: Accepted, reason: Reason, now: float) -> None: ...


class GroupMember:
    """One member's view of its group, applied through `hooks`."""

    def __init__(self, kv: KV, *, group: str, member: str, server_id: bytes,
                 hooks: MemberHooks, clock: Callable[[], float],
                 log: Callable[[str], None]) -> None:
        self.kv = kv
        self.group = layout.check_group(group)
        self.member = layout.check_member(member)
        self.server_id = server_id
        self.hooks = hooks
        self.clock = clock
        self.log = log
        self._prefix = layout.group_prefix(group)
        self._read_prefixes = (layout.meta_key(group).encode(), *(  # meta first
            layout.kind_prefix(group, kind).encode() for kind in READ_KINDS))
        self._lock = threading.RLock()
        self._records: dict[str, GroupClient] = {}  # clients/<name>, decoded once
        self._revoked: dict[str, Revocation] = {}
        self._activated: dict[str, int] = {}
        self._views: dict[str, ClientView] = {}  # what the server runs with
        self._held: dict[str, dict[str, ClientKeys]] = {}  # the verifier's keys per client
        self._remote: dict[str, LeaseRecord] = {}  # lease key -> another member's lease
        # lease keys whose removal went to the daemon's queue, the latest
        # REMOVED_KEPT (a removal run after a grant of ours is undone by its echo)
        self._removed: OrderedDict[str, None] = OrderedDict()
        self._watches: list[Watch] = []  # one per range of watched(group); none: read again
        self.loaded = False
        self.revision = 0  # the revision the last full read saw
        self.resyncs = 0  # full reads after the first (a watch lost, etcd back)
        self._failing: str | None = None  # why the last read failed (said once)
        self._retry_at = 0.0  # no read again before this (the clock's seconds)
        self._pause = TICK  # doubles while reads fail, up to MAX_RETRY_PAUSE

    # ---- reading the group -------------------------------------------------

    def load(self) -> None:
        """Read the group (the kinds it applies, one snapshot), apply the
        difference, watch from the next revision.  Raises StoreError (etcd),
        MemberError (not this group).
        The cyclic garbage collector pauses meanwhile: at 10^5 clients its
        passes over the objects a read makes (none of them garbage) took 1-1.3
        s of 6 (benchmarks/group_scale.py)."""
        with _collector_paused():
            self._load()

    def _load(self) -> None:
        clients = layout.kind_prefix(self.group, Kind.CLIENT).encode()
        decoded: dict[tuple[bytes, int], GroupClient | RecordError] = {}

        def on_page(page: list[Item]) -> None:
            """Decode the page's client records while the store reads on."""
            for item in page:
                at = (item.key, item.mod_revision)  # one value (a read again: known)
                if item.key.startswith(clients) and at not in decoded:
                    try:
                        decoded[at] = decode_client(item.value, self.server_id)
                    except RecordError as exc:
                        decoded[at] = exc
        items, revision = self.kv.get_prefixes(self._read_prefixes, on_page)
        self._check_meta(items)
        self._cancel_watches()
        with self._lock:
            self._records.clear()
            self._revoked.clear()
            self._removed.clear()
            self._activated.clear()
            clients_text = clients.decode("ascii")
            seen = set()  # the keys read, but the client records' (what leases need)
            for item in items:
                key = item.key.decode("utf-8", "replace")
                client = decoded.get((item.key, item.mod_revision))
                if type(client) is GroupClient and key == clients_text + client.name:
                    self._records[client.name] = client  # _take's, its key known at once
                    continue
                seen.add(key)
                try:
                    self._take(key, item.value, reading=True, client=client)
                except (RecordError, GroupNameError) as exc:
                    self.log(f"error group {self.group}: {_what(self.group, key)} skipped: "
                             f"{exc}")
            for key in [k for k in self._remote if k not in seen]:
                self._drop_lease(key)
            self._apply(set(self._views) | set(self._records_names()))
            if not self.loaded:  # the leases the server restored at start: the group's still?
                self.hooks.confirm_restored(_live_leases(self.group, seen))
            if self.loaded:
                self.resyncs += 1
            self.loaded, self.revision = True, revision
        self._watch_from(revision + 1)

    def _watch_from(self, revision: int) -> None:
        """Watch every range of watched() from revision on (a failure to
        start one cancels the others: the next tick reads again)."""
        try:
            for start, end in watched(self.group):
                self._watches.append(self.kv.watch_range(start, end, revision, self._on_event))
        except BaseException:
            self._cancel_watches()
            raise

    def _cancel_watches(self) -> None:
        watches, self._watches = self._watches, []
        for watch in watches:
            watch.cancel()

    def _check_meta(self, items: list[Item]) -> None:
        meta = layout.meta_key(self.group).encode()
        found = next((item for item in items if item.key == meta), None)
        if found is None:
            raise MemberError(f"group {self.group}: no such group in etcd (spa-server group "
                              "init makes it)")
        try:
            server_id = decode_meta(found.value).server_id
        except RecordError as exc:
            raise MemberError(f"group {self.group}: its meta record is damaged: {exc}") from None
        if server_id != self.server_id:
            raise MemberError(f"group {self.group}: its server id is not this server's: set "
                              "server_id in the config to the group's (spa-server group join)")

    def tick(self) -> None:
        """The member thread's round: read afresh when there is no watch (the
        first read failed) or it is gone, backing off while etcd does not
        answer (said once, and once when it does); and end the grace of
        rotated-out keys."""
        watches = self._watches
        lost = next((w.ended() for w in watches if w.ended() is not None), None)
        if not watches or lost is not None:
            self._read_again(lost)
            return
        now = self.clock()
        with self._lock:
            ended = {name for name, keys in self._held.items()
                     if name in self._views and keys.keys() != self._views[name].keys(now).keys()}
            if ended:
                self._apply(ended)

    def _read_again(self, lost: WatchLostError | None) -> None:
        now = self.clock()
        if now < self._retry_at <= now + MAX_RETRY_PAUSE:  # (a clock set back: read now)
            return
        if lost is not None and self._failing is None:
            self.log(f"warning group {self.group}: {lost}; reading the group again")
        try:
            self.load()
        except (StoreError, MemberError) as exc:
            self.read_failed(exc, now)
            return
        self._failing, self._retry_at, self._pause = None, 0.0, TICK
        self.log(f"group {self.group}: read at revision {self.revision} "
                 f"clients={len(self._views)} leases from other members={len(self._remote)}")

    def read_failed(self, exc: Exception, now: float, *, said: bool = False) -> None:
        """A read got no answer: try again after a growing pause, and say so
        once per outage (`said`: the caller said it already)."""
        self._retry_at = now + self._pause
        self._pause = min(self._pause * 2, MAX_RETRY_PAUSE)
        if self._failing is None and not said:
            self.log(f"error group {self.group}: {exc} (keeping the clients and leases "
                     "this member has; trying again)")
        self._failing = str(exc)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(TICK):
            try:
                self.tick()
            except Exception as exc:  # keep the member going; say what broke
                self.log(f"error group {self.group}: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._cancel_watches()

    # ---- changes -----------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """A watch event (the store's thread): never raises."""
        key = event.key.decode("utf-8", "replace")
        try:
            with self._lock:
                name = self._take(key, event.value if event.kind is EventKind.PUT else None)
                if name is not None:
                    self._apply({name})
        except Exception as exc:  # a bad record, or the daemon's hook: the watch goes on
            self.log(f"error group {self.group}: a change of {_what(self.group, key)} was "
                     f"not applied: {type(exc).__name__}: {exc}")

    def _take(self, key: str, value: bytes | None, *, reading: bool = False,
              client: GroupClient | RecordError | None = None) -> str | None:
        """Record one key's new value (None: deleted); the client it changes
        (None: no client's view changed).  `reading`: from a full read, where
        our own leases are installed too (a restart forgot those of the
        group's clients).  `client`: a client record's value decoded already
        (or its error).  Raises RecordError, GroupNameError."""
        try:
            ref = layout.parse_key(self.group, key)
        except GroupNameError:
            return None  # not a key this version knows: nothing to apply
        if ref.kind is Kind.LEASE:
            self._take_lease(key, value, own_too=reading)
            return None
        if ref.kind not in (Kind.CLIENT, Kind.REVOKED, Kind.ACTIVATED):
            return None
        name = ref.parts[0]
        if ref.kind is Kind.CLIENT:
            if value is None:
                self._records.pop(name, None)
            else:
                if client is None:
                    client = decode_client(value, self.server_id)
                if isinstance(client, RecordError):
                    raise client  # before anything changes
                if client.name != name:  # its keys would go in under another name
                    raise RecordError(f"the record under clients/{name} names client "
                                      f"{client.name}")
                self._records[name] = client
        elif ref.kind is Kind.REVOKED:
            if value is None:
                self._revoked.pop(name, None)
            else:
                self._revoked[name] = decode_revocation(value)
        elif value is None:
            self._activated.pop(name, None)
        else:
            self._activated[name] = decode_activation(value).enroll_by
        return name

    def _take_lease(self, key: str, value: bytes | None, *, own_too: bool) -> None:
        if value is None:
            self._drop_lease(key)
            return
        record = decode_lease(value)
        removed = self._removed.pop(key, False) is None
        if record.member == self.member:
            self._remote.pop(key, None)  # ours now (a grant here replaced another's)
            if removed:  # a removal the daemon ran after our grant ended it: put it back
                own_too = True
            if own_too:  # a grant (or extension) of a lease we hold: the same end
                self.hooks.install_lease(record)
            return  # our own grant, echoed: the local table holds it
        known = self._remote.get(key)
        self._remote[key] = record
        if known != record:
            self.hooks.install_lease(record)

    def _drop_lease(self, key: str) -> None:
        self._removed[key] = None
        self._removed.move_to_end(key)
        if len(self._removed) > REMOVED_KEPT:
            self._removed.popitem(last=False)
        record = self._remote.pop(key, None)
        if record is None:
            try:
                ref = layout.parse_key(self.group, key)
            except GroupNameError:
                return
            if ref.kind is not Kind.LEASE:
                return
            # our own lease's key, deleted by another member (a close knock there)
            self.hooks.remove_lease(ref.parts[0], layout.check_address(ref.parts[1]),
                                    ref.parts[2])
            return
        self.hooks.remove_lease(record.client, record.address, record.service)

    def _records_names(self) -> set[str]:
        return set(self._records)

    def _view(self, name: str) -> ClientView | None:
        client = self._records.get(name)
        if client is None:
            return None
        return ClientView(client, self._revoked.get(name), self._activated.get(name))

    def _apply(self, names: set[str]) -> None:
        """Give the daemon the delta for `names` (caller holds the lock)."""
        now = self.clock()
        after: dict[str, ClientView | None] = {}
        live: dict[str, dict[str, ClientKeys]] = {}  # each one's keys at now, made once
        for name in sorted(names):
            view = self._view(name)
            keys = view.keys(now) if view is not None else {}
            if view == self._views.get(name) and self._held.get(name, {}) == keys:
                continue
            after[name], live[name] = view, keys
        if not after:
            return
        before: Mapping[str, ClientView | None] = {n: self._views.get(n) for n in after}
        delta = group_delta(before, after, self._held, now, live=live)
        for name, view in after.items():
            if view is None:
                self._views.pop(name, None)
                self._held.pop(name, None)
            else:
                self._views[name] = view
                self._held[name] = live[name]
        self.hooks.apply_client_delta(delta, f"group {self.group}")

    # ---- for status and tests ----------------------------------------------

    @property
    def failing(self) -> bool:
        """Whether the last read of the group got no answer (etcd down)."""
        return self._failing is not None

    def pending(self, client: str) -> int | None:
        """The enroll_by of a client still pending (None: not pending)."""
        view = self._views.get(client)
        if view is None or view.client.enroll_by is None or view.met:
            return None
        return view.client.enroll_by

    def covers(self, client: str) -> bool:
        """Whether `client` is one of the group's (as the server runs them)."""
        return client in self._views

    @property
    def clients(self) -> frozenset[str]:
        return frozenset(self._views)

    @property
    def client_count(self) -> int:
        """How many of the group's clients the server runs (from any thread:
        no iteration of a dict the watch changes)."""
        return len(self._views)

    @property
    def remote_leases(self) -> dict[str, LeaseRecord]:
        return dict(self._remote)


def watched(group: str) -> tuple[tuple[bytes, bytes], ...]:
    """The ranges [start, end) a member watches: the group's prefix but its
    claims/ (layout's order: activated/ | claims/ | clients/ leases/ members/
    meta revoked/)."""
    prefix = layout.group_prefix(group).encode()
    claims = layout.kind_prefix(group, Kind.CLAIM).encode()
    return ((prefix, claims), (prefix_end(claims), prefix_end(prefix)))


def _live_leases(group: str, keys: set[str]) -> set[tuple[str, IPAddress, str]]:
    """(client, address, service) of every lease key among `keys`."""
    live = set()
    leases = layout.kind_prefix(group, Kind.LEASE)
    for key in keys:
        if not key.startswith(leases):  # (10^5 client keys: none parsed for nothing)
            continue
        try:
            ref = layout.parse_key(group, key)
        except GroupNameError:
            continue
        if ref.kind is Kind.LEASE:
            live.add((ref.parts[0], layout.check_address(ref.parts[1]), ref.parts[2]))
    return live


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            # what the pause made (10^5 clients' records: live, not garbage)
            # to the oldest generation, unscanned: else the first collection
            # after it walks them all (0.15-0.2 s at 10^5), and again as
            # they age; cycles among them are still found by a full one
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def _what(group: str, key: str) -> str:
    """A key as a log line may name it (its kind and names; never a value)."""
    try:
        ref = layout.parse_key(group, key)
    except GroupNameError:
        return "a key"
    return "/".join((ref.kind.value, *ref.parts[:1]))
