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

# (name, enroll_by) is one activated.json holds (passed as a JSON object; an
# uncorrelated IN is materialized once per statement, then looked up per row)
_MET = "(name, enroll_by) IN (SELECT key, value FROM json_each(:met))"
_WHERE = {
    "revoked": "revoked = 1",
    "active": f"revoked = 0 AND (enroll_by = '' OR {_MET})",
    "pending": f"revoked = 0 AND enroll_by > :now AND NOT {_MET}",
    "expired": f"revoked = 0 AND enroll_by > '' AND enroll_by <= :now AND NOT {_MET}",
}
# every part an index range on clients_state (revoked, enroll_by); the used
# pending enrollments are looked up by name, one each (json_each drives the join)
COUNT_BY_STATE = (
    "SELECT (SELECT count(*) FROM clients), "
    "(SELECT count(*) FROM clients WHERE revoked = 1), "
    "(SELECT count(*) FROM clients WHERE revoked = 0 AND enroll_by > :now), "
    "(SELECT count(*) FROM clients WHERE revoked = 0 AND enroll_by > '' "
    "AND enroll_by <= :now), "
    "(SELECT count(*) FROM json_each(:met) AS m CROSS JOIN clients AS c ON c.name = m.key "
    "AND c.enroll_by = m.value WHERE c.revoked = 0 AND c.enroll_by > :now), "
    "(SELECT count(*) FROM json_each(:met) AS m CROSS JOIN clients AS c ON c.name = m.key "
    "AND c.enroll_by = m.value WHERE c.revoked = 0 AND c.enroll_by > '' "
    "AND c.enroll_by <= :now)")


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
        return {"now": self.now, "met": json.dumps(dict(self.met))}


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
    def of_row(cls, row: tuple[int, int, int, int, int, int]) -> StateCounts:
        """From COUNT_BY_STATE's one row."""
        total, revoked, with_time, past, met_pending, met_expired = (int(n) for n in row)
        pending, expired = with_time - met_pending, past - met_expired
        return cls(total, revoked, total - revoked - pending - expired, pending, expired)

    def items(self) -> list[tuple[str, int]]:
        """(state, count) in STATES' order."""
        return [(state, int(getattr(self, state))) for state in STATES]
