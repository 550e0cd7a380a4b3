"""The client store: one SQLite row per client in the state directory.

Invariants (docs/threat-model.md, "The client store"):
- `clients.db` (WAL) holds every client's secret: the file, its -wal and
  -shm are 0600 and owned by the state directory's owner; the directory is
  that user's, not writable by group or others.  Anything else is refused on
  open with one LocalError line saying how to fix it.
- No link is followed: before SQLite opens anything, the database and its
  -journal, -wal and -shm are checked with lstat through the directory's
  descriptor, and after the open the database SQLite names must be the file
  at our name (the checks of spa.server.events).
- Root never writes in another user's directory as root: `open_as_owner`
  sets the effective gid and uid to the directory's owner for the whole use
  of the store (the saved uid stays 0, so it switches back).  A link the
  owner plants therefore reaches no more than the owner could reach.
- Every change is one transaction that also appends (seq, name, at) to
  `changes`; `version()` is max(seq), `changed_since(seq)` reads only the
  rows after seq.  Each single-client operation is one indexed statement
  on the primary key (O(log n)).
- A view reads only what it shows: `page` reads its page's rows (keyset
  paging on the primary key, filters in SQL), `count` and `count_by_state`
  count in SQL (index ranges on clients_state) and return no client row.
  A page with a state filter walks the names from `after` (a frequent
  state: about BY_NAME_SHARE rows looked at a row shown, more where its
  clients cluster in one stretch of names), or that state's range of
  clients_state, sorted (a rare state: under 1/BY_NAME_SHARE of the
  clients), never the whole table sorted.
  `rows_read` counts the client rows this connection turned into entries.
- A database an earlier version made gets the columns added since
  (_ADDED_COLUMNS) when it is opened, each with its default for every row
  (`sources`: '[]', anywhere), so every client keeps what it could do.
- Secrets are BLOBs; they never reach a log line or an error message
  (ClientEntry's repr hides them).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from spa.server.config import ClientEntry
from spa.server.errors import LocalError
from spa.server.events import _check_names, _check_opened, _private
from spa.server.safefs import Directory, UnsafeFileError, open_dir, user_name
from spa.store.states import COUNT_BY_STATE, NO_TIME, STATES, Activation, StateCounts

CLIENTS_DB = "clients.db"
PAGE_LIMIT_MAX = 10_000  # rows one page may ask for (the dashboard and CLI ask for 100)
FILTERS = ("", *STATES)  # page filters: all, or one state (spa.store.states)
BY_NAME_SHARE = 16  # a state filter pages by name unless under 1/16 of the clients are in it
_STREAM_BATCH = 1_000  # rows `all()` fetches at a time (bounded memory at 10^5 clients)
_PRIVATE_BITS = stat.S_IRWXG | stat.S_IRWXO  # what a secrets file must not grant

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    secret BLOB NOT NULL,
    services TEXT NOT NULL,
    allow_other_address INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    enrolled TEXT NOT NULL DEFAULT '',
    enroll_by TEXT NOT NULL DEFAULT '',
    otp_secret TEXT NOT NULL DEFAULT '',
    close_leases INTEGER NOT NULL DEFAULT 0,
    endpoint TEXT NOT NULL DEFAULT '',
    old_secret BLOB NOT NULL DEFAULT x'',
    old_until TEXT NOT NULL DEFAULT '',
    sources TEXT NOT NULL DEFAULT '[]',
    kind TEXT NOT NULL DEFAULT 'spa',
    fwknop_key BLOB NOT NULL DEFAULT x'',
    fwknop_hmac_key BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS clients_state ON clients(revoked, enroll_by, name);
"""
# columns later versions added, as a database made before them gets them on open
_ADDED_COLUMNS = (
    ("sources", "TEXT NOT NULL DEFAULT '[]'"),  # JSON list of networks (issue 15)
    ("kind", "TEXT NOT NULL DEFAULT 'spa'"),  # fwknop compatibility (issue 15)
    ("fwknop_key", "BLOB NOT NULL DEFAULT x''"),
    ("fwknop_hmac_key", "BLOB NOT NULL DEFAULT x''"),
)
_SELECT = ("SELECT name, secret, services, allow_other_address, revoked, enrolled, "
           "enroll_by, otp_secret, close_leases, endpoint, old_secret, old_until, sources, "
           "kind, fwknop_key, fwknop_hmac_key FROM clients")
_INSERT = ("INSERT INTO clients (name, secret, services, allow_other_address, revoked, "
           "enrolled, enroll_by, otp_secret, close_leases, endpoint, old_secret, old_until, "
           "sources, kind, fwknop_key, fwknop_hmac_key) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPSERT = (_INSERT + " ON CONFLICT(name) DO UPDATE SET secret = excluded.secret, "
           "services = excluded.services, allow_other_address = excluded.allow_other_address, "
           "revoked = excluded.revoked, enrolled = excluded.enrolled, "
           "enroll_by = excluded.enroll_by, otp_secret = excluded.otp_secret, "
           "close_leases = excluded.close_leases, endpoint = excluded.endpoint, "
           "old_secret = excluded.old_secret, old_until = excluded.old_until, "
           "sources = excluded.sources, "
           "kind = excluded.kind, fwknop_key = excluded.fwknop_key, "
           "fwknop_hmac_key = excluded.fwknop_hmac_key")


def _row(entry: ClientEntry) -> tuple[object, ...]:
    return (entry.name, entry.secret, json.dumps(list(entry.services)),
            int(entry.allow_other_address), int(entry.revoked), entry.enrolled,
            entry.enroll_by, entry.otp_secret, int(entry.close_leases), entry.endpoint,
            entry.old_secret, entry.old_until, json.dumps(list(entry.sources)), entry.kind,
            entry.fwknop_key, entry.fwknop_hmac_key)


_SERVICES: dict[str, tuple[str, ...]] = {}  # a services column -> its tuple, shared
_SERVICES_KEPT = 1024  # distinct combinations kept (a few in practice)


def _services(column: str) -> tuple[str, ...]:
    """The services (or sources) tuple of a row, one object per distinct
    value: 10^5 clients share a few, and each JSON parse cost 3 us at the start."""
    found = _SERVICES.get(column)
    if found is None:
        found = tuple(json.loads(column))
        if len(_SERVICES) < _SERVICES_KEPT:
            _SERVICES[column] = found
    return found


def _entry(row: tuple[Any, ...]) -> ClientEntry:
    (name, secret, services, other, revoked, enrolled, enroll_by, otp, close, endpoint,
     old_secret, old_until, sources, kind, fwknop_key, fwknop_hmac_key) = row
    return ClientEntry(str(name), bytes(secret), _services(str(services)),
                       bool(other), bool(revoked), str(enrolled), str(enroll_by), str(otp),
                       bool(close), str(endpoint), bytes(old_secret),
                       str(old_until), _services(str(sources)), str(kind), bytes(fwknop_key),
                       bytes(fwknop_hmac_key))


def _no_such(name: str) -> LocalError:
    return LocalError(f"no client named {name!r}; see the list with: spa-server clients")


class ClientStore:
    """The clients, on SQLite; one process's connection (see the invariants)."""

    def __init__(self, db: sqlite3.Connection, path: Path, fd: int) -> None:
        """`fd`: our own descriptor of the database, kept open as long as the
        connection: closing any descriptor of a file drops every POSIX lock
        this process holds on it, SQLite's too; a writer in another process
        would then take us for gone, checkpoint and delete the -wal and -shm
        under us, and this connection would never see a change again."""
        self._db = db
        self.path = path
        self._fd = fd
        self.rows_read = 0  # client rows turned into entries (get, page, all)

    # ---- opening -------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, *, create: bool) -> ClientStore:
        """The store in `state_dir`, as this process's user.  Raises
        LocalError (no store and not `create`, a link, a foreign owner, group
        or others may read or write)."""
        path = state_dir / CLIENTS_DB
        try:
            directory = open_dir(state_dir)
        except FileNotFoundError:
            raise LocalError(f"state directory {state_dir} does not exist; start the "
                             "server once or create it (mode 0700)") from None
        except OSError as exc:
            raise LocalError(f"cannot open the client store {path}: {exc.strerror}") from None
        with directory:
            _check_dir(directory)
            mine = os.geteuid()
            _check_names(directory, CLIENTS_DB, owner=mine)
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            try:
                fd = directory.open(CLIENTS_DB, flags, 0o600, mine=True)
            except FileNotFoundError:
                raise LocalError(f"no client store at {path}; run any spa-server admin "
                                 "command as root once (it creates and migrates it)") from None
            except PermissionError:
                raise LocalError(f"cannot open {path}: permission denied (run as root or "
                                 f"as {user_name(directory.stat.st_uid)})") from None
            try:
                opened = os.fstat(fd)
                if opened.st_mode & _PRIVATE_BITS:
                    raise LocalError(f"{path} holds client secrets but group or others may "
                                     f"read it; fix it with: chmod 600 {path}")
                db = _connect(path, directory, opened)
                _check_names(directory, CLIENTS_DB, owner=mine)
                for side in ("-wal", "-shm"):
                    _private(directory, CLIENTS_DB + side)
            except BaseException:
                os.close(fd)
                raise
        return cls(db, path, fd)

    @classmethod
    @contextlib.contextmanager
    def open_as_owner(cls, state_dir: Path, *, create: bool) -> Iterator[ClientStore]:
        """`open`, used as the state directory's owner: root (the admin
        commands) switches its effective ids to that user for the whole
        `with` block and back after it; anyone else, and root in its own
        directory, opens as itself.  Raises LocalError."""
        with as_owner(state_dir):
            store = cls.open(state_dir, create=create)
            try:
                yield store
            finally:
                store.close()

    def close(self) -> None:
        self._db.close()
        if self._fd >= 0:
            os.close(self._fd)  # after the connection: its locks are gone with it
            self._fd = -1

    def __enter__(self) -> ClientStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # ---- reading -------------------------------------------------------

    def get(self, name: str) -> ClientEntry | None:
        rows = self._db.execute(_SELECT + " WHERE name = ?", (name,)).fetchall()
        self.rows_read += len(rows)
        return _entry(rows[0]) if rows else None

    def count(self, *, match: str = "", state: str = "",
              activation: Activation = NO_TIME) -> int:
        """How many clients `page` would go through with these filters (all,
        without); counted in SQL.  Raises LocalError (a bad state)."""
        where, params = _filters(match, state, activation)
        query = "SELECT count(*) FROM clients WHERE " + where  # noqa: S608 (our own text)
        return int(self._db.execute(query, params).fetchall()[0][0])

    def count_by_state(self, activation: Activation) -> StateCounts:
        """Clients in each state, in one statement of index range counts."""
        row = self._db.execute(COUNT_BY_STATE, activation.params()).fetchall()[0]
        return StateCounts.of_row(row)

    def page(self, *, after: str = "", limit: int = 100, match: str = "", state: str = "",
             activation: Activation = NO_TIME) -> list[ClientEntry]:
        """Up to `limit` clients by name after `after` (keyset paging);
        `match`: a substring of the name; `state`: one of STATES as
        `activation` decides it (spa.store.states; without one, every client
        with an enroll-by time counts as pending).
        Raises LocalError (a bad state or limit)."""
        if not 1 <= limit <= PAGE_LIMIT_MAX:
            raise LocalError(f"--limit {limit}: give 1 to {PAGE_LIMIT_MAX}")
        where, params = _filters(match, state, activation)
        rare = bool(state) and state != "active" and BY_NAME_SHARE * self.count(
            state=state, activation=activation) < self.count()
        index = "clients_state" if rare else "sqlite_autoindex_clients_1"  # the names
        query = (_SELECT + " INDEXED BY " + index + " WHERE name > :after AND " + where
                 + " ORDER BY name LIMIT :limit")
        rows = self._db.execute(query, {**params, "after": after, "limit": limit}).fetchall()
        self.rows_read += len(rows)
        return [_entry(row) for row in rows]

    def of_kind(self, kind: str) -> list[ClientEntry]:
        """Every client of one kind, by name (fwknop's: at most a thousand in
        use); one pass in SQL, only those rows turned into entries."""
        rows = self._db.execute(_SELECT + " WHERE kind = ? ORDER BY name", (kind,)).fetchall()
        self.rows_read += len(rows)
        return [_entry(row) for row in rows]

    def all(self) -> Iterator[ClientEntry]:
        """Every client by name, fetched in batches (bounded memory)."""
        after = ""
        while True:
            rows = self._db.execute(_SELECT + " WHERE name > ? ORDER BY name LIMIT ?",
                                    (after, _STREAM_BATCH)).fetchall()
            self.rows_read += len(rows)
            for row in rows:
                yield _entry(row)
            if len(rows) < _STREAM_BATCH:
                return
            after = str(rows[-1][0])

    def version(self) -> int:
        """The last change's seq (0: none yet); one lookup at the end of the index."""
        # fetchall: a statement left unfinished would keep this connection's
        # read snapshot (WAL), and later polls would never see a new change
        found = self._db.execute("SELECT max(seq) FROM changes").fetchall()[0][0]
        return int(found or 0)

    def changed_since(self, seq: int) -> tuple[int, list[str]]:
        """(the version now, the names changed after `seq`, each once)."""
        rows = self._db.execute("SELECT seq, name FROM changes WHERE seq > ? ORDER BY seq",
                                (seq,)).fetchall()
        if not rows:
            return max(seq, self.version()), []
        return int(rows[-1][0]), list(dict.fromkeys(str(name) for _, name in rows))

    # ---- changing ------------------------------------------------------

    def add(self, entry: ClientEntry, *, at: float) -> None:
        """Raises LocalError if the name is taken."""
        with self._change(entry.name, at):
            try:
                self._db.execute(_INSERT, _row(entry))
            except sqlite3.IntegrityError:
                raise LocalError(f"client {entry.name!r} is already enrolled; pick another "
                                 "name or revoke it first") from None

    def put(self, entry: ClientEntry, *, at: float) -> bool:
        """Add or replace the entry (import); False: it was already so."""
        if self.get(entry.name) == entry:
            return False
        with self._change(entry.name, at):
            self._db.execute(_UPSERT, _row(entry))
        return True

    def add_many(self, entries: Iterable[ClientEntry], *, at: float) -> int:
        """Add or replace many in one transaction (migration, benchmarks);
        returns how many rows were written."""
        written = 0
        with self._transaction():
            for entry in entries:
                self._db.execute(_UPSERT, _row(entry))
                self._db.execute("INSERT INTO changes (name, at) VALUES (?, ?)",
                                 (entry.name, at))
                written += 1
        return written

    def add_missing(self, entries: Iterable[ClientEntry], *, at: float) -> int:
        """Add those whose name is not in the store, in one transaction (the
        migration: a name there keeps its entry); returns how many were added."""
        added = 0
        with self._transaction():
            for entry in entries:
                if self._db.execute(_INSERT + " ON CONFLICT(name) DO NOTHING",
                                    _row(entry)).rowcount:
                    self._db.execute("INSERT INTO changes (name, at) VALUES (?, ?)",
                                     (entry.name, at))
                    added += 1
        return added

    def set_revoked(self, name: str, *, close: bool, at: float) -> bool:
        """Mark revoked (with `close`: its leases end at once too); False:
        nothing changed.  Raises LocalError if there is no such client."""
        changed = 0
        with self._change(name, at):
            changed = self._db.execute(
                "UPDATE clients SET revoked = 1, close_leases = close_leases OR ? "
                "WHERE name = ? AND (revoked = 0 OR (? AND close_leases = 0))",
                (int(close), name, int(close))).rowcount
            if not changed:
                if self.get(name) is None:
                    raise _no_such(name)
                raise _UnchangedError
        return bool(changed)

    def set_secret(self, name: str, secret: bytes, *, old_until: str,
                   at: float) -> ClientEntry:
        """A new secret; the old one stays as old_secret until `old_until`
        (empty: dropped now).  Returns the entry as it was.
        Raises LocalError if there is no such client."""
        with self._change(name, at):
            before = self.get(name)
            if before is None:
                raise _no_such(name)
            self._db.execute(
                "UPDATE clients SET secret = ?, old_secret = ?, old_until = ? WHERE name = ?",
                (secret, before.secret if old_until else b"", old_until, name))
        return before

    def set_sources(self, name: str, sources: tuple[str, ...], *, at: float) -> bool:
        """The networks its knocks may come from (canonical, spa.core.sources;
        empty: anywhere); False: they were already these.
        Raises LocalError if there is no such client."""
        column = json.dumps(list(sources))
        changed = 0
        with self._change(name, at):
            changed = self._db.execute(
                "UPDATE clients SET sources = ? WHERE name = ? AND sources != ?",
                (column, name, column)).rowcount
            if not changed:
                if self.get(name) is None:
                    raise _no_such(name)
                raise _UnchangedError
        return bool(changed)

    def remove(self, name: str, *, at: float) -> bool:
        """Forget a client (import --prune); False: there was none."""
        removed = 0
        with self._change(name, at):
            removed = self._db.execute("DELETE FROM clients WHERE name = ?", (name,)).rowcount
            if not removed:
                raise _UnchangedError
        return bool(removed)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _change(self, name: str, at: float) -> Iterator[None]:
        """One change to `name` and its `changes` row, in one transaction
        (raising _UnchangedError inside rolls back quietly)."""
        try:
            with self._transaction():
                yield
                self._db.execute("INSERT INTO changes (name, at) VALUES (?, ?)", (name, at))
        except _UnchangedError:
            pass


def _filters(match: str, state: str, activation: Activation) -> tuple[str, dict[str, str]]:
    """The WHERE condition (and its named parameters) of `match` (a substring
    of the name, LIKE's wildcards escaped) and `state`.  Raises LocalError."""
    if state not in FILTERS:
        raise LocalError(f"--state {state!r}: choose one of {', '.join(STATES)}")
    where, params = ["1"], {}
    if match:
        escaped = match.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("name LIKE :match ESCAPE '\\'")
        params["match"] = f"%{escaped}%"
    if state:
        condition, state_params = activation.where(state)
        where.append(condition)
        params.update(state_params)
    return " AND ".join(where), params


class _UnchangedError(Exception):
    """Nothing to change: roll back without a `changes` row."""


def _check_dir(directory: Directory) -> None:
    """The state directory is ours and only ours to write.  Raises LocalError."""
    found = directory.stat
    euid = os.geteuid()
    if found.st_uid != euid:
        raise LocalError(f"{directory.path} belongs to {user_name(found.st_uid)}, not to "
                         f"{user_name(euid)} who opens the client store; run as its owner "
                         "(root does so by itself)")
    if found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise LocalError(f"{directory.path} holds the client store but group or others may "
                         f"write in it; fix it with: chmod 700 {directory.path}")


def _connect(path: Path, directory: Directory, opened: os.stat_result) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        _check_opened(db, directory, path.name, opened)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed change
        # but the last ones before a power cut; a checkpoint makes them durable
        db.executescript(_SCHEMA)
        _add_columns(db)
    except UnsafeFileError:
        raise
    except sqlite3.Error as exc:
        raise LocalError(f"cannot open the client store {path}: {exc}") from None
    return db


def _add_columns(db: sqlite3.Connection) -> None:
    """A database made before a column of _ADDED_COLUMNS existed gets it,
    with its default for every row (one transaction; another process that
    got there first leaves nothing to do)."""
    def missing() -> list[tuple[str, str]]:
        have = {str(row[1]) for row in db.execute("PRAGMA table_info(clients)").fetchall()}
        return [(name, spec) for name, spec in _ADDED_COLUMNS if name not in have]

    if not missing():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for name, spec in missing():
            db.execute(f"ALTER TABLE clients ADD COLUMN {name} {spec}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@contextlib.contextmanager
def as_owner(state_dir: Path) -> Iterator[None]:
    """Root, in a directory another user owns: effective gid, groups and uid
    become that user's inside the block (the saved uid stays 0) and root's
    again after.  Anyone else, or root's own directory: nothing changes.
    Only for single-threaded callers (the admin CLI).  Raises LocalError."""
    try:
        found = os.stat(state_dir, follow_symlinks=False)
    except FileNotFoundError:
        raise LocalError(f"state directory {state_dir} does not exist; start the server "
                         "once or create it (mode 0700)") from None
    if os.geteuid() != 0 or found.st_uid == 0:
        yield
        return
    groups, gid = os.getgroups(), os.getegid()
    os.setgroups([found.st_gid])
    os.setegid(found.st_gid)
    os.seteuid(found.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(gid)
        os.setgroups(groups)
