"""The dashboard's client views: a page of clients, one client, the counts.

Invariants (issue 14, 100,000 clients on one server; docs/benchmarks.md,
"Dashboard at 10^5 clients"):
- A list reads at most its page of client rows plus one (to know whether a
  next page exists): keyset paging by name with the filters in SQL
  (ClientStore.page).  Counts come from SQL (ClientStore.count,
  count_by_state) and read no row.  A client's page reads that client alone
  (ClientStore.get).  tests/unit/test_dashboard_clients.py counts the rows.
- Filters reach SQL only as bound parameters; a bad one is one line on the
  page, and the page shows everything instead.
- What a row carries is listed in ClientRow: names, states, services, times,
  the endpoint, the source networks; never a secret (key or OTP secret).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from spa.server import admin
from spa.server.config import ClientEntry
from spa.server.events import last_seen
from spa.store.clients import ClientStore
from spa.store.states import STATES, Activation, StateCounts

PAGE_ROWS = 100  # clients a page shows unless ?limit= says otherwise
PAGE_ROWS_MAX = 1_000  # the most ?limit= may ask for (about 0.5 MB of HTML)
OVERVIEW_ROWS = 20  # clients the overview lists; the clients page has the rest
MENU_MAX = 200  # clients the activity filter offers in a menu; more: a text field


@dataclass(frozen=True, slots=True)
class ClientQuery:
    """What the clients page shows: `limit` clients by name after `after`,
    whose name holds `match`, in `state` (one of STATES; empty: any)."""
    after: str = ""
    limit: int = PAGE_ROWS
    match: str = ""
    state: str = ""

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> tuple[ClientQuery, str]:
        """From a query string: (the query, "" or one line on what was wrong
        and left out)."""
        errors = []
        state = params.get("state", "")
        if state not in ("", *STATES):
            errors.append(f"state {state!r}: choose one of {', '.join(STATES)}")
            state = ""
        text = params.get("limit", "") or str(PAGE_ROWS)
        limit = int(text) if text.isdigit() else 0
        if not 1 <= limit <= PAGE_ROWS_MAX:
            errors.append(f"limit {text!r}: give 1 to {PAGE_ROWS_MAX}")
            limit = PAGE_ROWS
        return cls(params.get("after", ""), limit, params.get("match", ""), state), \
            "; ".join(errors)

    def link(self, *, after: str = "", state: str | None = None) -> str:
        """/clients with this query from `after` (in `state`), defaults left out."""
        pairs = [(key, value) for key, value in (
            ("match", self.match), ("state", self.state if state is None else state),
            ("after", after), ("limit", "" if self.limit == PAGE_ROWS else str(self.limit)))
            if value]
        return "/clients" + ("?" + urlencode(pairs) if pairs else "")


@dataclass(frozen=True, slots=True)
class ClientRow:
    """One client as a page shows it (no secret)."""
    name: str
    state: str  # revoked | active | pending until <UTC> | expired
    services: str
    otp: bool
    enrolled: str
    endpoint: str
    enroll_by: str
    old_until: str  # the old secret still works until then (a rotation's grace)
    seen: tuple[float, str] | None  # the last accepted knock: time, source
    sources: tuple[str, ...]  # the networks its knocks may come from (none: anywhere)

    @classmethod
    def of(cls, entry: ClientEntry, met: Activation,
           seen: Mapping[str, tuple[float, str]]) -> ClientRow:
        return cls(entry.name, admin.state_text(entry, met), ", ".join(entry.services),
                   bool(entry.otp_secret),
                   entry.enrolled, entry.endpoint, entry.enroll_by, entry.old_until,
                   seen.get(entry.name), entry.sources)


@dataclass(frozen=True, slots=True)
class ClientListing:
    """A page of clients and how many there are."""
    query: ClientQuery
    rows: list[ClientRow]
    matching: int  # clients the filters let through (all pages)
    counts: StateCounts  # every client, by state
    next: str  # the next page's link ("": this is the last)


def list_clients(store: ClientStore, query: ClientQuery, met: Activation,
                 events_db: Path) -> ClientListing:
    """One page: `query.limit` + 1 rows read at most, two counting statements."""
    entries = store.page(after=query.after, limit=query.limit + 1, match=query.match,
                         state=query.state, activation=met)
    shown, more = entries[:query.limit], len(entries) > query.limit
    seen = seen_of(events_db, [entry.name for entry in shown])
    matching = (store.count(match=query.match, state=query.state, activation=met)
                if query.match or query.state else -1)
    counts = store.count_by_state(met)
    return ClientListing(query, [ClientRow.of(entry, met, seen) for entry in shown],
                         counts.total if matching < 0 else matching, counts,
                         query.link(after=shown[-1].name) if more else "")


def one_client(store: ClientStore, name: str, met: Activation,
               events_db: Path) -> ClientRow | None:
    """One client's row (None: no such client); reads that row alone."""
    entry = store.get(name)
    if entry is None:
        return None
    return ClientRow.of(entry, met, seen_of(events_db, [name]))


def menu_names(store: ClientStore) -> list[str] | None:
    """The names the activity filter lists (None: more than MENU_MAX, so it
    offers a text field instead); reads MENU_MAX + 1 rows at most."""
    names = [entry.name for entry in store.page(limit=MENU_MAX + 1)]
    return names if len(names) <= MENU_MAX else None


def seen_of(events_db: Path, names: list[str]) -> dict[str, tuple[float, str]]:
    """The last accepted knock of each of `names` (none before any event)."""
    try:
        return last_seen(events_db, names)
    except FileNotFoundError:
        return {}


def back_to(target: str) -> str:
    """Where a form may send the browser back to: one of this site's client
    views (the overview, a clients page, a client's page); anything else,
    another site included, is the overview's clients."""
    parts = urlsplit(target)
    ours = (not parts.scheme and not parts.netloc and "\\" not in target
            and (parts.path == "/" or parts.path == "/clients"
                 or parts.path.startswith("/clients/")))
    return target if ours else "/#clients"
