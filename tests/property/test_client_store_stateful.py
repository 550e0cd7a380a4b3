"""The client store against a dict: enroll, revoke, rotate, the end of a
grace period, export and import; and a reader following `changed_since`
always ends up with the store's entries."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spa.server import config as config_mod
from spa.server.config import OLD_KEY, ClientEntry, ServerConfig
from spa.server.errors import LocalError
from spa.store import transfer
from spa.store.clients import ClientStore

names = st.sampled_from(["alice", "bob", "carol", "dave", "eve"])
secrets_ = st.binary(min_size=32, max_size=32).filter(any)  # zero bytes: refused on import
START = 1_800_000_000.0


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.top = Path(tempfile.mkdtemp(prefix="spa-store-prop-"))
        self.top.chmod(0o700)
        self.store = ClientStore.open(self.top, create=True)
        self.model: dict[str, ClientEntry] = {}
        self.now = START
        self.reader: dict[str, ClientEntry] = {}  # what an incremental reader holds
        self.reader_seq = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.top)

    @rule(name=names, secret=secrets_, pending=st.booleans())
    def enroll(self, name: str, secret: bytes, pending: bool) -> None:
        entry = ClientEntry(name, secret, ("ssh",), enrolled=config_mod.format_utc(self.now),
                            enroll_by=config_mod.format_utc(self.now + 900) if pending else "")
        try:
            self.store.add(entry, at=self.now)
        except LocalError:
            assert name in self.model
            return
        assert name not in self.model
        self.model[name] = entry

    @rule(name=names, close=st.booleans())
    def revoke(self, name: str, close: bool) -> None:
        if name not in self.model:
            return
        was = self.model[name]
        changed = self.store.set_revoked(name, close=close, at=self.now)
        assert changed == (not was.revoked or (close and not was.close_leases))
        self.model[name] = replace(was, revoked=True,
                                              close_leases=was.close_leases or close)

    @rule(name=names, secret=secrets_, grace=st.sampled_from([0, 60, 600]))
    def rotate(self, name: str, secret: bytes, grace: int) -> None:
        if name not in self.model:
            return
        until = config_mod.format_utc(self.now + grace) if grace else ""
        before = self.store.set_secret(name, secret, old_until=until, at=self.now)
        was = self.model[name]
        assert before == was
        self.model[name] = replace(
            was, secret=secret, old_secret=was.secret if grace else b"", old_until=until)

    @rule(name=names, sources=st.sampled_from(
        [(), ("192.0.2.0/24",), ("192.0.2.0/24", "2001:db8::/48"), ("0.0.0.0/0",)]))
    def set_sources(self, name: str, sources: tuple[str, ...]) -> None:
        if name not in self.model:
            return
        changed = self.store.set_sources(name, sources, at=self.now)
        assert changed == (self.model[name].sources != sources)
        self.model[name] = replace(self.model[name], sources=sources)

    @rule(seconds=st.sampled_from([1, 59, 61, 601, 3600]))
    def time_passes(self, seconds: int) -> None:
        """Grace ends with time alone: the live secrets say so (no write)."""
        self.now += seconds

    @rule(fmt=st.sampled_from(transfer.FORMATS), prune=st.booleans())
    def export_then_import_elsewhere(self, fmt: str, prune: bool) -> None:
        text = transfer.render(self.store.all(), fmt)
        config = ServerConfig(Path("server.toml"), server_id=bytes(16))
        parsed = transfer.parse(Path("export"), text, config)
        assert parsed == self.model
        result = transfer.import_entries(self.store, parsed, prune=prune, at=self.now)
        assert result == transfer.ImportResult((), (), ())  # the same file: nothing changes

    @precondition(lambda self: bool(self.model))
    @rule(name=names)
    def prune_one(self, name: str) -> None:
        keep = {n: e for n, e in self.model.items() if n != name}
        result = transfer.import_entries(self.store, keep, prune=True, at=self.now)
        assert result.removed == ((name,) if name in self.model else ())
        self.model = keep

    @rule()
    def reader_follows(self) -> None:
        self.reader_seq, changed = self.store.changed_since(self.reader_seq)
        for name in changed:
            found = self.store.get(name)
            if found is None:
                self.reader.pop(name, None)
            else:
                self.reader[name] = found
        assert self.reader == self.model
        assert self.reader_seq == self.store.version()

    @invariant()
    def store_is_the_model(self) -> None:
        assert {e.name: e for e in self.store.all()} == self.model
        assert self.store.count() == len(self.model)

    @invariant()
    def live_secrets_follow_the_clock(self) -> None:
        config = ServerConfig(Path("server.toml"), server_id=bytes(16), clients=self.model)
        live = config.secrets(self.now)
        for name, entry in self.model.items():
            in_grace = bool(entry.old_until) and config_mod.parse_utc(entry.old_until) > self.now
            assert (name + OLD_KEY in live) == in_grace


TestClientStore = StoreMachine.TestCase
TestClientStore.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
