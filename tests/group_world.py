"""Two (or more) in-process servers as members of one group, on one store
(the memory fake, or a real etcd cluster): tests/server_world.py's fakes for
everything else, and the claims run inline (spa.group.claims.Inline) so a
test sees the verdict when `handle` returns."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spa.core.keys import derive_keys
from spa.core.wire import Action, Request, build_packet
from spa.group import layout
from spa.group.claims import Inline
from spa.group.clients import client_record
from spa.group.kv import KV
from spa.group.link import GroupLink
from spa.group.policy import OnStoreDown
from spa.group.records import GroupMeta, Revocation, encode_meta, encode_revocation
from spa.group.settings import GroupSettings
from spa.server.config import ClientEntry
from spa.server.daemon import Server
from tests.server_world import FakeClock, World

GROUP = "g1"
SOURCE = "192.0.2.10"


def settings(member: str, mode: OnStoreDown = OnStoreDown.FAIL_CLOSED, group: str = GROUP
             ) -> GroupSettings:
    unused = Path("/nonexistent")  # the store is given: no file is read
    return GroupSettings(group, member, ("https://unused:2379",), unused, unused, unused,
                         member, unused, on_store_down=mode)


@dataclass
class Group:
    """A group on `kv`: its meta and clients, and members started on it."""

    root: Path
    kv: KV
    clock: FakeClock = field(default_factory=FakeClock)
    worlds: dict[str, World] = field(default_factory=dict)
    links: dict[str, GroupLink] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)
    otp_secrets: dict[str, str] = field(default_factory=dict)  # client -> base32 TOTP secret
    server_id: bytes = b""
    group: str = GROUP
    # member name -> its own store (default: `kv`, shared)
    stores: dict[str, KV] = field(default_factory=dict)
    # the members' monotonic clock, that times the shared etcd leases (default: `clock`)
    monotonic: Callable[[], float] | None = None

    def member(self, name: str, mode: OnStoreDown = OnStoreDown.FAIL_CLOSED, *,
               config: str = "") -> Server:
        """A started server that is member `name` (the first one's init sets
        the group's server id; the others take it); `config` is added to its
        config file (e.g. a service of its own)."""
        world = World(self.root / name, clock=self.clock)
        world.root.mkdir(parents=True)
        world.init()
        if config:
            with world.config_path.open("a") as file:
                file.write(config)
        if not self.worlds:
            from spa.server import config as config_mod

            self.server_id = config_mod.load(world.config_path).server_id
            self.kv.put(layout.meta_key(self.group).encode(),
                        encode_meta(GroupMeta(self.group, self.server_id, int(self.clock.now))))
        else:
            first = next(iter(self.worlds.values())).config_path.read_text()
            own_id = re.search(r'^server_id = ".*"$', first, re.M)
            assert own_id is not None
            text = re.sub(r'^server_id = ".*"$', own_id.group(0),
                          world.config_path.read_text(), flags=re.M)
            world.config_path.write_text(text)
        server = world.start()
        link = GroupLink(server, self.stores.get(name, self.kv),
                         settings(name, mode, self.group), executor=Inline(),
                         monotonic=self.monotonic or self.clock)
        link.start()
        server.run_commands()
        self.worlds[name], self.links[name] = world, link
        return server

    def close(self) -> None:
        """Stop every member (its watch, claims, files: no descriptor left open)."""
        for name, world in self.worlds.items():
            self.links[name].close()
            if world.server is not None:
                world.server.shutdown()
                world.server = None

    def enroll(self, name: str, *services: str, enroll_by: float | None = None,
               otp: bool = False) -> None:
        """Write a client record, as `spa-server enroll` on a group will
        (`enroll_by`: pending until its first knock, due by then; `otp`: it
        must send an authenticator code, its secret in `otp_secrets`)."""
        secret = os.urandom(32)
        self.secrets[name] = secret
        due = "" if enroll_by is None else time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                         time.gmtime(enroll_by))
        if otp:
            self.otp_secrets[name] = base64.b32encode(os.urandom(20)).decode()
        entry = ClientEntry(name, secret, tuple(services) or ("ssh", "https"), enroll_by=due,
                            otp_secret=self.otp_secrets.get(name, ""))
        self.kv.put(layout.client_key(self.group, name).encode(),
                    client_record(entry, self.server_id))

    def revoke(self, name: str, *, close: bool) -> None:
        self.kv.put(layout.revoked_key(self.group, name).encode(),
                    encode_revocation(Revocation(name, int(self.clock.now), close)))

    def packet(self, client: str, service: str = "ssh", *, duration: int = 60,
               action: Action = Action.OPEN, otp: str = "", sent: float | None = None
               ) -> bytes:
        """A packet of `client`'s, sealed at `sent` (default: the clock's now)."""
        when = self.clock.now if sent is None else sent
        request = Request(int(when * 1000), action, service, duration, None, otp)
        return build_packet(request, derive_keys(self.secrets[client], self.server_id),
                            self.server_id, nonce=os.urandom(24))

    def settle(self) -> None:
        """Every member's receive thread runs what its watch queued."""
        for world in self.worlds.values():
            assert world.server is not None
            world.server.run_commands()

    def grants(self, member: str) -> set[tuple[str, str]]:
        """(address, service) the member's firewall lets through now."""
        return {(str(address), service) for (address, service), until
                in self.worlds[member].backend.grants.items() if until > self.clock.now}

    def refusals(self, member: str) -> list[tuple[str, str | None]]:
        return [(e.reason or "", e.client) for e in self.worlds[member].events()
                if e.outcome == "refused"]


ADDRESS = ipaddress.ip_address(SOURCE)
