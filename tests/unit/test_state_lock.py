"""One daemon per state directory: the lock in server.lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spa.server.errors import LocalError
from spa.server.state import LOCK, StateDir, describe_holder


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
    assert (tmp_path / LOCK).stat().st_mode & 0o077 == 0
    first.release()
    assert second.running_server() is None
    second.acquire(now=2000.0)
    assert first.running_server() is not None


def test_the_lock_file_is_never_followed_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / LOCK).symlink_to(target)
    with pytest.raises(LocalError, match=r"is a symbolic link .*; remove it"):
        StateDir(state).acquire(now=0.0)
    assert target.read_text() == "keep"


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
