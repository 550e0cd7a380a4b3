"""The compat listener: fwknop's packets on a port of their own, by choice.

Invariants (docs/threat-model.md, "fwknop clients"; docs/protocol.md,
"fwknop compatibility"):
- Off unless `[server] fwknop_port` is set, and only clients of kind
  `fwknop` are served here; their keys never reach our verifier, ours never
  reach this one.  At most MAX_CLIENTS of them (spa.core.fwknop_verify).
- One thread receives and verifies; it owns the CompatVerifier (keys, policy,
  replay cache, HMAC budget): changes in the client store and the services
  are read by that thread between batches.
- Grants go through the daemon's lease table and gate (`Server.grant_legacy`,
  under its lock); every event a compat knock causes is marked legacy.
- The replay cache is persisted like ours (spa.server.state: a dump and a
  journal, `fwknop-replay.*` beside `replay.*`), so a restart within the
  window does not reopen the door to a captured packet.
- The server never answers a packet.
"""

from __future__ import annotations

import contextlib
import threading
import time

from spa.core.fwknop import FwknopKeys
from spa.core.fwknop_verify import CompatAccepted, CompatVerifier
from spa.core.policy import ClientPolicy, Policy
from spa.server import config as config_mod
from spa.server.config import KIND_FWKNOP, ClientEntry
from spa.server.daemon import Server
from spa.server.errors import LocalError
from spa.server.sources import PacketSource
from spa.server.state import StateDir
from spa.store.clients import ClientStore

RECEIVE_TIMEOUT = 0.25  # the thread wakes at least this often
POLL_EVERY = 0.2  # seconds between looks at the client store and the services
COMPACT_EVERY = 10.0  # seconds between replay-cache dumps (the journal covers between)
REPLAY_FILES = "fwknop-replay"


class CompatListener:
    """Started, served and closed by the daemon (its `companions`)."""

    def __init__(self, server: Server, source: PacketSource) -> None:
        self.server = server
        self.source = source
        self.state = StateDir(server.state.path, replay=REPLAY_FILES)
        self.verifier: CompatVerifier
        self._store: ClientStore | None = None
        self._store_seq = 0
        self._services = server.config.services
        self._rules: dict[str, ClientPolicy] = {}
        self._last_poll = self._last_compact = 0.0
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Load the compat clients and the saved replay cache.  Raises LocalError."""
        server = self.server
        now = server.clock()
        self.state.files = server.state.files
        replay = self.state.load_replay(server.config.window, now)
        self.state.compact_now(replay)
        self.state.journal(replay)
        self._store = ClientStore.open(self.state.files, create=True)
        self._store_seq = self._store.version()
        keys: dict[str, FwknopKeys] = {}
        for entry in self._store.all():
            if entry.kind == KIND_FWKNOP:
                keys[entry.name] = _keys(entry)
                self._rules[entry.name] = config_mod.client_policy(entry)
        try:
            self.verifier = CompatVerifier(keys, self._policy(), window=server.config.window,
                                           replay=replay)
        except ValueError as exc:
            raise LocalError(f"fwknop clients: {exc}; revoke or move some "
                             "(spa-server clients shows how)") from None
        server.set_fact("fwknop", {"port": server.config.fwknop_port, "clients": len(keys)})
        server.log(f"fwknop compat listener port={server.config.fwknop_port} "
                   f"clients={len(keys)} (fwknop's packets; every knock marked legacy)")

    def serve(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._loop, args=(stop,), name="spa-fwknop",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After `stop` was set: wait for the thread, save the replay cache."""
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(LocalError):
            self.state.compact_now(self.verifier.replay)
        self.state.close()
        self.source.close()
        if self._store is not None:
            self._store.close()

    # ---- the receive path --------------------------------------------------

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batch = self.source.receive(RECEIVE_TIMEOUT)
            try:
                if batch:
                    self.handle(batch)
                self._housekeeping()
            except Exception as exc:  # never let one batch end the listener
                self.server.log(f"error fwknop listener: {type(exc).__name__}: {exc}")

    def handle(self, batch: list[tuple[bytes, str, int]]) -> list[CompatAccepted | object]:
        """Verify datagrams and act on them (this thread only)."""
        server = self.server
        now = server.clock()
        results: list[CompatAccepted | object] = []
        for data, source, _ in batch:
            result = self.verifier.verify(data, source, now)
            results.append(result)
            if isinstance(result, CompatAccepted):
                server.grant_legacy(result.client, result.decisions, now)
            else:
                server.events.refuse(now, result.reason.value, result.client, source,
                                     legacy=True)
        return results

    # ---- housekeeping (on this thread) -------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_poll >= POLL_EVERY:
            self._last_poll = now
            self._poll_store()
            if self.server.config.services is not self._services:
                self._services = self.server.config.services
                self.verifier.policy = self._policy()
        if now - self._last_compact >= COMPACT_EVERY:
            self._last_compact = now
            if self.state.journal_error is not None:
                self.server.log(f"error fwknop replay journal: {self.state.journal_error}")
                self.state.journal_error = None
            self.state.compact_now(self.verifier.replay)  # this thread alone adds to it

    def _poll_store(self) -> None:
        """The compat clients that changed in the store since the last look."""
        store = self._store
        if store is None or store.version() == self._store_seq:
            return
        self._store_seq, names = store.changed_since(self._store_seq)
        for name in names:
            entry = store.get(name)
            self.verifier.remove_client(name)
            self._rules.pop(name, None)
            if entry is not None and entry.kind == KIND_FWKNOP:
                try:
                    self.verifier.add_client(name, _keys(entry))
                except ValueError as exc:
                    self.server.log(f"error fwknop client={name} not served: {exc}")
                    continue
                self._rules[name] = config_mod.client_policy(entry)
        self.verifier.policy = self._policy()
        self.server.set_fact("fwknop", {"port": self.server.config.fwknop_port,
                                        "clients": len(self.verifier.clients)})

    def _policy(self) -> Policy:
        return Policy(dict(self._services), dict(self._rules))


def _keys(entry: ClientEntry) -> FwknopKeys:
    return FwknopKeys(entry.fwknop_key, entry.fwknop_hmac_key)
