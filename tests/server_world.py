"""A server built from fakes: memory backend, fake source, fake clock."""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from spa.backends.memory import MemoryBackend
from spa.core.keys import derive_keys
from spa.core.wire import Action, Request, build_packet
from spa.server import admin
from spa.server import config as config_mod
from spa.server.daemon import Server
from spa.server.events import Event, read_events
from spa.server.gwresolve import Resolver, system_resolver
from spa.server.routes import RouteCheck
from spa.server.sources import FakeSource

START = 1_800_000_000.0


@dataclass
class FakeClock:
    now: float = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RunningClock(FakeClock):
    """A clock that runs at the real (monotonic) clock's speed from where it
    was set: for real-time tests that still want to choose where in a step
    they begin.  Setting `now` (or advance) moves it; it goes on running."""

    def __init__(self, start: float = START) -> None:
        self._offset = start - time.monotonic()

    @property
    def now(self) -> float:
        return time.monotonic() + self._offset

    @now.setter
    def now(self, value: float) -> None:
        self._offset = value - time.monotonic()


@dataclass
class World:
    root: Path
    clock: FakeClock = field(default_factory=FakeClock)
    logs: list[str] = field(default_factory=list)
    backend: MemoryBackend = field(default_factory=MemoryBackend)
    source: FakeSource = field(default_factory=FakeSource)
    server: Server | None = None
    resolver: Resolver | None = None  # a named gateway host's (None: the system's)

    @property
    def config_path(self) -> Path:
        return self.root / "server.toml"

    def init(self) -> None:
        admin.init(self.config_path, listen_port=62201, backend="memory",
                   state_dir=self.root / "state", force=False, services=("ssh", "https"))

    def enroll(self, name: str, *services: str, expires: float | None = None,
               otp: bool = False) -> None:
        admin.enroll(self.config_path, name, list(services) or ["ssh", "https"], "127.0.0.1",
                     expires=expires, now=self.clock.now, otp=otp)

    def start(self, source: FakeSource | None = None, routes: RouteCheck | None = None
              ) -> Server:
        """A new server on the same state; one started before and never shut
        down is taken for crashed (a dead process's lock goes with it)."""
        if self.server is not None:
            self.server.state.release()
        self.backend = MemoryBackend()
        self.source = source if source is not None else FakeSource()
        self.server = Server(config_mod.load(self.config_path), backend=self.backend,
                             source=self.source, clock=self.clock, log=self.logs.append,
                             routes=routes, resolver=self.resolver or system_resolver)
        self.server.start()
        return self.server

    def packet(self, client: str, service: str = "ssh", *, action: Action = Action.OPEN,
               duration: int = 0, at: float | None = None, address: str | None = None,
               otp: str = "") -> bytes:
        config = admin.load(self.config_path)
        keys = derive_keys(config.clients[client].secret, config.server_id)
        when = self.clock.now if at is None else at
        request = Request(int(when * 1000), action, service, duration,
                          None if address is None else ipaddress.ip_address(address), otp)
        return build_packet(request, keys, config.server_id, nonce=os.urandom(24))

    def events(self) -> list[Event]:
        assert self.server is not None
        self.server.events.flush()
        return read_events(self.root / "state" / "events.sqlite3")
