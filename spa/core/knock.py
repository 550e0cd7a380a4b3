"""Rotating knock tags (TOTP, RFC 6238, with HMAC-SHA256 kept to 8 bytes).

Invariants (docs/protocol.md, "Knock tag"):
- `knock_tag(key, step)` is the first 8 bytes of HMAC-SHA256(key, step as an
  8-byte big-endian counter): the same HMAC an RFC 6238 TOTP with SHA-256
  computes for that step; we keep 64 bits instead of 6 digits so random junk
  matches a live tag with probability about n_tags / 2**64.
- `TagTable` maps every live tag of every enrolled client to (client, step)
  for the steps around the current one, so the verifier refuses an unknown tag
  with one dictionary lookup and no cryptography.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

STEP_SECONDS = 30  # RFC 6238 default time step
TAG_SIZE = 8  # bytes of knock tag on the wire


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


@dataclass(frozen=True, slots=True)
class Prepared:
    """Tags computed ahead of a step boundary (see `TagTable.prepare`)."""

    step: int
    clients: frozenset[tuple[str, bytes]]  # (name, tag key): a re-key changes it
    entries: list[tuple[bytes, str]]


class TagTable:
    """tag -> (client, step) for steps [current - skew, current + skew].

    Refreshed by the caller at each step boundary (`advance`), and updated on
    enroll and revoke (`add`, `remove`).  Collisions between two clients' tags
    (probability about n**2 / 2**65) keep the first; the loser's packet in that
    one step is refused `unknown_tag` and its next step is unaffected.
    """

    __slots__ = ("_by_step", "_keys", "_skew", "_step", "_tags", "lookup")

    def __init__(self, keys: Mapping[str, bytes], step: int, skew: int = 1) -> None:
        if skew < 1:
            raise ValueError("skew must be at least one step")
        self._keys: dict[str, bytes] = dict(keys)
        self._skew = skew
        self._step = step
        self._tags: dict[bytes, tuple[str, int]] = {}
        self._by_step: dict[int, list[tuple[bytes, str]]] = {}
        # tag -> (client, step) or None: the dict's own bound `get`, so the
        # receive path pays one C call (the dict object is never replaced).
        self.lookup: Callable[[bytes], tuple[str, int] | None] = self._tags.get
        self._rebuild()

    @property
    def step(self) -> int:
        return self._step

    @property
    def clients(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._tags)

    def prepare(self, step: int) -> Prepared:
        """Compute, ahead of time, the tags that `advance(step)` will add.

        Safe to call from another thread than the one that looks tags up: it
        only reads a snapshot of the keys.  The result is used by `advance`
        only if no client was added, removed or re-keyed meanwhile.
        """
        keys = list(self._keys.items())
        far = step + self._skew
        return Prepared(step, frozenset(keys), [(knock_tag(key, far), name) for name, key in keys])

    def advance(self, step: int, prepared: Prepared | None = None) -> None:
        """Move the table to a new current step (normally `old + 1`)."""
        if step == self._step:
            return
        if step == self._step + 1:
            self._drop_step(self._step - self._skew)
            self._step = step
            far = step + self._skew
            if prepared is not None and prepared.step == step and (
                    prepared.clients == frozenset(self._keys.items())):
                entries = self._by_step.setdefault(far, [])
                for tag, name in prepared.entries:
                    entries.append((tag, name))
                    self._tags.setdefault(tag, (name, far))
            else:
                self._add_step(far, self._keys.items())
        else:
            self._step = step
            self._rebuild()

    def add(self, client: str, tag_key: bytes) -> None:
        """Enroll (or re-key) a client."""
        if client in self._keys:
            self.remove(client)
        self._keys[client] = tag_key
        for step in self._live_steps():
            self._add_step(step, [(client, tag_key)])

    def remove(self, client: str) -> None:
        """Forget a client's tags at once."""
        if self._keys.pop(client, None) is None:
            return
        for step, entries in self._by_step.items():
            kept = []
            for tag, owner in entries:
                if owner == client:
                    if self._tags.get(tag, ("", 0))[0] == client:
                        del self._tags[tag]
                else:
                    kept.append((tag, owner))
            self._by_step[step] = kept

    def _live_steps(self) -> range:
        return range(self._step - self._skew, self._step + self._skew + 1)

    def _rebuild(self) -> None:
        self._tags.clear()
        self._by_step.clear()
        for step in self._live_steps():
            self._add_step(step, self._keys.items())

    def _add_step(self, step: int, clients: Iterable[tuple[str, bytes]]) -> None:
        entries = self._by_step.setdefault(step, [])
        for client, key in clients:
            tag = knock_tag(key, step)
            entries.append((tag, client))
            self._tags.setdefault(tag, (client, step))

    def _drop_step(self, step: int) -> None:
        for tag, client in self._by_step.pop(step, []):
            if self._tags.get(tag) == (client, step):
                del self._tags[tag]
