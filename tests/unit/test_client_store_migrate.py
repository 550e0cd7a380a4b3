"""A client store an older version made migrates on open (spa/store/clients.py
`_migrate`).  tests/data/clients-b29a68c.db was made by the code of commit
b29a68c (the last before fwknop clients): two clients, alice and bob (revoked),
with `ClientStore.add` as that version had it."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from spa.server.config import KIND_FWKNOP, KIND_SPA, ClientEntry
from spa.store.clients import CLIENTS_DB, ClientStore

OLD = Path(__file__).parents[1] / "data" / "clients-b29a68c.db"


def old_store(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copyfile(OLD, state / CLIENTS_DB)
    (state / CLIENTS_DB).chmod(0o600)
    return state


def test_a_store_made_before_fwknop_clients_migrates_on_open(tmp_path: Path) -> None:
    state = old_store(tmp_path)
    columns = {row[1] for row in sqlite3.connect(state / CLIENTS_DB).execute(
        "PRAGMA table_info(clients)")}
    assert "kind" not in columns  # the fixture is the old schema
    with ClientStore.open(state, create=False) as store:
        alice, bob = store.get("alice"), store.get("bob")
        assert alice is not None and bob is not None
        assert alice.kind == KIND_SPA and alice.secret == bytes(range(32))
        assert alice.services == ("ssh",) and bob.revoked
        store.add(ClientEntry("oldphone", b"", ("ssh",), kind=KIND_FWKNOP,
                              fwknop_key=b"k" * 32, fwknop_hmac_key=b"h" * 64), at=3.0)
        version = store.version()
    with ClientStore.open(state, create=False) as again:  # migrated once: opens as it is
        found = again.get("oldphone")
        assert found is not None and found.kind == KIND_FWKNOP
        assert found.fwknop_key == b"k" * 32 and found.fwknop_hmac_key == b"h" * 64
        assert again.version() == version
        assert [e.name for e in again.all()] == ["alice", "bob", "oldphone"]
