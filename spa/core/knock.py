"""Rotating knock tags (TOTP, RFC 6238, with HMAC-SHA256 kept to 8 bytes).

Invariants (docs/protocol.md, "Knock tag"):
- `knock_tag(key, step)` is the first 8 bytes of HMAC-SHA256(key, step as an
  8-byte big-endian counter): the same HMAC an RFC 6238 TOTP with SHA-256
  computes for that step; we keep 64 bits instead of 6 digits so random junk
  matches a live tag with probability about n_tags / 2**64.
- `TagTable` maps every live tag of every enrolled client to (client, step)
  for the steps around the current one, so the verifier refuses an unknown tag
  with one dictionary lookup and no cryptography.  At every moment it holds
  every tag of steps current-skew..current+skew; the next step's tags enter
  in slices during the current step and the expired step's leave in slices
  after the boundary (a tag a step early or late is harmless: the verifier
  checks the timestamp window and that the timestamp's step is the tag's).
  One exception, asked for by `warm_later` (a daemon's start at 10^5
  clients): the table is made with the current step's tags alone, and the
  other live steps' are the first slices (`warming` says how many clients'
  worth are left); a knock of those steps meanwhile is an unknown tag.  The
  same for clients added `later` (a group member's first read: the daemon
  puts a delta of more than WARM_LATER_KEYS keys in so).
- Every tag that enters or leaves the table is journaled once journaling is
  on: applying `drain_changes` to the set `start_journal` returned gives
  exactly the live tags.
- The core reads no clock: `advance` takes the step, `slice` a work budget.
"""

from __future__ import annotations

import contextlib
import hmac
import math
from collections.abc import Callable, Iterable, Mapping

STEP_SECONDS = 30  # RFC 6238 default time step
TAG_SIZE = 8  # bytes of knock tag on the wire
# Dicts the live tags are spread over by their first byte.  A dict grows (and,
# after deletions, rehashes) in one C call that holds the GIL: 20-100 ms for
# one dict of 4 x 10^5 tags, measured on this project's 2-core machine, a
# stall of every thread; a shard of 1/256 of it rehashes in ~0.1 ms.  The
# lookup stays one index and one dict `get`.
SHARDS = 256
SLICE = 1000  # clients per slice of a step's rotation (~1.5 ms of HMAC and dict work)


def step_of(unix_seconds: float) -> int:
    """The TOTP time step (RFC 6238 `T`, with T0 = 0) that contains a time."""
    return math.floor(unix_seconds / STEP_SECONDS)


def step_of_ms(unix_ms: int) -> int:
    """`step_of` for a packet's integer millisecond timestamp (exact)."""
    return unix_ms // (STEP_SECONDS * 1000)


def step_start(step: int) -> float:
    """The Unix time at which `step` begins."""
    return float(step * STEP_SECONDS)


def totp_hmac(tag_key: bytes, step: int) -> bytes:
    """HMAC-SHA256 over the RFC 4226 counter encoding of `step`."""
    return hmac.digest(tag_key, step.to_bytes(8, "big"), "sha256")


def knock_tag(tag_key: bytes, step: int) -> bytes:
    """The 8-byte knock tag of a client for one time step."""
    return totp_hmac(tag_key, step)[:TAG_SIZE]


def steps_for_window(window_seconds: float) -> int:
    """How many steps either side of the current one a +-window can reach."""
    return max(1, math.ceil(window_seconds / STEP_SECONDS))


class TagTable:
    """tag -> (client, step) for steps [current - skew, current + skew].

    Moved by the caller at each step boundary (`advance`, O(1) when the
    slices are done), and by `slice` between boundaries: first the expired
    step's tags leave, then the next step's (current + skew + 1) enter, so
    at the boundary they are already live.  Updated on enroll and revoke
    (`add`, `remove`: O(tags of that client)).  Collisions between two tags
    (probability about n**2 / 2**65) keep the first; the loser's packet in
    that one step is refused `unknown_tag` and its next step is unaffected.

    Threads: `lookup` takes no lock (it only reads one shard).  Every
    mutation (`advance`, `slice`, `add`, `remove`, the journal) runs under
    the lock given to `use_lock`, so a slicing thread and the thread that
    adds and removes clients never interleave.
    """

    __slots__ = ("_added", "_build", "_build_at", "_built", "_drop", "_drop_at",
                 "_generation", "_journaling", "_keys", "_lock", "_removed", "_shards",
                 "_skew", "_step", "_steps", "_warm", "_warm_at", "_warm_names", "lookup")

    def __init__(self, keys: Mapping[str, bytes], step: int, skew: int = 1, *,
                 warm_later: bool = False) -> None:
        """`warm_later`: only the current step's tags now; the other live
        steps' are the first slices (the table is warm when `warming` is 0)."""
        if skew < 1:
            raise ValueError("skew must be at least one step")
        self._keys: dict[str, bytes] = dict(keys)
        self._skew = skew
        self._step = step
        self._shards: list[dict[bytes, tuple[str, int]]] = [{} for _ in range(SHARDS)]
        self._steps: dict[int, list[bytes]] = {}  # step -> the tags inserted for it
        self._build: list[str] | None = None  # clients to insert for the next step
        self._build_at = 0
        self._built = False  # the next step (current + skew + 1) is complete
        self._drop: int | None = None  # the expired step whose tags are leaving
        self._drop_at = 0
        self._warm: list[int] = []  # live steps still to insert (warm_later), in order
        self._warm_names: list[str] = []  # the clients to insert them for
        self._warm_at = 0
        self._journaling = False
        self._added: set[bytes] = set()
        self._removed: set[bytes] = set()
        self._generation = 0  # +1 at each rebuild (a clock jump)
        self._lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        shards = self._shards

        def lookup(tag: bytes, shards: list[dict[bytes, tuple[str, int]]] = shards
                   ) -> tuple[str, int] | None:
            """tag (TAG_SIZE bytes) -> (client, step), or None."""
            return shards[tag[0]].get(tag)

        self.lookup: Callable[[bytes], tuple[str, int] | None] = lookup
        self._rebuild(warm_later=warm_later)

    def use_lock(self, lock: contextlib.AbstractContextManager[object]) -> None:
        """Guard every mutation with `lock` (the caller's threading.Lock)."""
        self._lock = lock

    @property
    def step(self) -> int:
        return self._step

    @property
    def skew(self) -> int:
        return self._skew

    @property
    def generation(self) -> int:
        """How many times the table was rebuilt (a clock jump): the journal
        then holds every tag, and a whole replacement is cheaper."""
        return self._generation

    @property
    def clients(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)

    def all_tags(self) -> list[bytes]:
        """Every tag in the table now."""
        with self._lock:
            return [tag for shard in self._shards for tag in shard]

    def start_journal(self) -> list[bytes]:
        """Every tag in the table now; from here on every change is journaled."""
        with self._lock:
            self._journaling = True
            self._added.clear()
            self._removed.clear()
            return [tag for shard in self._shards for tag in shard]

    def drain_changes(self) -> tuple[list[bytes], list[bytes]]:
        """(added, removed) since the last drain or `start_journal`: net
        changes, each tag in at most one of them."""
        with self._lock:
            added, removed = list(self._added), list(self._removed)
            self._added.clear()
            self._removed.clear()
            return added, removed

    def warming(self) -> int:
        """Clients' worth of live steps' tags still to insert (warm_later)."""
        if not self._warm:
            return 0
        return len(self._warm_names) * len(self._warm) - self._warm_at

    def pending(self) -> int:
        """Clients' worth of slicing left before the next boundary."""
        left = self.warming()
        if self._drop is not None:
            left += len(self._steps.get(self._drop, ())) - self._drop_at
        if not self._built:
            left += len(self._keys) - (self._build_at if self._build is not None else 0)
        return max(0, left)

    def slice(self, limit: int = SLICE) -> int:
        """Do up to `limit` items of the rotation (expired tags out first,
        then the next step's in); returns how many were done (0: none left)."""
        with self._lock:
            return self._slice(limit)

    def advance(self, step: int) -> None:
        """Move the table to a new current step: `old + 1` finishes what the
        slices left (normally nothing) and starts the next rotation; any
        other step (a clock jump either way) rebuilds."""
        with self._lock:
            if step == self._step:
                return
            if step == self._step + 1:
                while self._slice(1 << 30):
                    pass
                self._step = step
                self._drop = step - self._skew - 1
                self._drop_at = 0
                self._build, self._build_at, self._built = None, 0, False
            else:
                self._step = step
                self._rebuild()

    def add(self, client: str, tag_key: bytes, *, later: bool = False) -> None:
        """Enroll (or re-key) a client: its tags are live at once; `later`
        (a group member's first read of 10^5 clients): the current step's
        at once, the other live steps' among the first slices, as
        `warm_later` does for the table's own (`warming` counts them)."""
        self.add_many(((client, tag_key),), later=later)

    def add_many(self, keys: Iterable[tuple[str, bytes]], *, later: bool = False) -> None:
        """`add` of each (client, tag key) in turn, under one hold of the lock
        and with the steps and their counters worked out once (a member's
        first read adds 10^5 clients: add's own work was 2.5 us a client
        beside its 1.7 us of HMAC)."""
        with self._lock:
            steps: Iterable[int] = self._steps_of_new_client()
            if later:
                if not self._warm:  # a warm-up of its own: the others nearest first
                    self._warm = _nearest_first(self._step, self._skew)
                    self._warm_names, self._warm_at = [], 0
                steps = [step for step in steps if step not in self._warm]
            counters = [(step, step.to_bytes(8, "big")) for step in steps]
            known, insert, digest = self._keys, self._insert, hmac.digest
            warm = self._warm_names.append if later else None
            for client, tag_key in keys:
                if client in known:
                    self._remove(client)
                known[client] = tag_key
                if warm is not None:
                    warm(client)  # (a warm-up under way reaches it too)
                for step, counter in counters:  # knock_tag(tag_key, step)
                    insert(digest(tag_key, counter, "sha256")[:TAG_SIZE], client, step)

    def remove(self, client: str) -> None:
        """Forget a client's tags at once (later slices never bring them back)."""
        with self._lock:
            self._remove(client)

    # ---- under the lock ------------------------------------------------------

    def _steps_of_new_client(self) -> range:
        """The live steps, and the next one once its slicing has begun."""
        far = self._step + self._skew + 1 if (self._build is not None or self._built) else (
            self._step + self._skew)
        return range(self._step - self._skew, far + 1)

    def _remove(self, client: str) -> None:
        key = self._keys.pop(client, None)
        if key is None:
            return
        for step in range(self._step - self._skew - 1, self._step + self._skew + 2):
            tag = knock_tag(key, step)
            if self._shards[tag[0]].get(tag) == (client, step):
                self._delete(tag, step)

    def _slice(self, limit: int) -> int:
        done = self._warm_up(limit)
        drop = self._drop
        if drop is not None and done < limit:
            tags = self._steps.get(drop, [])
            end = min(len(tags), self._drop_at + limit - done)
            for tag in tags[self._drop_at:end]:
                self._delete(tag, drop)
            done += end - self._drop_at
            self._drop_at = end
            if end >= len(tags):
                self._steps.pop(drop, None)
                self._drop = None
        if done < limit and not self._built:
            if self._build is None:
                self._build, self._build_at = list(self._keys), 0
            names, keys, far = self._build, self._keys, self._step + self._skew + 1
            end = min(len(names), self._build_at + limit - done)
            for name in names[self._build_at:end]:
                key = keys.get(name)
                if key is not None:  # else removed meanwhile
                    self._insert(knock_tag(key, far), name, far)
            done += end - self._build_at
            self._build_at = end
            if end >= len(names):
                self._build, self._built = None, True
        return done

    def _warm_up(self, limit: int) -> int:
        """The live steps left by `warm_later`, first (up to `limit` clients)."""
        done = 0
        names, keys = self._warm_names, self._keys
        while self._warm and done < limit:
            step = self._warm[0]
            end = min(len(names), self._warm_at + limit - done)
            for name in names[self._warm_at:end]:
                key = keys.get(name)
                if key is not None:  # else removed meanwhile (a re-key inserted its own)
                    self._insert(knock_tag(key, step), name, step)
            done += end - self._warm_at
            self._warm_at = end
            if end >= len(names):
                self._warm.pop(0)
                self._warm_at = 0
        if not self._warm:
            self._warm_names = []
        return done

    def _insert(self, tag: bytes, client: str, step: int) -> None:
        shard = self._shards[tag[0]]
        if tag in shard:
            return  # a collision (or this client's tag again): the first stays
        shard[tag] = (client, step)
        self._steps.setdefault(step, []).append(tag)
        if self._journaling:
            if tag in self._removed:
                self._removed.discard(tag)
            else:
                self._added.add(tag)

    def _delete(self, tag: bytes, step: int) -> None:
        shard = self._shards[tag[0]]
        found = shard.get(tag)
        if found is None or found[1] != step:
            return  # gone already (its client removed), or another step's
        del shard[tag]
        if self._journaling:
            if tag in self._added:
                self._added.discard(tag)
            else:
                self._removed.add(tag)

    def _rebuild(self, *, warm_later: bool = False) -> None:
        self._generation += 1
        for shard in self._shards:
            for tag in list(shard):
                self._delete(tag, shard[tag][1])
        self._steps.clear()
        self._build, self._build_at, self._built = None, 0, False
        self._drop, self._drop_at = None, 0
        live = range(self._step - self._skew, self._step + self._skew + 1)
        now = [self._step] if warm_later else list(live)
        self._warm = _nearest_first(self._step, self._skew) if warm_later else []
        self._warm_names, self._warm_at = (list(self._keys) if self._warm else []), 0
        for step in now:
            self._add_step(step, self._keys.items())

    def _add_step(self, step: int, clients: Iterable[tuple[str, bytes]]) -> None:
        for client, key in clients:
            self._insert(knock_tag(key, step), client, step)


def _nearest_first(step: int, skew: int) -> list[int]:
    """The live steps but `step`, nearest first: a client's clock a step
    behind, then ahead, then two behind..."""
    return sorted((s for s in range(step - skew, step + skew + 1) if s != step),
                  key=lambda s: (abs(s - step), -s))
