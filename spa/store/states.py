"""A client's state, decided by one rule in Python and in SQL.

Invariants:
- Four states, in this order of precedence: revoked; active (no enroll-by
  time, or its pending enrollment was used in time: the state directory's
  activated.json maps its name to the enroll_by it met); pending (an
  enroll_by after now); expired (an enroll_by at or before now, never used).
- `Activation.state(entry)` and the SQL of `Activation.where(state)` and
  `count_by_state` agree on every client (tests/unit/test_client_store.py).
- enroll_by is config.UTC_FORMAT (fixed width, zero padded), so comparing
  the text compares the times; `now` is in the same format.
- Pure: no clock, no file.  The caller reads the time and activated.json and
  passes them in.  The SQL only ever takes them as bound parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from spa.server.config import ClientEntry

STATES = ("revoked", "active", "pending", "expired")

# the client's name and enroll_by, as activated.json's entries are passed in
# (a JSON array of "name enroll_by": neither a name nor a UTC time holds a
# space).  An uncorrelated IN is materialized once per statement, then looked
# up per row (a row value, (name, enroll_by) IN, was 100 times slower here).
_MET = "name || ' ' || enroll_by IN (SELECT value FROM json_each(:met))"
_WHERE = {
    "revoked": "revoked = 1",
    "active": "revoked = 0 AND (enroll_by = '' OR " + _MET + ")",
    "pending": "revoked = 0 AND enroll_by > :now AND NOT (" + _MET + ")",
    "expired": "revoked = 0 AND enroll_by > '' AND enroll_by <= :now AND NOT (" + _MET + ")",
}
# one statement: the total and three states' counts, each a range of the
# covering index clients_state (revoked, enroll_by, name); active is the rest
_COUNT = "(SELECT count(*) FROM clients WHERE {})"
COUNT_BY_STATE = "SELECT " + ", ".join(
    _COUNT.format(_WHERE[state] if state else "1") for state in ("", "revoked", "pending",
                                                                  "expired"))


@dataclass(frozen=True, slots=True)
class Activation:
    """What decides a client's state beside its own row: the time now
    (UTC_FORMAT; empty: no time, so every enroll_by counts as pending and
    none as expired) and the pending enrollments used in time (name -> the
    enroll_by met)."""
    now: str = ""
    met: Mapping[str, str] = field(default_factory=dict, hash=False)

    def state(self, entry: ClientEntry) -> str:
        """One of STATES."""
        if entry.revoked:
            return "revoked"
        if not entry.enroll_by or self.met.get(entry.name) == entry.enroll_by:
            return "active"
        return "pending" if entry.enroll_by > self.now else "expired"

    def where(self, state: str) -> tuple[str, dict[str, str]]:
        """The SQL condition for clients in `state` (one of STATES) and its
        named parameters.  Raises KeyError for another state."""
        return _WHERE[state], self.params()

    def params(self) -> dict[str, str]:
        return {"now": self.now,
                "met": json.dumps([f"{name} {when}" for name, when in self.met.items()])}


NO_TIME = Activation()  # every enroll_by pending, none expired, none used (no state dir read)


@dataclass(frozen=True, slots=True)
class StateCounts:
    """How many clients are in each state (they add up to `total`)."""
    total: int
    revoked: int
    active: int
    pending: int
    expired: int

    @classmethod
    def of_row(cls, row: tuple[int, int, int, int]) -> StateCounts:
        """From COUNT_BY_STATE's one row."""
        total, revoked, pending, expired = (int(n) for n in row)
        return cls(total, revoked, total - revoked - pending - expired, pending, expired)

    def items(self) -> list[tuple[str, int]]:
        """(state, count) in STATES' order."""
        return [(state, int(getattr(self, state))) for state in STATES]
