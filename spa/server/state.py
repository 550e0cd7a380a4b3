"""The state directory: leases, the replay cache, and who is running.

Invariants:
- The replay cache survives restarts: a full dump (`replay.bin`) plus an
  append-only journal of every entry made since (`replay.journal`), written
  with one os.write per entry on the receive path (no fsync: it survives a
  killed daemon, which is the case that matters; a power loss also drops the
  firewall's state).  A compaction snapshots the cache and rotates the
  journal on the receive thread (`rotate_journal`), then writes the snapshot
  and drops the old journal elsewhere (`finish_compaction`): at every moment
  each entry is in a dump or a journal that `load_replay` reads.
- `leases.json` is replaced atomically, so `spa-server status` in another
  process always reads a whole file.
- `trust.json` keeps the sources each client authenticated from (bounded,
  with their expiry), so a restart does not leave known clients open to a
  flood of their own tag; a damaged one is said and forgotten, never fatal.
- Files are 0600 and the directory 0700.
- No link is followed (docs/threat-model.md, "Links the service user
  plants"): every file is opened relative to the directory's descriptor with
  O_NOFOLLOW and checked by fstat (spa.server.safefs); a root process writes
  here only if root owns the directory (`ensure` and every write refuse
  otherwise, in one line), reading stays allowed.
- One daemon per state directory: it holds an exclusive flock on
  `server.lock` for its whole life (the kernel drops it when the process
  ends, even by kill -9), and keeps its pid, start time, port and backend in
  that file.  A second daemon is refused before it touches the firewall;
  `running_server` asks the lock, not a pid that may have been reused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from spa.clitools import format_utc
from spa.core.errors import FormatError
from spa.core.leases import Lease, LeaseTable
from spa.core.replay import ReplayCache, entry_bytes
from spa.core.wire import IPAddress
from spa.server.errors import LocalError
from spa.server.safefs import Directory, open_dir, refuse_foreign_dir

LEASES = "leases.json"
REPLAY = "replay.bin"
JOURNAL = "replay.journal"
JOURNAL_OLD = "replay.journal.old"  # being compacted: covered by no dump yet
LOCK = "server.lock"  # held by the running daemon; holds its pid, start, port, backend
RUN_DIR = Path("/run/spa")  # root's daemons lock here (root-owned), never in the state dir
OTP_STEPS = "otp.json"  # the last authenticator-code time step each client used
DROPS = "drops.json"  # the drop counters' last reading: (source, port) -> packets
ACTIVATED = "activated.json"  # pending enrollments used in time: name -> the enroll_by it met
TRUST = "trust.json"  # (client, source, until) the forged-packet limiter trusts (spa.core.limits)
MAX_TRUST_ROWS = 65_536  # rows read from it at most (16 per client are kept)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PairStatus:
    address: str
    service: str
    clients: list[str]
    seconds_left: float


class StateDir:
    def __init__(self, path: Path, *, replay: str = "replay") -> None:
        """`replay`: the replay cache's file names' stem (the compat
        listener keeps its own cache beside ours: spa.server.compat)."""
        self._replay, self._journal_name = f"{replay}.bin", f"{replay}.journal"
        self._journal_old = f"{replay}.journal.old"
        self.path = path  # what messages name, and what the lock's name comes from
        self.files = path  # where its files are opened: "." once pinned
        self._journal_fd: int | None = None
        self._lock_fd: int | None = None
        self._lock_place: _Place | None = None
        self._here_fd: int | None = None  # root's daemon, once it runs as the directory's owner
        self.journal_error: str | None = None

    def pin(self) -> None:
        """Make the directory this process's working directory, and open
        every file relative to it from now on: the daemon, once it runs as a
        service user, need not search the directories above it (a private
        one, like a test's temporary directory, is root's 0700).  Raises
        LocalError."""
        try:
            with open_dir(self.path) as directory:
                os.fchdir(directory.fd)
        except OSError as exc:
            raise LocalError(f"cannot enter state directory {self.path}: {exc.strerror}"
                             ) from None
        self.files = Path(".")

    def ensure(self) -> None:
        """Create the directory (0700), or check it is one this process may
        write in (see `refuse_foreign_dir`).  Raises LocalError."""
        with self._writing() as directory:
            os.fchmod(directory.fd, 0o700)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Directory]:
        """The directory, open to write in (made if missing).  Raises LocalError."""
        try:
            directory = open_dir(self.files, create=True)
        except PermissionError:
            raise LocalError(f"cannot create state directory {self.path}: permission denied "
                             "(run as root, or set state_dir in the config)") from None
        except OSError as exc:
            raise LocalError(f"cannot create state directory {self.path}: {exc.strerror}") from None
        with directory:
            refuse_foreign_dir(directory)
            yield directory

    def _read(self, name: str) -> bytes | None:
        """A file's bytes (None: no such file, or no directory yet).  Raises LocalError."""
        try:
            with open_dir(self.files) as directory:
                return directory.read(name)[0]
        except FileNotFoundError:
            return None
        except PermissionError:
            raise LocalError(f"cannot read {self.path / name}: permission denied "
                             "(run as root?)") from None
        except OSError as exc:
            raise LocalError(f"cannot read {self.path / name}: {exc.strerror}") from None

    def _save(self, name: str, data: bytes) -> None:
        """Replace a file atomically (0600).  Raises LocalError, OSError."""
        with self._writing() as directory:
            directory.replace(name, data)

    # ---- replay cache ------------------------------------------------------

    def load_replay(self, window: float, now: float) -> ReplayCache:
        """The saved cache, or an empty one.  Raises LocalError if damaged."""
        dump = self._read(self._replay)
        if dump is None:
            dump = ReplayCache(window).dump()
        journal = b"".join(self._read(name) or b""  # older records first
                           for name in (self._journal_old, self._journal_name))
        try:
            cache = ReplayCache.load(dump, now, journal=journal, window=window)
        except FormatError as exc:
            raise LocalError(f"{self.path / self._replay}: {exc}; remove it only if the server has "
                             "been stopped for longer than the time window") from None
        return cache

    def journal(self, cache: ReplayCache) -> None:
        """Append every new replay entry to the journal from now on.

        A failed write (a full disk) does not stop the receive path: the
        in-memory cache still protects the running server; `journal_error`
        says what happened so the daemon can log it and compact.
        """
        self._open_journal()

        def append(expiry: float, client: str, nonce: bytes) -> None:
            try:
                if self._journal_fd is not None:
                    os.write(self._journal_fd, entry_bytes(expiry, client, nonce))
            except OSError as exc:
                self.journal_error = exc.strerror or str(exc)

        cache.on_add = append

    def _open_journal(self, directory: Directory | None = None) -> None:
        if directory is None:
            with self._writing() as directory:
                self._open_journal(directory)
            return
        self._journal_fd = directory.open(self._journal_name,
                                          os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600,
                                          mine=True)

    def compact_now(self, cache: ReplayCache) -> None:
        """Dump and empty the journals (only while nothing else adds entries:
        at start, at shutdown)."""
        with self._writing() as directory:
            directory.replace(self._replay, cache.dump())
            for name in (self._journal_old, self._journal_name):
                directory.truncate(name)

    def rotate_journal(self, cache: ReplayCache) -> bytes | None:
        """Receive thread: snapshot the cache and start a new journal, so that
        every entry is in the snapshot or in a journal at every moment.  The
        snapshot is written by `finish_compaction` (another thread).  None if
        the previous compaction has not finished."""
        with self._writing() as directory:
            if directory.lstat(self._journal_old) is not None:
                return None
            snapshot = cache.dump()
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
            directory.rename(self._journal_name, self._journal_old)
            self._open_journal(directory)
        return snapshot

    def finish_compaction(self, snapshot: bytes) -> None:
        """Write the snapshot, then drop the journal it covers."""
        with self._writing() as directory:
            directory.replace(self._replay, snapshot)
            directory.unlink(self._journal_old)

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    # ---- leases ------------------------------------------------------------

    def save_leases(self, table: LeaseTable, *, now: float, backend: str,
                    expires_by_itself: bool) -> None:
        data = {
            "version": 1,
            "updated": now,
            "backend": backend,
            "expires_by_itself": expires_by_itself,
            "leases": [_lease_out(lease) for lease in table.leases()],
        }
        self._save(LEASES, json.dumps(data, indent=1).encode())

    def load_leases(self) -> list[Lease]:
        """Saved leases (expired ones included).  Raises LocalError if damaged."""
        data = self._read_json(LEASES)
        if data is None:
            return []
        try:
            return [Lease(item["client"], ipaddress.ip_address(item["address"]),
                          item["service"], float(item["expires"]),
                          _destination_in(item.get("destination")))
                    for item in data["leases"]]
        except (KeyError, TypeError, ValueError):
            raise LocalError(f"{self.path / LEASES} is damaged; stop the server and "
                             "remove it (live grants are then forgotten)") from None

    def save_activated(self, activated: dict[str, str]) -> None:
        self._save(ACTIVATED, json.dumps({"version": 1, "activated": activated}).encode())

    def load_activated(self) -> dict[str, str]:
        """name -> the enroll_by its first knock met.  Raises LocalError if damaged."""
        return self._load_map(ACTIVATED, "activated", str,
                              "pending clients that knocked must be enrolled again")

    def save_drop_counters(self, counters: dict[tuple[str, int], int]) -> None:
        rows = [[source, port, count] for (source, port), count in counters.items()]
        self._save(DROPS, json.dumps({"version": 1, "last": rows}).encode())

    def load_drop_counters(self) -> dict[tuple[str, int], int]:
        """The last reading, so a restart counts only what is new.  A damaged
        file is forgotten (the next reading then counts from the kernel's
        totals once), never fatal."""
        try:
            data = self._read_json(DROPS)
            rows = data["last"] if isinstance(data, dict) else []
            return {(str(source), int(port)): int(count) for source, port, count in rows}
        except (LocalError, KeyError, TypeError, ValueError):
            return {}

    def save_trust(self, entries: list[tuple[str, str, float]]) -> None:
        rows = [[client, source, until] for client, source, until in entries[-MAX_TRUST_ROWS:]]
        self._save(TRUST, json.dumps({"version": 1, "trusted": rows}).encode())

    def load_trust(self) -> list[tuple[str, str, float]]:
        """Saved (client, source, until) rows, at most MAX_TRUST_ROWS (the
        latest).  Raises LocalError if damaged."""
        data = self._read_json(TRUST)
        if data is None:
            return []
        rows = data.get("trusted") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not all(
                isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and isinstance(row[1], str) and type(row[2]) in (int, float) for row in rows):
            raise LocalError(f"{self.path / TRUST} is damaged")
        return [(client, source, float(until)) for client, source, until in rows[-MAX_TRUST_ROWS:]]

    def save_otp_steps(self, steps: dict[str, int]) -> None:
        self._save(OTP_STEPS, json.dumps({"version": 1, "last": steps}).encode())

    def load_otp_steps(self) -> dict[str, int]:
        """client -> last used code step.  Raises LocalError if damaged."""
        return self._load_map(OTP_STEPS, "last", int,
                              "codes used in the last minute could then be used again")

    def _load_map(self, name: str, key: str, kind: type[T], loss: str) -> dict[str, T]:
        """The {str: kind} map under `key` in a small JSON state file."""
        data = self._read_json(name)
        if data is None:
            return {}
        found = data.get(key) if isinstance(data, dict) else None
        if not isinstance(found, dict) or not all(
                isinstance(k, str) and type(v) is kind for k, v in found.items()):
            raise LocalError(f"{self.path / name} is damaged; stop the server and remove it "
                             f"({loss})")
        return found

    def status(self, now: float) -> list[PairStatus]:
        """Active leases grouped by (address, service), soonest end first."""
        pairs: dict[tuple[str, str], dict[str, float]] = {}
        for lease in self.load_leases():
            if lease.expires > now:
                pairs.setdefault((str(lease.address), lease.service), {})[lease.client] = (
                    lease.expires)
        rows = [PairStatus(address, service, sorted(holders), max(holders.values()) - now)
                for (address, service), holders in pairs.items()]
        return sorted(rows, key=lambda row: (row.seconds_left, row.address, row.service))

    # ---- the running server ------------------------------------------------

    def acquire(self, now: float) -> None:
        """Become the one daemon of this state directory, for the life of the
        process (idempotent).  Raises LocalError naming the running one.

        Root locks in RUN_DIR, a directory root owns (never a file in a
        directory the service user could plant a link in); anyone else in
        the state directory itself.  Each also looks at the other place, so
        a daemon run by hand as root and one run by systemd as `spa` refuse
        each other."""
        if self._lock_fd is not None:
            return
        mine, other = self._lock_places()
        fd = self._locked_fd(mine, now)
        try:
            holder = _held(other)  # cannot tell: refused, never a second daemon
        except LocalError:
            os.close(fd)
            raise
        if holder is not None:
            os.close(fd)
            raise self._running_error(holder, now)
        self._lock_fd, self._lock_place = fd, mine
        self.write_server({"pid": os.getpid(), "started": now})

    def _lock_places(self) -> tuple[_Place, _Place]:
        """(where this process locks, where the other kind of daemon does)."""
        run = _Place(RUN_DIR, lock_name(self.path), run_dir=True)
        here = _Place(self.files, LOCK)
        return (run, here) if os.geteuid() == 0 else (here, run)

    def _running_error(self, holder: dict[str, Any], now: float) -> LocalError:
        who = describe_holder(holder, now)
        return LocalError(f"spa-server is already running on {self.path} ({who}); stop "
                          "it first (systemctl stop spa-server), or give this one its "
                          "own state_dir")

    def _locked_fd(self, place: _Place, now: float) -> int:
        """The lock file, opened and locked, and still the file at its name
        (one removed or replaced between our open and our lock would let a
        second daemon lock another file).  Raises LocalError."""
        for _ in range(5):
            fd = self._open_lock(place, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                held = exc.errno in (errno.EAGAIN, errno.EACCES)
                holder = _read_lock(fd) if held else None
                os.close(fd)
                if not held:
                    raise LocalError(f"cannot lock {place.file}: {exc.strerror}") from None
                raise self._running_error(holder or {}, now) from None
            if place.holds(fd):
                return fd
            os.close(fd)
        raise LocalError(f"{place.file} keeps being replaced by another program; stop it")

    def lock_here_too(self, now: float) -> None:
        """After the daemon dropped from root to the state directory's owner:
        lock the state directory's own place as well (as its owner, no link
        of another user's can be there), so that a second daemon is refused
        even if root's lock in RUN_DIR is removed.  Raises LocalError."""
        place = _Place(self.files, LOCK)
        if self._lock_place is None or not self._lock_place.run_dir or self._here_fd is not None:
            return
        self._here_fd = self._locked_fd(place, now)
        os.ftruncate(self._here_fd, 0)
        os.pwrite(self._here_fd, json.dumps({"pid": os.getpid(), "started": now}).encode(), 0)

    def keep_lock(self) -> str | None:
        """Housekeeping: if another program removed or replaced our lock
        file (so that a second daemon could start), take the file at the
        name again and say so; None when all is well.  Raises LocalError
        when a second daemon holds the new file."""
        fd, place = self._lock_fd, self._lock_place
        if fd is None or place is None or place.holds(fd):
            return None
        if place.run_dir and os.geteuid() != 0:
            # started as root, now the state directory's owner: it cannot make
            # the file again in root's directory; only root could remove it,
            # and the state directory's lock still keeps a second daemon out
            self._lock_place = None
            kept = ("the state directory's lock still keeps a second daemon out"
                    if self._here_fd is not None else "a second daemon could start")
            return f"{place.file} was removed (by root: nobody else can); {kept}"
        facts = _read_lock(fd) or {}
        new = self._locked_fd(place, time.time())  # raises: a second daemon took it meanwhile
        os.close(fd)
        self._lock_fd = new
        self.write_server(facts)
        return f"{place.file} was removed or replaced by another program; locked again"

    def _open_lock(self, place: _Place, flags: int) -> int:
        """Raises FileNotFoundError (no O_CREAT, no file), LocalError."""
        if not flags & os.O_CREAT:
            with open_dir(place.directory) as directory:
                return _open_lock_in(place, directory, flags)
        if place.run_dir:
            with _run_dir() as directory:
                return _open_lock_in(place, directory, flags)
        with self._writing() as directory:
            return _open_lock_in(place, directory, flags)

    def write_server(self, info: dict[str, Any]) -> None:
        """Record the running daemon's facts in its lock file (holder only)."""
        fd = self._lock_fd
        if fd is None:
            return
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        """Give up the lock (at shutdown: the last thing the daemon does).
        In RUN_DIR the file goes too (while still locked: whoever opened it
        meanwhile finds it is no longer at its name, and takes a new one)."""
        fd, self._lock_fd = self._lock_fd, None
        place, self._lock_place = self._lock_place, None
        here, self._here_fd = self._here_fd, None
        if here is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(here, 0)
            os.close(here)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                if place is not None and place.run_dir and place.holds(fd):
                    os.unlink(place.file)
            os.close(fd)

    def release_copy(self) -> None:
        """In a forked child: close its copy of the lock's descriptor without
        unlocking it (the parent keeps the lock; flock is per open file)."""
        fd, self._lock_fd = self._lock_fd, None
        self._lock_place = None
        if fd is not None:
            os.close(fd)

    @property
    def lock_file(self) -> Path:
        """Where this process locks (see `acquire`)."""
        return self._lock_places()[0].file

    def running_server(self) -> dict[str, Any] | None:
        """The running daemon's facts (pid, started, port, backend, mode), or
        None when no process holds the lock (in either place).  Raises
        LocalError if unreadable."""
        if self._lock_fd is not None:
            return _read_lock(self._lock_fd)
        found = None
        for place in self._lock_places():
            found = _held(place)
            if found is not None:
                return found
        return found

    def backend_info(self) -> dict[str, Any]:
        data = self._read_json(LEASES) or {}
        return {"backend": data.get("backend"), "expires_by_itself": data.get("expires_by_itself")}

    def _read_json(self, name: str) -> Any:
        raw = self._read(name)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LocalError(f"{self.path / name} is damaged (not JSON)") from None


def _lease_out(lease: Lease) -> dict[str, Any]:
    """A lease in leases.json; a named gateway service's with the address
    its grant resolved (a restart opens exactly that again)."""
    item: dict[str, Any] = {"client": lease.client, "address": str(lease.address),
                            "service": lease.service, "expires": lease.expires}
    if lease.destination is not None:
        item["destination"] = str(lease.destination)
    return item


def _destination_in(value: object) -> IPAddress | None:
    """A saved lease's destination.  Raises ValueError for one not an address."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("a destination is an address")
    return ipaddress.ip_address(value)


def lock_name(state_dir: Path) -> str:
    """The lock's name in RUN_DIR for a state directory (one per directory)."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:16]
    return f"{digest}.lock"


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a daemon's lock file lives."""

    directory: Path
    name: str
    run_dir: bool = False

    @property
    def file(self) -> Path:
        return self.directory / self.name

    def holds(self, fd: int) -> bool:
        """Whether `fd` is still the file at the name."""
        try:
            named = os.stat(self.file, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def _run_dir() -> Iterator[Directory]:
    """RUN_DIR, made if missing (0755, root's), refused unless root owns it
    and nobody else may write in it.  Raises LocalError."""
    try:
        directory = open_dir(RUN_DIR, create=True)
    except OSError as exc:
        raise LocalError(f"cannot make {RUN_DIR}: {exc.strerror}") from None
    with directory:
        st = directory.stat
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise LocalError(f"{RUN_DIR} must be root's and writable by root alone "
                             f"(chown root: {RUN_DIR}; chmod 0755 {RUN_DIR})")
        os.fchmod(directory.fd, 0o755)
        yield directory


def _open_lock_in(place: _Place, directory: Directory, flags: int) -> int:
    """Root's lock in RUN_DIR is 0644 (a pid and times, no secret), so a
    daemon run as the service user can see that root's holds it."""
    mode = 0o644 if place.run_dir else 0o600
    try:
        fd = directory.open(place.name, flags, mode, mine=bool(flags & os.O_CREAT))
        if place.run_dir and flags & os.O_CREAT:
            os.fchmod(fd, mode)  # whatever the umask (the unit's is 0077)
        return fd
    except FileNotFoundError:
        raise
    except PermissionError:
        raise LocalError(f"cannot open {place.file}: permission denied (run as root?)") from None
    except OSError as exc:
        raise LocalError(f"cannot open {place.file}: {exc.strerror}") from None


def _held(place: _Place) -> dict[str, Any] | None:
    """The facts of the daemon holding the lock at `place`, or None when
    nobody does.  Raises LocalError if unreadable."""
    try:
        with open_dir(place.directory) as directory:
            fd = _open_lock_in(place, directory, os.O_RDONLY)
    except FileNotFoundError:
        return None  # never started there
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise LocalError(f"cannot read {place.file}: {exc.strerror}") from None
        return _read_lock(fd) or {"pid": None}
    else:
        return None  # nobody holds it: not running
    finally:
        os.close(fd)


def _read_lock(fd: int) -> dict[str, Any] | None:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe_holder(info: dict[str, Any], now: float) -> str:
    """'pid 1234, up 2h03m' for a lock holder's facts."""
    pid = info.get("pid")
    started = info.get("started")
    where = f"pid {pid}" if isinstance(pid, int) else "pid unknown"
    if isinstance(started, int | float):
        where += f", up {format_span(now - started)}"
    return where


def format_span(seconds: float) -> str:
    """A duration as 2h03m05s, 4m09s or 12s."""
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


FILTERS = {  # a daemon's "filter" fact -> what `status` and `check` say of it
    "ebpf map": "eBPF map of every live knock tag (junk never wakes the daemon)",
    "classic": "classic socket filter on every live knock tag (up to ~200 clients)",
    "port-only": "none on tags (too many clients for a classic filter): every datagram "
                 "to the knock port reaches the daemon",
}


def describe_filter(kind: object) -> str:
    """`status`'s line on the kernel's knock filter, from the daemon's facts."""
    if not isinstance(kind, str):
        return "unknown (a daemon from before this version)"
    return FILTERS.get(kind, kind)


def describe_group(group: object) -> str | None:
    """`status`'s line on the group a member belongs to, from the daemon's
    facts (spa.group.link: GroupLink.facts); None for a standalone server."""
    if not isinstance(group, dict):
        return None
    line = (f"member {group.get('member')} of group {group.get('name')}, "
            f"{group.get('clients')} of the group's clients")
    line += (f" (read at revision {group.get('revision')})" if group.get("read")
             else " (the group not read yet)")
    if group.get("etcd") == "unreachable":
        return line + ("; etcd UNREACHABLE: new grants for the group's clients "
                       + ("go on this member's replay cache alone (local_only)"
                          if group.get("on_store_down") == "local_only" else "are refused"))
    return line + "; etcd answering"


def describe_gate(gate: object, *, hold: object = False) -> str:
    """`status`'s line on the firewall gate, from the daemon's facts."""
    if not isinstance(gate, dict):
        return "unknown (a daemon from before this version)"
    how = ("watched: put back within milliseconds of a change by another program"
           if gate.get("watched") else "checked every 0.4 s by the daemon")
    if hold:  # its name (True from a daemon before instances: the default's)
        how += (f", and held meanwhile by the daemon's own table inet "
                f"{hold if isinstance(hold, str) else 'spa_hold'}")
    at = gate.get("at")
    when = (format_utc(at) if isinstance(at, int | float) and at else "")
    state, last, repairs = gate.get("state"), gate.get("last"), gate.get("repairs", 0)
    if state == "failing":
        return f"FAILING since {when}: {last} (knocks may be accepted while nothing opens)"
    if state == "restored":
        return (f"ok, {how}; restored {repairs} time{'' if repairs == 1 else 's'}, last at "
                f"{when}: {last}")
    return f"ok, {how}"



