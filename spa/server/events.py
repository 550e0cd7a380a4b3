"""The event store (SQLite, WAL) and the log lines that mirror it.

Invariants (docs/threat-model.md, "Fill the disk or the log with a flood";
STYLE principle 4):
- The receive path only touches memory: `record`, `refuse` and `tally` add
  to buffers under a lock; `flush` (housekeeping thread) writes rows and log
  lines, one line per row.
- What a sender without a key can cause (refused knocks, dropped attempts,
  scans) is counted per key (outcome, reason, client, source, service), one
  row with a count per key, and costs at most EVENT_BUDGET rows and log lines
  in any second of the clock that `flush` is given, across all its flushes.
  A flush writes what is pending when it fits in what is left of the
  second's budget; otherwise it holds it until the second is over, and then
  folds it into what is left: the sources that matter most keep rows of their
  own (`_priority`: fail2ban's lines first, most refusals first, sources that
  had a line lately win ties), the rest fold by source prefix (/24, /64),
  the rest of those into one row per (outcome, reason).  Folding never loses
  a count.  What does not fit even so waits, folded, for the next second.
- Between flushes at most MAX_KEYS_BUFFERED keys are held; past it a key
  folds into its (outcome, reason) row at once.
- Accepted knocks, lease starts and ends and the guard's repairs are rows of
  their own, outside the budget: only a key holder causes the first three
  (bounded by the replay cache's per-client cap), the guard says at most one
  line a second.
- Never a secret, never packet bytes: events carry names, addresses, reasons.
- What a compat knock causes (fwknop's packets, spa.server.compat) is marked
  `legacy` (a column, `legacy` at the end of its log line), counted apart
  from ours; a database an older version made gets the column when the
  daemon opens it, and readers of one it has not opened yet read 0.
- Readers in other processes open the database read-only (WAL lets them read
  while the server writes).
- No link is followed (docs/threat-model.md, "Links the service user
  plants").  SQLite opens its files by name: it opens each with O_NOFOLLOW,
  but resolves a symbolic link at the database's own name and keeps its
  -journal, -wal and -shm beside the target.  So before it opens anything,
  the database and those three names are checked with lstat through the
  directory's descriptor (absent, or a regular file with one link; the
  writer's: owned by us), and after it opened, the database it names must be
  the file at our name.  The writer also needs the directory to be ours
  (owned by our user, not writable by group or others; root writes only in
  root's).  What is left is the moment between the check and SQLite's open:
  only a process that may write in the directory can swap a name in it,
  which for the writer is its own user (or root).  A root reader in the
  service user's directory (`spa-server events`) still has that moment
  against that user; the check after the open then refuses what it found,
  and at worst SQLite made an empty -wal or -shm (O_NOFOLLOW) beside a
  WAL database of that user's choosing.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import threading
from collections.abc import Callable, Collection, Container
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spa.server.errors import LocalError
from spa.server.safefs import Directory, UnsafeFileError, check_file, open_dir, refuse_foreign_dir

EVENT_BUDGET = 50  # rows (and log lines) a second a sender without a key can cause
SOURCE_ROWS = 25  # of them, rows of single sources in a second that folds (the rest: prefixes;
# with one row per reason and two more, SOURCE_ROWS + len(Reason) + 2 <= EVENT_BUDGET)
MAX_KEYS_BUFFERED = 10_000  # distinct keys held between flushes (spoofed-source floods)
RECENT_SOURCES = 10_000  # sources that had a row of their own lately (they win ties)
# the reasons the shipped fail2ban jail bans on (contrib/fail2ban/filter.d/spa-server.conf)
BAN_REASONS = frozenset({"bad_mac", "bad_ciphertext", "malformed", "rate_limited"})
PREFIX_BITS = {4: 24, 6: 64}  # what sources fold into, by IP version
EVENTS_DB = "events.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    outcome TEXT NOT NULL,
    action TEXT,
    reason TEXT,
    client TEXT,
    source TEXT,
    service TEXT,
    duration INTEGER,
    count INTEGER NOT NULL DEFAULT 1,
    legacy INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
"""

# outcome, reason, client, source, service, legacy
Key = tuple[str, str | None, str | None, str | None, str | None, bool]
Tally = dict[Key, tuple[float, int]]  # key -> (first time, count)


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    outcome: str  # accepted | refused | lease_start | lease_end | dropped | scan
    action: str | None = None  # open | close, for accepted and refused knocks
    reason: str | None = None
    client: str | None = None
    source: str | None = None
    service: str | None = None
    duration: int | None = None
    count: int = 1
    legacy: bool = False  # caused by a compat knock (fwknop's packets)

    def log_line(self) -> str:
        """key=value, one line, fail2ban-friendly: `refused reason=replay ... src=IP`."""
        parts = [self.outcome]
        for key, value in (("action", self.action), ("reason", self.reason),
                           ("client", self.client), ("src", self.source), ("service", self.service),
                           ("duration", self.duration)):
            if value is not None:
                parts.append(f"{key}={value}")
        if self.count != 1:
            parts.append(f"count={self.count}")
        if self.legacy:
            parts.append("legacy")
        return " ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


SIDE_FILES = ("-journal", "-wal", "-shm")  # what SQLite keeps beside a database


def _check_names(directory: Directory, name: str, *, owner: int | None) -> None:
    """The database and its side files: absent, or regular files with one
    link (owned by `owner`).  Raises UnsafeFileError."""
    for each in (name, *(name + side for side in SIDE_FILES)):
        found = directory.lstat(each)
        if found is not None:
            check_file(directory.path / each, found, owner=owner)


def _check_opened(db: sqlite3.Connection, directory: Directory, name: str,
                  expected: os.stat_result) -> None:
    """After the open: SQLite's file is the one at our name.  Raises
    UnsafeFileError (and closes `db`)."""
    opened = str(db.execute("PRAGMA database_list").fetchone()[2])
    found = directory.lstat(name)
    ours = os.path.join(os.path.realpath(directory.path), name)
    if (opened != ours or found is None
            or (found.st_dev, found.st_ino) != (expected.st_dev, expected.st_ino)):
        db.close()
        raise UnsafeFileError(f"{directory.path / name} was replaced while it was being "
                              "opened (spa never follows links in its config or state "
                              "directory); stop whatever writes there")


def _connect_writer(path: Path) -> sqlite3.Connection:
    """The daemon's connection, checked as the invariants say; the store and
    its WAL files 0600 (SQLite gives the -wal and -shm files the database's
    mode; a store made by an older version may be 0644).  Raises LocalError."""
    try:
        directory = open_dir(path.parent)
    except OSError as exc:
        raise LocalError(f"cannot open the event store {path}: {exc.strerror}") from None
    with directory:
        refuse_foreign_dir(directory)
        euid = os.geteuid()
        if directory.stat.st_uid != euid or directory.stat.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeFileError(f"{directory.path} holds the event store but group or others "
                                  "may write in it, or it is not ours; fix it with: chmod 700 "
                                  f"{directory.path}")
        mine = None if euid == 0 else euid  # root writes only in root's directory
        _check_names(directory, path.name, owner=mine)
        fd = directory.open(path.name, os.O_RDWR | os.O_CREAT, 0o600, mine=True)
        try:
            opened = os.fstat(fd)
            for side in ("", "-wal", "-shm"):
                _private(directory, path.name + side)
            try:
                db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                _check_opened(db, directory, path.name, opened)
            except sqlite3.Error as exc:
                raise LocalError(f"cannot open the event store {path}: {exc}") from None
            db.execute("PRAGMA journal_mode=WAL")
            _check_names(directory, path.name, owner=mine)
        finally:
            os.close(fd)
    return db


def _private(directory: Directory, name: str) -> None:
    try:
        fd = directory.open(name, os.O_RDWR, mine=True)
    except FileNotFoundError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class EventSink:
    """Buffers events from the receive path; `flush` writes them out."""

    def __init__(self, path: Path, log: Callable[[str], None], *, retention_days: int) -> None:
        self.path = path
        self._log = log
        self._retention = retention_days * 86400.0
        self._lock = threading.Lock()
        self._rows: list[Event] = []
        self._tally: Tally = {}
        self._opened: float | None = None  # when the oldest pending key was counted
        self._second = 0  # the second of the clock whose budget `_spent` counts
        self._spent = 0
        self._recent: dict[str, None] = {}  # sources that had a row of their own, oldest first
        self._previous: frozenset[str] = frozenset()  # the sources of the last batch that folded
        self._db = _connect_writer(path)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if "legacy" not in _columns(self._db):  # a database an older version made
            self._db.execute("ALTER TABLE events ADD COLUMN legacy INTEGER NOT NULL DEFAULT 0")

    def record(self, event: Event) -> None:
        """A row of its own (accepted, lease start/end, the guard's repairs)."""
        with self._lock:
            self._rows.append(event)

    def refuse(self, now: float, reason: str, client: str | None = None,
               source: str | None = None, service: str | None = None, *,
               legacy: bool = False) -> None:
        """Count a refusal; rows are written per key, within the budget."""
        self._count(now, ("refused", reason, client, source, service, legacy), 1)

    def tally(self, event: Event) -> None:
        """Count `event` (dropped attempts, scans) like a refusal: by key,
        within the budget, its count added to the key's."""
        self._count(event.time, (event.outcome, event.reason, event.client, event.source,
                                 event.service, event.legacy), event.count)

    def _count(self, now: float, key: Key, count: int) -> None:
        with self._lock:
            tally = self._tally
            if key not in tally and len(tally) >= MAX_KEYS_BUFFERED:
                key = _coarsest(key)
            first, old = tally.get(key, (now, 0))
            tally[key] = (first, old + count)
            if self._opened is None:
                self._opened = now

    def flush(self, now: float | None = None) -> list[Event]:
        """Write what was buffered; log each row; return what was written.

        `now`: the clock, for the budget (EVENT_BUDGET rows a second across
        flushes).  None (closing, tests): everything pending, folded into
        one more batch of at most EVENT_BUDGET rows."""
        with self._lock:
            rows, self._rows = self._rows, []
            pending = self._take(now)
        events = rows + (self._budgeted(pending, now) if pending else [])
        events.sort(key=lambda e: e.time)
        if events:
            # One transaction per flush: in autocommit mode each row would be
            # its own commit (41 us a row, measured, against about 2 in one).
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO events (time, outcome, action, reason, client, source, "
                    "service, duration, count, legacy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(e.time, e.outcome, e.action, e.reason, e.client, e.source, e.service,
                      e.duration, e.count, int(e.legacy)) for e in events],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            for event in events:
                self._log(event.log_line())
        return events

    def _take(self, now: float | None) -> Tally:
        """The pending keys to write now, or nothing: while they do not fit
        in what is left of this second's budget, they wait for its end
        (caller holds the lock)."""
        if now is not None:
            second = int(now)
            if second > self._second:
                self._second, self._spent = second, 0
            elif second < self._second:  # the clock set back: what is spent stays spent
                self._second = second
            opened = self._opened
            held_over = opened is not None and int(opened) != second
            room = EVENT_BUDGET - self._spent
            if room <= 0 or (len(self._tally) > room and not held_over):
                return {}
        pending, self._tally, self._opened = self._tally, {}, None
        return pending

    def _budgeted(self, pending: Tally, now: float | None) -> list[Event]:
        """Fold `pending` into what is left of the budget (flush thread)."""
        room = EVENT_BUDGET if now is None else EVENT_BUDGET - self._spent
        events, carry = fold(pending, room, self._recent, self._previous)
        if len(pending) > room:  # a source in two folding batches running is seldom spoofed
            self._previous = frozenset(key[3] for key in pending if key[3] is not None)
        if now is None:  # closing: nothing waits
            events += _events(list(carry.items()))
        else:
            self._spent += len(events)
            if carry:
                self._wait(carry)
        recent = self._recent
        for event in events:
            if event.source is not None and "/" not in event.source:
                recent.pop(event.source, None)
                recent[event.source] = None
        while len(recent) > RECENT_SOURCES:
            del recent[next(iter(recent))]
        return events

    def _wait(self, carry: Tally) -> None:
        """What did not fit waits for the next second's budget."""
        with self._lock:
            for key, (first, count) in carry.items():
                old_first, old = self._tally.get(key, (first, 0))
                self._tally[key] = (min(first, old_first), old + count)
            opened = min(first for first, _ in carry.values())
            self._opened = opened if self._opened is None else min(opened, self._opened)

    def prune(self, now: float) -> int:
        """Delete rows older than the retention; return how many."""
        cursor = self._db.execute("DELETE FROM events WHERE time < ?", (now - self._retention,))
        return cursor.rowcount

    def close(self) -> None:
        self.flush()
        self._db.close()


def fold(pending: Tally, room: int, recent: Container[str] = (), previous: Container[str] = ()
         ) -> tuple[list[Event], Tally]:
    """At most `room` rows for `pending`, and what must wait (only when even
    one row per (outcome, reason) does not fit).  The counts of the rows and
    of what waits add up to those of `pending`.

    Past `room` keys: as many keys as rows of their own as leave the rest
    room at the prefix level; if none do, SOURCE_ROWS of them, then prefix
    rows, then one row per (outcome, reason) for the rest."""
    if len(pending) <= room:
        return _events(list(pending.items())), {}
    order = _priority(recent, previous)
    ordered = sorted(pending.items(), key=order)
    prefixed = {key: _prefixed(key) for key in pending}.__getitem__  # each source parsed once
    singles = _fits(ordered, room, prefixed)
    if singles >= 0:
        rest = _group(ordered[singles:], prefixed)
        return _events(ordered[:singles]) + _events(rest), {}
    singles = min(SOURCE_ROWS, _fits(ordered, room, _coarsest))
    if singles < 0:  # not even one row per (outcome, reason): the biggest now, the rest waits
        coarse = sorted(_group(ordered, _coarsest), key=order)
        return _events(coarse[:room]), dict(coarse[room:])
    groups = sorted(_group(ordered[singles:], prefixed), key=order)
    prefixes = _fits(groups, room - singles, _coarsest)
    return (_events(ordered[:singles]) + _events(groups[:prefixes])
            + _events(_group(groups[prefixes:], _coarsest)), {})


Item = tuple[Key, tuple[float, int]]


def _fits(ordered: list[Item], room: int, coarser: Callable[[Key], Key]) -> int:
    """The largest k such that the first k items as rows of their own and
    the rest folded by `coarser` make at most `room` rows; -1 if none."""
    best, seen = -1, set()
    for k in range(len(ordered), -1, -1):  # k + distinct(coarser(rest)) grows with k
        if k < len(ordered):
            seen.add(coarser(ordered[k][0]))
        if k + len(seen) <= room:
            best = k
            break
    return best


def _group(items: list[Item], coarser: Callable[[Key], Key]) -> list[Item]:
    grouped: Tally = {}
    for key, (first, count) in items:
        new = coarser(key)
        old_first, old = grouped.get(new, (first, 0))
        grouped[new] = (min(first, old_first), old + count)
    return list(grouped.items())


def _events(items: list[Item]) -> list[Event]:
    return [Event(first, key[0], None, *key[1:5], count=count, legacy=key[5])
            for key, (first, count) in items]


def _priority(recent: Container[str], previous: Container[str]
              ) -> Callable[[Item], tuple[int, int, int, float]]:
    """What keeps a row of its own first: the lines fail2ban's jails read
    (forgeries behind a live tag, then scans), then other refusals behind a
    live tag, then the rest; within each, the most packets first, then a
    source that had a row of its own lately, then one that was in the last
    batch that folded (a spoofed source is seldom the same twice), then the
    earliest (the sort is stable: then the first counted)."""
    def order(item: Item) -> tuple[int, int, int, float]:
        (outcome, reason, client, source, _, _), (first, count) = item
        if source is not None and outcome == "refused" and reason in BAN_REASONS:
            tier = 0
        elif source is not None and outcome == "scan":
            tier = 1
        elif outcome == "refused" and client is not None:
            tier = 2
        else:
            tier = 3
        seen = 0 if source in recent else 1 if source in previous else 2
        return (tier, -count, seen, first)
    return order


def _prefixed(key: Key) -> Key:
    """The key with its source folded into its /24 (IPv4) or /64 (IPv6)."""
    outcome, reason, client, source, service, legacy = key
    return (outcome, reason, client, prefix(source), service, legacy)


def _coarsest(key: Key) -> Key:
    return (key[0], key[1], None, None, None, key[5])


def prefix(source: str | None) -> str | None:
    """`198.51.100.0/24` for 198.51.100.7, `2001:db8::/64` for 2001:db8::7
    (a fold is never a line fail2ban bans on: <HOST> matches no prefix).
    inet_pton, not ipaddress: a fold parses up to MAX_KEYS_BUFFERED sources
    (ipaddress took 80 ms a second for 2,500 IPv6 sources)."""
    if source is None or "/" in source:
        return source
    try:
        if ":" not in source:
            return _prefix4(socket.inet_pton(socket.AF_INET, source))
        packed = socket.inet_pton(socket.AF_INET6, source)
    except OSError:
        return None
    if packed[:12] == _MAPPED:  # a dual-stack socket's IPv4 source
        return _prefix4(packed[12:])
    return f"{socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8))}/{PREFIX_BITS[6]}"


_MAPPED = bytes(10) + b"\xff\xff"


def _prefix4(packed: bytes) -> str:
    return f"{socket.inet_ntop(socket.AF_INET, packed[:3] + bytes(1))}/{PREFIX_BITS[4]}"


def _read_only(path: Path) -> sqlite3.Connection:
    """A reader's connection, checked as the invariants say.
    Raises FileNotFoundError if there is no database yet, LocalError."""
    with open_dir(path.parent) as directory:
        _check_names(directory, path.name, owner=None)
        found = directory.lstat(path.name)
        if found is None:
            raise FileNotFoundError(path)
        # as_uri escapes '?' and '#' in the path (else they would end the file name)
        where = Path(os.path.realpath(path.parent)) / path.name
        db = sqlite3.connect(f"{where.as_uri()}?mode=ro", uri=True)
        _check_opened(db, directory, path.name, found)
    return db


def _columns(db: sqlite3.Connection) -> set[str]:
    return {str(row[1]) for row in db.execute("PRAGMA table_info(events)").fetchall()}


def _fetch(path: Path, sql: str, params: tuple[object, ...]) -> list[Any]:
    """The rows of one read-only query (a database no daemon of this version
    opened yet has no `legacy` column: it reads 0).  Raises FileNotFoundError."""
    db = _read_only(path)
    try:
        if "legacy" not in _columns(db):
            sql = sql.replace("legacy", "0")
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


_COLUMNS = "time, outcome, action, reason, client, source, service, duration, count, legacy"


def _event(row: Any) -> Event:
    time_, outcome, action, reason, client, source, service, duration, count, legacy = row
    return Event(time_, outcome, action, reason, client, source, service, duration, count,
                 bool(legacy))


def read_events(path: Path, *, since: float | None = None) -> list[Event]:
    """Events from a database another process may be writing, oldest first.

    Raises FileNotFoundError if there is no database yet.
    """
    rows = _fetch(path, f"SELECT {_COLUMNS} FROM events WHERE time >= ? "  # noqa: S608
                  "ORDER BY time, id", (since if since is not None else 0.0,))
    return [_event(row) for row in rows]


def read_summary(path: Path, *, since: float = 0.0) -> list[Event]:
    """The events since `since`, summed per (UTC month, outcome, action,
    reason, client, source, service): `spa.server.admin.stats` gives the same
    report from these as from every row, in a bounded number of rows (scan
    rows, at most one per source a minute, are kept as they are, since stats
    counts them one each).  Raises FileNotFoundError."""
    rows = _fetch(
        path,
        "SELECT MIN(time), outcome, action, reason, client, source, service, NULL, "  # noqa: S608
        "SUM(count), legacy FROM events WHERE time >= ? AND outcome != 'scan' "
        "GROUP BY strftime('%Y-%m', time, 'unixepoch'), outcome, action, reason, client, "
        "source, service, legacy "
        f"UNION ALL SELECT {_COLUMNS} FROM events WHERE time >= ? AND outcome = 'scan'",
        (since, since))
    return [_event(row) for row in rows]


@dataclass(frozen=True, slots=True)
class Filter:
    """What the dashboard's activity table asks for (empty: any)."""
    since: float = 0.0
    outcome: str = ""
    client: str = ""
    reason: str = ""
    source: str = ""


def query_events(path: Path, where: Filter, *, limit: int = 500) -> list[Event]:
    """The newest `limit` events matching `where`, newest first (values are
    bound parameters, never pasted into SQL).  Raises FileNotFoundError."""
    clauses, params = ["time >= ?"], [where.since]
    for column in ("outcome", "client", "reason", "source"):
        value = getattr(where, column)
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    rows = _fetch(path, f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(clauses)} "  # noqa: S608
                  "ORDER BY time DESC, id DESC LIMIT ?", (*params, limit))
    return [_event(row) for row in rows]


def last_seen(path: Path, names: Collection[str]) -> dict[str, tuple[float, str]]:
    """client -> (time, source) of its last accepted knock, for `names` (a
    page of clients: at most SQLite's 32,766 parameters).
    Raises FileNotFoundError."""
    if not names:
        return {}
    marks = ", ".join("?" for _ in names)
    rows = _fetch(path, "SELECT client, MAX(time), source FROM events WHERE outcome = "  # noqa: S608
                  f"'accepted' AND client IN ({marks}) GROUP BY client", tuple(names))
    return {client: (when, source or "-") for client, when, source in rows}


def histogram(path: Path, *, since: float, width: float, outcomes: tuple[str, ...]
              ) -> dict[str, dict[int, int]]:
    """outcome -> {bucket index: count} for buckets of `width` seconds from
    `since` (scans count one per row; the rest by their count).
    Raises FileNotFoundError."""
    marks = ", ".join("?" for _ in outcomes)
    rows = _fetch(path,
                  "SELECT outcome, CAST((time - ?) / ? AS INTEGER) AS slot, "  # noqa: S608
                  "SUM(CASE WHEN outcome = 'scan' THEN 1 ELSE count END) FROM events "
                  f"WHERE time >= ? AND outcome IN ({marks}) GROUP BY outcome, slot",
                  (since, width, since, *outcomes))
    found: dict[str, dict[int, int]] = {name: {} for name in outcomes}
    for outcome, slot, count in rows:
        found[outcome][int(slot)] = int(count)
    return found
