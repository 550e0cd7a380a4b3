"""group_delta given each view's keys (a member's first read makes them once)
and left to make them: the same delta; and a member's read makes each
client's keys once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spa.core.keys import ClientKeys, derive_keys
from spa.group import delta as delta_mod
from spa.group.clients import GroupClient
from spa.group.delta import ClientView, group_delta
from spa.group.memory import MemoryStore
from spa.group.records import Revocation
from tests.group_world import Group
from tests.server_world import FakeClock

SERVER_ID = bytes(range(16))
NOW = 1_800_000_000.0


def _client(name: str, *, rotating: bool = False, enroll_by: int | None = None
            ) -> GroupClient:
    return GroupClient(name, SERVER_ID, derive_keys(os.urandom(32), SERVER_ID), ("ssh",),
                       enroll_by=enroll_by,
                       old_keys=derive_keys(os.urandom(32), SERVER_ID) if rotating else None,
                       old_until=int(NOW) + 60 if rotating else None)


def test_a_delta_made_with_the_keys_given_is_the_one_made_without() -> None:
    alice, bob = _client("alice", rotating=True), _client("bob")
    after: dict[str, ClientView | None] = {
        "alice": ClientView(alice), "bob": ClientView(bob, Revocation("bob", 1, True)),
        "carol": None, "dave": ClientView(_client("dave")),
        "erin": ClientView(_client("erin", enroll_by=int(NOW) + 600)),
        "frank": ClientView(_client("frank", enroll_by=int(NOW) + 600), None, int(NOW) + 600)}
    before: dict[str, ClientView | None] = {"bob": ClientView(bob), "carol": ClientView(
        _client("carol"))}
    assert alice.old_keys is not None
    held: dict[str, dict[str, ClientKeys]] = {
        "bob": ClientView(bob).keys(NOW), "carol": {"carol": alice.keys},
        "alice": {"alice~old": alice.old_keys}}  # alice~old held already, alice not
    live = {name: view.keys(NOW) if view is not None else {} for name, view in after.items()}
    made = group_delta(before, after, held, NOW)
    assert group_delta(before, after, held, NOW, live=live) == made
    assert set(made.keys) == {"alice", "dave", "erin", "frank"}
    assert set(made.gone) == {"bob", "carol"} and made.closed == ("bob",)
    assert (made.met, made.pending) == (frozenset({"frank"}), frozenset({"erin"}))
    assert made.rules["carol"] is None and made.rules["bob"].revoked  # type: ignore[union-attr]


def test_a_members_read_makes_each_clients_keys_once(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    group = Group(tmp_path, MemoryStore(clock), clock)
    try:
        group.member("a")
        for i in range(20):
            group.enroll(f"c{i}")
        made: list[str] = []
        keys = ClientView.keys

        def counted(self: ClientView, now: float) -> dict[str, object]:
            made.append(self.client.name)
            return keys(self, now)  # type: ignore[return-value]
        monkeypatch.setattr(delta_mod.ClientView, "keys", counted)
        group.member("b")
        assert sorted(made) == sorted(f"c{i}" for i in range(20))
        assert all(group.links["b"].member.covers(f"c{i}") for i in range(20))
    finally:
        group.close()
