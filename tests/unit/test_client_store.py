"""The client store (spa/store/clients.py): its API, its permissions, no
link followed, root writing as the state directory's owner, the migration
out of server.toml and export / import (spa/store/transfer.py)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.server import admin
from spa.server import config as config_mod
from spa.server.config import ClientEntry
from spa.server.errors import LocalError
from spa.store import transfer
from spa.store.clients import CLIENTS_DB, ClientStore, as_owner
from spa.store.states import STATES, Activation, StateCounts

NOBODY = 65534
NOGROUP = 65534
SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))


def entry(name: str, **kw: object) -> ClientEntry:
    return ClientEntry(name, kw.pop("secret", SECRET), ("ssh",), **kw)  # type: ignore[arg-type]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def store(state: Path) -> Iterator[ClientStore]:
    with ClientStore.open(state, create=True) as opened:
        yield opened


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")


@pytest.fixture
def nobody_state() -> Iterator[Path]:
    """A state directory owned by nobody (0700) under a root directory others may enter."""
    needs_root()
    top = Path(tempfile.mkdtemp(prefix="spa-store-", dir="/tmp"))
    top.chmod(0o711)
    state = top / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOGROUP)
    yield state
    shutil.rmtree(top)


def test_add_get_count_and_the_name_taken(store: ClientStore) -> None:
    store.add(entry("alice", otp_secret="JBSWY3DPEHPK3PXP"), at=1.0)
    assert store.get("alice") == entry("alice", otp_secret="JBSWY3DPEHPK3PXP")
    assert store.get("bob") is None
    assert store.count() == 1
    with pytest.raises(LocalError, match="already enrolled"):
        store.add(entry("alice"), at=2.0)
    assert store.version() == 1  # the refused add left no change row


def test_revoke_rotate_remove_and_the_changes_since(store: ClientStore) -> None:
    store.add(entry("alice"), at=1.0)
    store.add(entry("bob"), at=1.0)
    seen = store.version()
    assert store.set_revoked("alice", close=False, at=2.0)
    assert not store.set_revoked("alice", close=False, at=2.0)  # already: no change
    assert store.set_revoked("alice", close=True, at=3.0)  # --close still closes
    assert store.get("alice") == entry("alice", revoked=True, close_leases=True)
    before = store.set_secret("bob", OTHER, old_until="2030-01-01T00:00:00Z", at=4.0)
    assert before == entry("bob")
    assert store.get("bob") == entry("bob", secret=OTHER, old_secret=SECRET,
                                     old_until="2030-01-01T00:00:00Z")
    store.set_secret("bob", SECRET, old_until="", at=5.0)
    assert store.get("bob") == entry("bob")
    version, names = store.changed_since(seen)
    assert names == ["alice", "bob"] and version == store.version() == seen + 4
    assert store.changed_since(version) == (version, [])
    assert store.remove("bob", at=6.0) and not store.remove("bob", at=6.0)
    assert store.changed_since(version) == (version + 1, ["bob"])
    for call in (lambda: store.set_revoked("carol", close=False, at=7.0),
                 lambda: store.set_secret("carol", SECRET, old_until="", at=7.0)):
        with pytest.raises(LocalError, match="no client named 'carol'"):
            call()


def test_set_sources_writes_one_change_and_only_when_they_differ(store: ClientStore) -> None:
    store.add(entry("alice"), at=1.0)
    seen = store.version()
    nets = ("203.0.113.0/24", "2001:db8::/48")
    assert store.set_sources("alice", nets, at=2.0)
    assert store.get("alice") == entry("alice", sources=nets)
    assert not store.set_sources("alice", nets, at=3.0)  # already: no change row
    assert store.set_sources("alice", (), at=4.0)
    assert store.get("alice") == entry("alice")
    assert store.changed_since(seen) == (seen + 2, ["alice"])
    with pytest.raises(LocalError, match="no client named 'carol'"):
        store.set_sources("carol", nets, at=5.0)


OLD_STORE = Path(__file__).resolve().parents[1] / "vectors" / "clients_db_before_sources.sql"


def test_a_store_made_before_sources_gets_the_column_and_keeps_everything(state: Path) -> None:
    """A database today's main made (tests/vectors/clients_db_before_sources.sql)
    opens with every client as it was, each allowed from anywhere; the
    column is added once, and the store works as a new one does."""
    old = sqlite3.connect(state / CLIENTS_DB)
    old.executescript(OLD_STORE.read_text())
    assert "sources" not in [row[1] for row in old.execute("PRAGMA table_info(clients)")]
    old.close()
    (state / CLIENTS_DB).chmod(0o600)
    with ClientStore.open(state, create=False) as store:
        assert store.version() == 5
        assert {e.name: e for e in store.all()} == {
            "alice": ClientEntry("alice", bytes(range(3, 35)), ("ssh", "https"),
                                 enrolled="2026-01-01T00:00:00Z", endpoint="203.0.113.1",
                                 old_secret=bytes(range(32)),
                                 old_until="2026-02-01T00:00:00Z"),
            "bob": ClientEntry("bob", bytes(range(1, 33)), ("ssh",),
                               enrolled="2026-01-02T00:00:00Z",
                               enroll_by="2026-01-03T00:00:00Z",
                               otp_secret="JBSWY3DPEHPK3PXP"),
            "carol": ClientEntry("carol", bytes(range(2, 34)), ("https",),
                                 allow_other_address=True, revoked=True, close_leases=True,
                                 enrolled="2026-01-02T00:00:00Z")}
        assert store.set_sources("bob", ("192.0.2.0/24",), at=6.0)
        store.add(entry("dave", sources=("2001:db8::/48",)), at=7.0)
    with ClientStore.open(state, create=False) as again:  # a second open adds nothing
        bob = again.get("bob")
        assert bob is not None and bob.sources == ("192.0.2.0/24",)
        assert again.get("dave") == entry("dave", sources=("2001:db8::/48",))
        assert again.changed_since(5) == (7, ["bob", "dave"])
    columns = [row[1] for row in sqlite3.connect(state / CLIENTS_DB).execute(
        "PRAGMA table_info(clients)")]
    assert columns.count("sources") == 1


def test_pages_by_name_with_a_filter_and_streams_all(store: ClientStore) -> None:
    store.add_many([entry(f"c{i:03d}", revoked=i % 3 == 0,
                          enroll_by="2030-01-01T00:00:00Z" if i % 3 == 1 else "")
                    for i in range(250)], at=1.0)
    first = store.page(limit=100)
    assert [e.name for e in first] == [f"c{i:03d}" for i in range(100)]
    rest = store.page(after=first[-1].name, limit=1000)
    assert len(rest) == 150
    assert [e.name for e in store.page(match="c24", limit=100)] == [
        f"c24{i}" for i in range(10)]
    assert store.page(match="%", limit=10) == [] and store.page(match="_", limit=10) == []
    assert all(e.revoked for e in store.page(state="revoked", limit=1000))
    assert len(store.page(state="revoked", limit=1000)) == 84
    assert len(store.page(state="pending", limit=1000)) == 83
    assert len(store.page(state="active", limit=1000)) == 83
    assert [e.name for e in store.all()] == sorted(f"c{i:03d}" for i in range(250))
    with pytest.raises(LocalError, match="--state 'gone'"):
        store.page(state="gone")


PAST, NOW, LATER = "2026-01-01T00:00:00Z", "2026-06-01T12:00:00Z", "2027-01-01T00:00:00Z"


@pytest.mark.parametrize("plain", [0, 400])
def test_a_state_is_one_rule_in_python_and_in_sql(store: ClientStore, plain: int) -> None:
    """Every combination of revoked, enroll_by (none, past, the second of
    now, later) and activated.json (not there, the same enroll_by, another):
    page, count and count_by_state put each client where Activation.state
    does, and count without reading a row.  With 400 plain clients beside
    them every state but active is rare, and pages walk its index range
    instead of the names (BY_NAME_SHARE): the same pages."""
    entries, met = [entry(f"a-{i:03d}") for i in range(plain)], {}
    for revoked in (False, True):
        for when in ("", PAST, NOW, LATER):
            for used in ("", "same", "other"):
                name = f"c-{int(revoked)}-{when[:4] or 'none'}{when[5:7]}-{used or 'no'}"
                entries.append(entry(name, revoked=revoked, enroll_by=when))
                if used:
                    met[name] = when if used == "same" else "2025-05-05T05:05:05Z"
    store.add_many(entries, at=1.0)
    activation = Activation(NOW, met)
    expected = {state: sorted(e.name for e in entries if activation.state(e) == state)
                for state in STATES}
    assert {state: len(names) for state, names in expected.items()} == {
        "revoked": 12, "active": 6 + plain, "pending": 2, "expired": 4}
    before = store.rows_read
    assert store.count_by_state(activation) == StateCounts(24 + plain, 12, 6 + plain, 2, 4)
    for state, names in expected.items():
        assert store.count(state=state, activation=activation) == len(names)
    assert store.rows_read == before  # counting reads no row
    for state, names in expected.items():
        assert [e.name for e in store.page(state=state, limit=1000,
                                           activation=activation)] == names
        assert [e.name for e in store.page(state=state, limit=1000, match="-other",
                                           activation=activation)] == [
            name for name in names if name.endswith("-other")]
        if len(names) > 1:  # keyset paging from the middle
            assert [e.name for e in store.page(state=state, after=names[0], limit=1,
                                               activation=activation)] == [names[1]]
    assert store.rows_read == before + 24 + plain + 8 + 4
    no_time = store.count_by_state(Activation())  # every enroll_by pending, none used
    assert no_time == StateCounts(24 + plain, 12, 3 + plain, 9, 0)
    assert store.count(match="2026") == 12 and store.count() == 24 + plain


def test_the_files_are_0600_and_a_readable_store_is_refused(state: Path) -> None:
    with ClientStore.open(state, create=True) as store:
        store.add(entry("alice"), at=1.0)
        for name in (CLIENTS_DB, CLIENTS_DB + "-wal", CLIENTS_DB + "-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    (state / CLIENTS_DB).chmod(0o644)
    with pytest.raises(LocalError, match="chmod 600"):
        ClientStore.open(state, create=False)


def test_no_store_a_group_writable_directory(state: Path, tmp_path: Path) -> None:
    with pytest.raises(LocalError, match="no client store"):
        ClientStore.open(state, create=False)
    state.chmod(0o770)
    with pytest.raises(LocalError, match="chmod 700"):
        ClientStore.open(state, create=True)


@pytest.mark.parametrize("name", [CLIENTS_DB, CLIENTS_DB + "-wal", CLIENTS_DB + "-shm",
                                  CLIENTS_DB + "-journal"])
def test_a_link_at_the_store_or_its_side_files_is_refused(state: Path, tmp_path: Path,
                                                          name: str) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    if name != CLIENTS_DB:
        ClientStore.open(state, create=True).close()
    (state / name).unlink(missing_ok=True)
    (state / name).symlink_to(target)
    with pytest.raises(LocalError, match="symbolic link"):
        ClientStore.open(state, create=True)
    assert target.read_bytes() == b"untouched"


def test_root_writes_the_store_as_the_directory_owner(nobody_state: Path) -> None:
    with ClientStore.open_as_owner(nobody_state, create=True) as store:
        assert os.geteuid() == NOBODY
        store.add(entry("alice"), at=1.0)
        for name in (CLIENTS_DB, CLIENTS_DB + "-wal", CLIENTS_DB + "-shm"):
            found = (nobody_state / name).stat()
            assert (found.st_uid, stat.S_IMODE(found.st_mode)) == (NOBODY, 0o600)
    assert os.geteuid() == 0 and os.getegid() == 0
    with ClientStore.open_as_owner(nobody_state, create=False) as store:
        assert store.get("alice") == entry("alice")


@pytest.mark.parametrize("name", [CLIENTS_DB, CLIENTS_DB + "-wal"])
def test_a_link_the_owner_plants_never_makes_root_write_through_it(
        nobody_state: Path, name: str) -> None:
    """Refused by the check; and were the link swapped in after the check,
    the write would be nobody's, which root's file refuses."""
    victim = nobody_state.parent / "root-only"
    victim.write_bytes(b"root's own")
    victim.chmod(0o600)
    if name != CLIENTS_DB:
        ClientStore.open_as_owner(nobody_state, create=True).__enter__().close()
        os.seteuid(0)
        os.setegid(0)
    (nobody_state / name).unlink(missing_ok=True)
    os.symlink(victim, nobody_state / name)
    with pytest.raises(LocalError, match="symbolic link"), \
            ClientStore.open_as_owner(nobody_state, create=True):
        pass
    assert os.geteuid() == 0
    with as_owner(nobody_state), pytest.raises(PermissionError):
        os.open(nobody_state / name, os.O_WRONLY)  # what a raced link would reach
    assert victim.read_bytes() == b"root's own" and os.geteuid() == 0


def test_root_in_its_own_directory_stays_root(state: Path) -> None:
    euid = os.geteuid()
    with as_owner(state):
        assert os.geteuid() == euid


# ---- migration, export, import ------------------------------------------------

@pytest.fixture
def toml_with_clients(tmp_path: Path) -> Path:
    """A config of the old version: two clients in [clients] tables."""
    path = tmp_path / "etc" / "server.toml"
    admin.init(path, listen_port=62201, backend="memory", state_dir=tmp_path / "state",
               force=False)
    (tmp_path / "state").mkdir(mode=0o700)
    for name, client in (("alice", entry("alice", enrolled="2026-01-01T00:00:00Z",
                                         sources=("192.0.2.0/24", "2001:db8::/48"))),
                         ("bob", entry("bob", secret=OTHER, revoked=True))):
        assert name == client.name
        config_mod.add_client(path, client)
    return path


def test_migration_moves_the_clients_and_keeps_a_backup(toml_with_clients: Path) -> None:
    path, state = toml_with_clients, toml_with_clients.parent.parent / "state"
    original = path.read_bytes()
    assert transfer.migrate(path, state, at=1.0) == 2
    backup = path.with_name("server.toml.pre-store")
    assert backup.read_bytes() == original
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert config_mod.load(path).clients == {}
    assert b"secret =" not in path.read_bytes()
    with ClientStore.open(state, create=False) as store:
        assert [e.name for e in store.all()] == ["alice", "bob"]
        assert store.get("bob") == entry("bob", secret=OTHER)  # add_client writes revoked=False
        assert store.get("alice") == entry("alice", enrolled="2026-01-01T00:00:00Z",
                                           sources=("192.0.2.0/24", "2001:db8::/48"))
        version = store.version()
    assert transfer.migrate(path, state, at=2.0) == 0  # idempotent: nothing left to move
    with ClientStore.open(state, create=False) as store:
        assert store.version() == version


def test_a_crash_between_the_store_and_the_rewrite_loses_and_doubles_nothing(
        toml_with_clients: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, state = toml_with_clients, toml_with_clients.parent.parent / "state"
    original = path.read_bytes()

    def crash(self: object) -> None:
        raise SystemExit("power cut")

    monkeypatch.setattr(config_mod._Edit, "write", crash)
    with pytest.raises(SystemExit):
        transfer.migrate(path, state, at=1.0)
    monkeypatch.undo()
    assert path.read_bytes() == original  # the file still has them ...
    with ClientStore.open(state, create=False) as store:  # ... and so has the store
        store.set_revoked("alice", close=False, at=1.5)  # a change made meanwhile survives
        assert store.count() == 2
        version = store.version()
    assert transfer.migrate(path, state, at=2.0) == 2
    with ClientStore.open(state, create=False) as store:
        assert store.version() == version  # nothing moved twice
        assert store.get("alice") is not None and store.get("alice").revoked  # type: ignore[union-attr]
    assert config_mod.load(path).clients == {}
    assert path.with_name("server.toml.pre-store").read_bytes() == original


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_export_then_import_is_idempotent_updates_and_prunes(
        toml_with_clients: Path, fmt: str) -> None:
    config = config_mod.load(toml_with_clients)
    state = toml_with_clients.parent.parent / "state"
    entries = [entry("alice", otp_secret="JBSWY3DPEHPK3PXP", endpoint="k.example:1",
                     sources=("192.0.2.0/24", "2001:db8::/48")),
               entry("bob", old_secret=OTHER, old_until="2030-01-01T00:00:00Z",
                     revoked=True, close_leases=True, enroll_by="2029-01-01T00:00:00Z")]
    text = transfer.render(entries, fmt)
    parsed = transfer.parse(Path("export"), text, config)
    assert list(parsed.values()) == entries
    with ClientStore.open(state, create=True) as store:
        store.add(entry("carol"), at=0.0)
        first = transfer.import_entries(store, parsed, prune=False, at=1.0)
        assert first == transfer.ImportResult(("alice", "bob"), (), ())
        version = store.version()
        again = transfer.import_entries(store, parsed, prune=False, at=2.0)
        assert again == transfer.ImportResult((), (), ()) and store.version() == version
        changed = dict(parsed, alice=entry("alice"))
        assert transfer.import_entries(store, changed, prune=True, at=3.0) == \
            transfer.ImportResult((), ("alice",), ("carol",))
        assert [e.name for e in store.all()] == ["alice", "bob"]


def test_an_import_file_is_checked_as_the_config_is(toml_with_clients: Path) -> None:
    config = config_mod.load(toml_with_clients)
    def sources(value: object) -> str:
        return json.dumps({"clients": {"a": {"secret": config_mod.b64encode(SECRET),
                                             "services": ["ssh"], "sources": value}}})

    for text, message in (('{"clients": {"a": {"services": ["ssh"]}}}', "needs secret"),
                          (sources(["192.0.2.7/24"]),
                           r"\[clients.a\] sources: '192.0.2.7/24' has host bits set past /24"),
                          (sources([24]), "sources: give a list of networks as strings"),
                          (sources("192.0.2.0/24"),
                           r"sources must be a list \(got a string \"192.0.2.0/24\"\): "
                           r"write sources = \[\"192.0.2.0/24\"\]"),
                          ('{"people": {}}', "as `spa-server clients export` writes"),
                          ("[clients.a\n", "neither JSON nor TOML")):
        with pytest.raises(LocalError, match=message):
            transfer.parse(Path("f"), text, config)


def test_a_long_lived_reader_sees_every_change_another_process_makes(state: Path) -> None:
    """The daemon's connection stays open while admin commands (other
    processes) open, change and close the store: each change is seen (the
    reader's locks survive the open's own descriptor; without that, the
    second writer's close deleted the -wal and -shm under the reader)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from spa.store.clients import ClientStore;"
            "from spa.server.config import ClientEntry\n"
            "with ClientStore.open(Path(sys.argv[1]), create=True) as s:\n"
            "    s.add(ClientEntry(sys.argv[2], bytes(32), ('ssh',)), at=1.0)\n")
    with ClientStore.open(state, create=True) as reader:
        for n, name in enumerate(("alice", "bob", "carol"), start=1):
            subprocess.run([sys.executable, "-c", code, str(state), name], check=True)
            assert reader.version() == n
            assert reader.changed_since(n - 1) == (n, [name])
