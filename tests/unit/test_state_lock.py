"""One daemon per state directory: the lock in server.lock."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from spa.server import state as state_mod
from spa.server.errors import LocalError
from spa.server.state import LOCK, StateDir, describe_holder, lock_name

NOBODY = 65534


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    first, second = StateDir(tmp_path), StateDir(tmp_path)
    first.ensure()
    assert second.running_server() is None
    first.acquire(now=1000.0)
    first.write_server({"pid": os.getpid(), "started": 1000.0, "port": 62201})
    with pytest.raises(LocalError, match=rf"already running on {tmp_path} \(pid {os.getpid()}, "
                       r"up 2m05s\); stop it first"):
        second.acquire(now=1125.0)
    assert second.running_server() == {"pid": os.getpid(), "started": 1000.0, "port": 62201}
    assert first.lock_file.stat().st_mode & 0o022 == 0
    first.release()
    assert second.running_server() is None
    second.acquire(now=2000.0)
    assert first.running_server() is not None


def test_the_lock_file_is_never_followed_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    lock = StateDir(state).lock_file
    lock.symlink_to(target)
    try:
        with pytest.raises(LocalError, match=r"is a symbolic link .*; remove it"):
            StateDir(state).acquire(now=0.0)
    finally:
        lock.unlink()
    assert target.read_text() == "keep"


def test_root_locks_in_its_own_directory_and_both_kinds_refuse_each_other(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Root never opens a lock file in a state directory another user owns
    (a link may be planted there): it locks in RUN_DIR, root's; a daemon run
    as the service user locks in the state directory; each sees the other."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a second process as another user")
    base = Path(tempfile.mkdtemp(prefix="spa-lock-"))  # nobody must reach it: not tmp_path
    base.chmod(0o755)
    request_cleanup(base)
    run = base / "run"
    monkeypatch.setattr(state_mod, "RUN_DIR", run)
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    root = StateDir(state)
    root.acquire(now=1000.0)
    assert root.lock_file == run / lock_name(state)
    assert os.listdir(state) == [], "nothing written in the state directory"
    assert run.stat().st_uid == 0 and run.stat().st_mode & 0o777 == 0o755
    assert as_nobody(state, hold=False) == "refused: already running", "nobody sees root's"
    root.release()
    assert not (run / lock_name(state)).exists()
    ready, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the service user's daemon holds the state directory's lock
        code = 1
        try:
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            service = StateDir(state)
            service.acquire(now=2000.0)
            code = 0 if service.lock_file == state / LOCK else 3
            os.write(ready[1], b"x")
            os.read(release[0], 1)
        finally:
            os._exit(code)
    os.read(ready[0], 1)
    try:
        with pytest.raises(LocalError, match="already running"):
            StateDir(state).acquire(now=2001.0)
        assert StateDir(state).running_server() is not None
    finally:
        os.write(release[1], b"x")
        assert os.waitpid(pid, 0)[1] == 0


def request_cleanup(path: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, path, True)


def as_nobody(state: Path, *, hold: bool) -> str:
    """What `acquire` says in a child run as nobody."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            StateDir(state).acquire(now=1001.0)
            os.write(write, b"acquired")
        except LocalError as exc:
            os.write(write, b"refused: already running" if "already running" in str(exc)
                     else str(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    return os.read(read, 4096).decode()


def test_describe_holder() -> None:
    assert describe_holder({"pid": 7, "started": 0.0}, 7384.0) == "pid 7, up 2h03m04s"
    assert describe_holder({}, 0.0) == "pid unknown"


def test_the_event_store_and_its_wal_files_are_private(tmp_path: Path) -> None:
    """From the adversarial review: events.sqlite3 and its -wal and -shm
    files were 0644 (the 0700 directory kept others out; the files say so
    themselves now), and a store an older version left 0644 is made 0600."""
    from spa.server.events import Event, EventSink

    path = tmp_path / "events.sqlite3"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    sink = EventSink(path, lambda line: None, retention_days=1)
    sink.record(Event(1.0, "accepted"))
    sink.flush()
    for name in ("events.sqlite3", "events.sqlite3-wal", "events.sqlite3-shm"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    sink.close()
