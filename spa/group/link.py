"""A running server's link to its group: the member (clients and leases from
etcd) and the claimer (nonces and shared leases), started, served and closed
with the daemon as one of its companions.

Invariants (docs/groups.md, "Members"; the privilege split, docs/install.md):
- Everything here runs in the unprivileged daemon: etcd is reached by it,
  and what reaches the firewall goes through the daemon's backend (the gate
  keeper's end when the daemon is split), as a local grant does.
- A start with etcd unreachable is not fatal: the server serves its own
  clients and the member thread reads the group once etcd answers.  A group
  that is not this server's (no meta, another server id) stops the start
  with one line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from spa.group.claims import Claimer, Executor, times_wanted
from spa.group.kv import KV, StoreError
from spa.group.member import GroupMember, MemberError
from spa.group.presence import PRESENCE_EVERY, Presence
from spa.group.settings import GroupSettings

if TYPE_CHECKING:
    from spa.server.daemon import Server

FACT = "group"  # the lock file's key for facts() (spa.server.state: running_server)


class GroupLink:
    """The daemon's companion for its group (spa.server.daemon.Companion)."""

    def __init__(self, server: Server, kv: KV, settings: GroupSettings, *,
                 executor: Executor | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.settings = settings
        log: Callable[[str], None] = server.log
        self.member = GroupMember(kv, group=settings.name, member=settings.member,
                                  server_id=server.config.server_id, hooks=server,
                                  clock=server.clock, log=log)
        self.claimer = Claimer(kv, group=settings.name, member=settings.member,
                               window=server.config.window,
                               on_store_down=settings.on_store_down, hooks=server,
                               clock=server.clock, log=log, executor=executor,
                               pending=self.member.pending,
                               covers=lambda client: client not in server.config.clients,
                               monotonic=monotonic, times=times_wanted())
        self.presence = Presence(kv, group=settings.name, member=settings.member,
                                 started=server.clock(), log=log)
        self._said: dict[str, object] = {}  # the facts last handed to the daemon
        server.claims = self.claimer
        server.companions.append(self)

    def start(self) -> None:
        """Read the group now if etcd answers (else the member thread will),
        and announce this member.  Raises LocalError for a group that is not
        this server's."""
        try:
            self.member.load()
        except StoreError as exc:
            self.server.log(f"error group {self.settings.name}: {exc} (serving this server's "
                            "own clients; the group's once etcd answers)")
            self.member.read_failed(exc, self.server.clock(), said=True)  # one line an outage
            self._said = self.facts()
            self.server.set_fact(FACT, self._said)
            return
        except MemberError as exc:
            from spa.server.errors import LocalError

            raise LocalError(str(exc)) from None
        self.server.log(f"group {self.settings.name} member={self.settings.member} "
                        f"clients={len(self.member.clients)} on_store_down="
                        f"{self.settings.on_store_down}")
        self.presence.tick()
        self._said = self.facts()
        self.server.set_fact(FACT, self._said)

    def facts(self) -> dict[str, object]:
        """What `status` and the dashboard say of the group (the lock file's
        "group" fact): names, the clients this member runs, whether etcd
        answered its last read and claim."""
        return {"name": self.settings.name, "member": self.settings.member,
                "clients": self.member.client_count, "read": self.member.loaded,
                "revision": self.member.revision, "on_store_down": str(self.settings.on_store_down),
                "etcd": "unreachable" if self.claimer.store_down or self.member.failing
                else "answering"}

    def serve(self, stop: threading.Event) -> None:
        threading.Thread(target=self.member.run, args=(stop,), name="spa-group",
                         daemon=True).start()
        threading.Thread(target=self._announce, args=(stop,), name="spa-group-presence",
                         daemon=True).start()

    def _announce(self, stop: threading.Event) -> None:
        while not stop.wait(PRESENCE_EVERY):
            try:
                self.tick()
            except Exception as exc:  # keep announcing; say what broke
                self.server.log(f"error group {self.settings.name}: {type(exc).__name__}: "
                                f"{exc}")

    def tick(self) -> None:
        """The presence thread's round: announce this member, and hand the
        daemon the group's facts when they changed (the receive thread writes
        them)."""
        self.presence.tick()
        facts = self.facts()
        if facts != self._said:
            self._said = facts
            self.server.set_fact_soon(FACT, facts)

    def close(self) -> None:
        self.member.close()
        self.claimer.close()
        self.presence.close()
