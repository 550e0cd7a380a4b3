"""The event store (SQLite, WAL) and the log lines that mirror it.

Invariants (docs/threat-model.md, "Flood"; STYLE principle 4):
- The receive path only touches memory: `record` appends to a buffer under a
  lock; `flush` (housekeeping thread) writes rows and log lines.
- Refusals are aggregated per flush interval by (reason, client, source,
  service), one row with a count per key, and at most MAX_KEYS_PER_FLUSH keys;
  the rest fold into one row per reason.  Between flushes at most
  MAX_KEYS_BUFFERED keys are held (a flood from spoofed sources folds too).
  A flood of any size costs a bounded number of rows and log lines per second.
- Accepted knocks and lease starts and ends are rows of their own.
- Never a secret, never packet bytes: events carry names, addresses, reasons.
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
import sqlite3
import stat
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spa.server.errors import LocalError
from spa.server.safefs import Directory, UnsafeFileError, check_file, open_dir, refuse_foreign_dir

MAX_KEYS_PER_FLUSH = 500  # distinct refusal keys written per flush interval
MAX_KEYS_BUFFERED = 10_000  # distinct keys held between flushes (spoofed-source floods)
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
    count INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
"""

RefusalKey = tuple[str, str | None, str | None, str | None]  # reason, client, source, service


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
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            _check_opened(db, directory, path.name, opened)
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
        self._refusals: dict[RefusalKey, tuple[float, int]] = {}
        self._db = _connect_writer(path)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def record(self, event: Event) -> None:
        """A row of its own (accepted, lease start/end)."""
        with self._lock:
            self._rows.append(event)

    def refuse(self, now: float, reason: str, client: str | None = None,
               source: str | None = None, service: str | None = None) -> None:
        """Count a refusal; rows are written per key at the next flush."""
        key = (reason, client, source, service)
        with self._lock:
            refusals = self._refusals
            if key not in refusals and len(refusals) >= MAX_KEYS_BUFFERED:
                key = (reason, None, None, None)
            first, count = refusals.get(key, (now, 0))
            refusals[key] = (first, count + 1)

    def flush(self) -> list[Event]:
        """Write what was buffered; log each row; return what was written."""
        with self._lock:
            rows, self._rows = self._rows, []
            refusals, self._refusals = self._refusals, {}
        events = rows + _aggregate(refusals)
        events.sort(key=lambda e: e.time)
        if events:
            # One transaction per flush: in autocommit mode each row would be
            # its own commit (41 us a row, measured, against about 2 in one).
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO events (time, outcome, action, reason, client, source, "
                    "service, duration, count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(e.time, e.outcome, e.action, e.reason, e.client, e.source, e.service,
                      e.duration, e.count) for e in events],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            for event in events:
                self._log(event.log_line())
        return events

    def prune(self, now: float) -> int:
        """Delete rows older than the retention; return how many."""
        cursor = self._db.execute("DELETE FROM events WHERE time < ?", (now - self._retention,))
        return cursor.rowcount

    def close(self) -> None:
        self.flush()
        self._db.close()


def _aggregate(refusals: dict[RefusalKey, tuple[float, int]]) -> list[Event]:
    ordered = sorted(refusals.items(), key=lambda item: -item[1][1])
    events = [Event(first, "refused", None, *key, count=count)
              for key, (first, count) in ordered[:MAX_KEYS_PER_FLUSH]]
    folded: dict[str, tuple[float, int]] = {}
    for (reason, *_), (first, count) in ordered[MAX_KEYS_PER_FLUSH:]:
        old_first, old_count = folded.get(reason, (first, 0))
        folded[reason] = (min(first, old_first), old_count + count)
    events += [Event(first, "refused", reason=reason, count=count)
               for reason, (first, count) in folded.items()]
    return events


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


def _fetch(path: Path, sql: str, params: tuple[object, ...]) -> list[Any]:
    """The rows of one read-only query.  Raises FileNotFoundError."""
    db = _read_only(path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


_COLUMNS = "time, outcome, action, reason, client, source, service, duration, count"


def read_events(path: Path, *, since: float | None = None) -> list[Event]:
    """Events from a database another process may be writing, oldest first.

    Raises FileNotFoundError if there is no database yet.
    """
    rows = _fetch(path, f"SELECT {_COLUMNS} FROM events WHERE time >= ? "  # noqa: S608
                  "ORDER BY time, id", (since if since is not None else 0.0,))
    return [Event(*row) for row in rows]


def read_summary(path: Path, *, since: float = 0.0) -> list[Event]:
    """The events since `since`, summed per (UTC month, outcome, action,
    reason, client, source, service): `spa.server.admin.stats` gives the same
    report from these as from every row, in a bounded number of rows (scan
    rows, at most one per source a minute, are kept as they are, since stats
    counts them one each).  Raises FileNotFoundError."""
    rows = _fetch(
        path,
        "SELECT MIN(time), outcome, action, reason, client, source, service, NULL, "  # noqa: S608
        "SUM(count) FROM events WHERE time >= ? AND outcome != 'scan' "
        "GROUP BY strftime('%Y-%m', time, 'unixepoch'), outcome, action, reason, client, "
        "source, service "
        f"UNION ALL SELECT {_COLUMNS} FROM events WHERE time >= ? AND outcome = 'scan'",
        (since, since))
    return [Event(*row) for row in rows]


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
    return [Event(*row) for row in rows]


def last_seen(path: Path) -> dict[str, tuple[float, str]]:
    """client -> (time, source) of its last accepted knock.  Raises FileNotFoundError."""
    rows = _fetch(path, "SELECT client, MAX(time), source FROM events WHERE outcome = "
                  "'accepted' AND client IS NOT NULL GROUP BY client", ())
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
