"""A member announces itself: `members/<member>` while it runs (docs/groups.md,
"Members").

Invariants:
- The key lives on an etcd lease of PRESENCE_TTL seconds that the member
  renews every PRESENCE_EVERY seconds (a third of the TTL): a member
  that stops, crashes or loses etcd for longer than the TTL is gone from
  `group status` by itself; a clean stop revokes the lease at once.
- Presence is information only: nothing grants or refuses by it, so a
  failure here is logged once (and once when it works again) and retried
  at the next tick; it never stops the daemon or a claim.
- Time is an argument (`now`); the store is the KV given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from spa.group import layout
from spa.group.kv import KV, LeaseExpiredError, StoreError
from spa.group.records import Member, encode_member

PRESENCE_TTL = 15  # seconds a member's key outlives its last renewal
PRESENCE_EVERY = 5.0  # seconds between renewals (three fit in the TTL; 1,000 members: 200/s)


class Presence:
    """members/<member>, kept alive by `tick`."""

    def __init__(self, kv: KV, *, group: str, member: str, started: float,
                 log: Callable[[str], None]) -> None:
        self.kv = kv
        self.key = layout.member_key(group, member).encode()
        self.value = encode_member(Member(member, started))
        self.group = group
        self.log = log
        self.lease = 0  # the etcd lease holding the key (0: none yet)
        self._failing = ""

    def tick(self) -> None:
        """Renew the lease, or (first, or after it was lost) grant one and put
        the key on it.  Never raises: a store error is logged and retried."""
        try:
            if self.lease:
                try:
                    self.kv.keep_alive(self.lease)
                except LeaseExpiredError:
                    self.lease = 0
            if not self.lease:
                lease = self.kv.grant(PRESENCE_TTL)
                self.kv.put(self.key, self.value, lease=lease)
                self.lease = lease
        except StoreError as exc:
            if not self._failing:
                self.log(f"warning group {self.group}: cannot announce this member "
                         f"({type(exc).__name__}: {exc}); trying again")
            self._failing = str(exc)
            return
        if self._failing:
            self.log(f"group {self.group}: this member is announced again")
            self._failing = ""

    def close(self) -> None:
        """A clean stop: the key goes at once (its lease revoked)."""
        if self.lease:
            with contextlib.suppress(StoreError):  # else it ends with its TTL
                self.kv.revoke(self.lease)
            self.lease = 0
