"""Root follows no link the service user plants (issue 13, finding 4).

The service user `spa` owns the state directory (and, for the dashboard's
revoke buttons, the config directory): it can put a symbolic link, a hard
link or a FIFO at any name there.  Root's commands and a daemon run as root
must not create, truncate or read another file through it.  Each test plants
what the finding planted and checks the file it aimed at keeps its bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.pwhash
import pytest

from spa.core.leases import LeaseTable
from spa.core.replay import ReplayCache
from spa.server import admin, webauth
from spa.server import config as config_mod
from spa.server.errors import ConfigError, LocalError
from spa.server.events import EVENTS_DB, Event, EventSink, read_events
from spa.server.state import (
    ACTIVATED,
    DROPS,
    JOURNAL,
    JOURNAL_OLD,
    LEASES,
    OTP_STEPS,
    REPLAY,
    StateDir,
)

ROOT_ONLY = b"root's own file, 36 bytes, 0600....\n"
NOBODY = 65534
LINK = r"is a symbolic link \(spa never follows links in its config or state directory\)"
CHEAP = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
         "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give files to another user")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-only file outside the directories spa uses (36 bytes, 0600)."""
    path = tmp_path / "root-only"
    path.write_bytes(ROOT_ONLY)
    path.chmod(0o600)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config in its own directory, of the version before the client
    store: alice is enrolled in it, so every admin command first moves her
    into the store (spa/store/transfer.py `migrate`), an edit of the file."""
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "server.toml"
    admin.init(path, listen_port=62201, backend="memory", state_dir=tmp_path / "state",
               force=False)
    config_mod.add_client(path, config_mod.ClientEntry(
        "alice", os.urandom(32), ("ssh",), enrolled="2026-01-01T00:00:00Z",
        endpoint="knock.example.org"))
    return path


def plant(name: Path, target: Path) -> None:
    """What the service user does: a link at `name` (replacing what is there)."""
    name.unlink(missing_ok=True)
    name.symlink_to(target)


def edits(path: Path) -> dict[str, Callable[[], object]]:
    """Every command that writes the config, as root would run it."""
    return {
        "enroll": lambda: admin.enroll(path, "bob", ["ssh"], "knock.example.org"),
        "revoke": lambda: admin.revoke(path, "alice", now=0.0),
        "rotate": lambda: admin.rotate(path, "alice", grace=0, now=0.0),
        "init": lambda: admin.init(path, listen_port=62201, backend="memory",
                                   state_dir=path.parent, force=True),
    }


# ---- the config directory --------------------------------------------------

def test_a_link_at_the_config_lock_creates_nothing(config: Path, tmp_path: Path) -> None:
    """The finding: a link at .server.toml.lock made root's enroll, revoke and
    rotate create the file it names (/etc/nologin in the reproduction)."""
    nologin = tmp_path / "nologin"
    plant(config.parent / f".{config.name}.lock", nologin)
    before = config.read_bytes()
    for name, edit in edits(config).items():
        if name == "init":
            continue  # init takes no lock
        with pytest.raises(LocalError, match=LINK):
            edit()
        assert not nologin.exists(), f"{name} created the link's target"
    assert config.read_bytes() == before


def test_root_refuses_to_write_in_a_config_directory_another_user_owns(
        config: Path, tmp_path: Path) -> None:
    """The same link, with /etc/spa owned by the service user as the
    dashboard's docs asked: root refuses before it opens anything there, in
    one line that says who owns it and what to run instead."""
    needs_root()
    nologin = tmp_path / "nologin"
    os.chown(config.parent, NOBODY, NOBODY)
    os.chown(config, NOBODY, NOBODY)
    plant(config.parent / f".{config.name}.lock", nologin)
    before = config.read_bytes()
    line = (rf"{config.parent} is owned by nobody \(uid {NOBODY}\); root will not write in a "
            r"directory another user controls: run this as nobody \(sudo -u nobody spa-server "
            rf"\.\.\.\) or make root own it \(chown root: {config.parent}\)")
    for name, edit in edits(config).items():
        with pytest.raises(LocalError, match=line):
            edit()
        assert not nologin.exists(), name
    assert config.read_bytes() == before
    assert "alice" in config_mod.load(config).clients, "reading it as root still works"


def test_a_link_or_a_hard_link_at_the_config_is_refused(config: Path, tmp_path: Path) -> None:
    """Loading the config never reads another file through its name."""
    other = tmp_path / "other"
    other.mkdir()
    link = other / "server.toml"
    link.symlink_to(config)
    with pytest.raises(ConfigError, match=LINK):
        config_mod.load(link)
    link.unlink()
    os.link(config, link)  # a hard link: another name for a file spa did not put there
    with pytest.raises(ConfigError, match="has 2 hard links"):
        config_mod.load(link)


def test_an_edit_writes_back_only_the_file_it_validated(
        config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_edit_document` read the config twice: once to validate it, once to
    edit it.  A file swapped in between (here: group-readable, with a client
    nobody enrolled) was edited and written back unchecked."""
    planted = config.read_text() + ('\n[clients.mallory]\nsecret = "' + "A" * 43 +
                                    '"\nservices = ["ssh"]\n')
    real_load = config_mod.load
    swapped: list[bool] = []

    def load_then_swap(path: Path) -> config_mod.ServerConfig:
        found = real_load(path)
        if not swapped:
            swapped.append(True)
            fresh = path.with_name("planted")
            fresh.write_text(planted)
            fresh.chmod(0o644)
            fresh.rename(path)
        return found

    monkeypatch.setattr(config_mod, "load", load_then_swap)
    with contextlib.suppress(ConfigError):  # refusing is fine; editing the planted file is not
        config_mod.set_revoked(config, "alice")
    monkeypatch.undo()
    text = config.read_text()
    if "mallory" in text:  # the planted file may stay at the name, but never edited as ours
        assert text == planted, "the planted file was edited and written back as the config"


def test_an_edit_made_meanwhile_is_never_overwritten(
        config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program (an admin's editor) saves the config between the
    edit's read and its write: the edit stops with one line and the other
    program's version stays, whole."""
    real_write = config_mod._write
    theirs = config.read_text().replace("window = 30", "window = 45")

    def write_after_them(*args: Any, **kwargs: Any) -> None:
        fresh = config.with_name("editor-save")
        fresh.write_text(theirs)
        fresh.chmod(0o600)
        fresh.rename(config)
        real_write(*args, **kwargs)

    monkeypatch.setattr(config_mod, "_write", write_after_them)
    with pytest.raises(ConfigError, match=r"changed while .*nothing was written.*again"):
        config_mod.set_revoked(config, "alice")
    assert config.read_text() == theirs


# ---- the state directory ---------------------------------------------------

def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.mark.parametrize("name", [JOURNAL, JOURNAL_OLD, REPLAY])
def test_a_link_at_the_replay_journal_truncates_nothing(
        tmp_path: Path, victim: Path, name: str) -> None:
    """The finding: a daemon run as root truncated the file a link at
    replay.journal names (a root-only 0600 file went from 36 to 0 bytes)."""
    path = state_dir(tmp_path)
    (path / name).symlink_to(victim)
    state = StateDir(path)
    cache = ReplayCache(30.0)
    with pytest.raises(LocalError, match=LINK):
        state.load_replay(30.0, now=1000.0)
    steps: list[Callable[[], None]] = [lambda: state.compact_now(cache),
                                       lambda: state.journal(cache)]
    for step in steps:
        with contextlib.suppress(LocalError):  # refused, or the link replaced: both fine
            step()
        assert victim.read_bytes() == ROOT_ONLY
    state.close()
    assert victim.stat().st_size == 36


def test_a_link_at_the_journal_creates_nothing(tmp_path: Path) -> None:
    path = state_dir(tmp_path)
    target = tmp_path / "created-by-root"
    (path / JOURNAL).symlink_to(target)
    with pytest.raises(LocalError, match=LINK):
        StateDir(path).journal(ReplayCache(30.0))
    assert not target.exists()


STATE_FILES: dict[str, tuple[bytes, Callable[[StateDir], object], Callable[[StateDir], None]]] = {
    LEASES: (json.dumps({"leases": [{"client": "a", "address": "192.0.2.1", "service": "ssh",
                                     "expires": 1.0}]}).encode(),
             StateDir.load_leases, lambda s: s.save_leases(
                 LeaseTable(), now=0.0, backend="memory", expires_by_itself=False)),
    OTP_STEPS: (b'{"version": 1, "last": {"a": 7}}', StateDir.load_otp_steps,
                lambda s: s.save_otp_steps({"a": 8})),
    ACTIVATED: (b'{"version": 1, "activated": {"a": "x"}}', StateDir.load_activated,
                lambda s: s.save_activated({"a": "y"})),
    DROPS: (b'{"version": 1, "last": [["192.0.2.1", 22, 5]]}', StateDir.load_drop_counters,
            lambda s: s.save_drop_counters({("192.0.2.1", 22): 6})),
}


@pytest.mark.parametrize("name", sorted(STATE_FILES))
def test_links_at_the_state_files_are_refused_and_replaced_not_followed(
        tmp_path: Path, name: str) -> None:
    """Leases, otp steps, activations, drop counters: a link's target (a
    root-only file that happens to parse) is never read as ours, and a save
    replaces the link instead of writing through it."""
    content, load, save = STATE_FILES[name]
    target = tmp_path / "root-only.json"
    target.write_bytes(content)
    target.chmod(0o600)
    path = state_dir(tmp_path)
    (path / name).symlink_to(target)
    state = StateDir(path)
    if name == DROPS:
        assert load(state) == {}, "a damaged drops.json is forgotten, never read through a link"
    else:
        with pytest.raises(LocalError, match=LINK):
            load(state)
    save(state)
    assert target.read_bytes() == content
    assert not (path / name).is_symlink()


def test_a_fifo_at_a_state_file_is_refused_without_blocking(tmp_path: Path) -> None:
    path = state_dir(tmp_path)
    os.mkfifo(path / LEASES)
    with pytest.raises(LocalError, match="not a regular file"):
        StateDir(path).load_leases()


def test_root_refuses_a_state_directory_another_user_owns(tmp_path: Path,
                                                          victim: Path) -> None:
    """Root (`dashboard-password`, the state's writes) on a state directory
    the service user owns: refused in one line before any write.  (`run`
    started as root takes its lock in root's own directory and becomes the
    directory's owner before it writes there: test_privsep.)"""
    needs_root()
    path = state_dir(tmp_path)
    os.chown(path, NOBODY, NOBODY)
    (path / JOURNAL).symlink_to(victim)
    state = StateDir(path)
    line = (rf"{path} is owned by nobody \(uid {NOBODY}\); root will not write in a "
            r"directory another user controls: run this as nobody")
    for step in (state.ensure, lambda: state.compact_now(ReplayCache(30.0)),
                 lambda: webauth.save(path, webauth.make_credentials("x" * 12, **CHEAP))):
        with pytest.raises(LocalError, match=line):
            step()
    with pytest.raises(LocalError, match=line):
        EventSink(path / EVENTS_DB, lambda line: None, retention_days=1)
    state.acquire(now=0.0)  # root's lock is in root's own directory, not in this one
    state.release()
    assert victim.read_bytes() == ROOT_ONLY
    assert sorted(os.listdir(path)) == [JOURNAL]
    assert state.load_leases() == [], "reading it as root still works"


def test_a_link_at_the_password_file_is_not_read(tmp_path: Path) -> None:
    """A root-only credentials file elsewhere is never taken for the
    dashboard's through a link at its name."""
    target = tmp_path / "root-only.password"
    credentials = webauth.make_credentials("x" * 12, **CHEAP)
    target.write_bytes(credentials.hash + b"\n" + credentials.key.hex().encode() + b"\n")
    target.chmod(0o600)
    path = state_dir(tmp_path)
    (path / webauth.PASSWORD_FILE).symlink_to(target)
    with pytest.raises(LocalError, match=LINK):
        webauth.load(path)


# ---- the event store -------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-journal"])
def test_links_at_the_event_store_are_refused(tmp_path: Path, victim: Path,
                                              suffix: str) -> None:
    """SQLite resolves a link at the database's name (and makes its -wal and
    -shm beside the target); the store and its side files are checked
    before SQLite opens anything."""
    path = state_dir(tmp_path)
    (path / (EVENTS_DB + suffix)).symlink_to(victim)
    with pytest.raises(LocalError, match=LINK):
        EventSink(path / EVENTS_DB, lambda line: None, retention_days=1)
    assert victim.read_bytes() == ROOT_ONLY
    assert sorted(os.listdir(tmp_path)) == ["root-only", "state"]


def test_a_link_at_the_event_store_is_not_read(tmp_path: Path) -> None:
    """`spa-server events` (and the dashboard) as root never read another
    database through a link at events.sqlite3."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sink = EventSink(elsewhere / EVENTS_DB, lambda line: None, retention_days=1)
    sink.record(Event(1.0, "accepted", client="someone-elses"))
    sink.close()
    path = state_dir(tmp_path)
    (path / EVENTS_DB).symlink_to(elsewhere / EVENTS_DB)
    with pytest.raises(LocalError, match=LINK):
        read_events(path / EVENTS_DB)


def test_the_event_store_is_refused_in_a_directory_others_may_write(tmp_path: Path) -> None:
    path = state_dir(tmp_path)
    path.chmod(0o777)
    with pytest.raises(LocalError, match="group or others may write"):
        EventSink(path / EVENTS_DB, lambda line: None, retention_days=1)
    assert not (path / EVENTS_DB).exists()


def test_the_event_store_still_works(tmp_path: Path) -> None:
    path = state_dir(tmp_path)
    sink = EventSink(path / EVENTS_DB, lambda line: None, retention_days=1)
    sink.record(Event(1.0, "accepted", client="alice"))
    sink.flush()
    assert [e.client for e in read_events(path / EVENTS_DB)] == ["alice"]
    sink.close()
    again = EventSink(path / EVENTS_DB, lambda line: None, retention_days=1)
    again.close()
    assert isinstance(sqlite3.connect(path / EVENTS_DB), sqlite3.Connection)
