"""The tag table against a model, over enroll, revoke, re-key, slices and steps.

Invariants after every rule: the kernel's set, built only from what
`start_journal` and `drain_changes` gave, is exactly the table's tags; every
enrolled client's tags of steps current-skew..current+skew are in the table
as (client, step); no revoked or re-keyed-away key has a tag in it; and the
table holds nothing outside current-skew-1..current+skew+1.  A table made
`warm_later` holds the current step's tags from the start, and the rest of
that invariant once `warming()` is down to zero (its first slices); so does
a client added `later` (a group member's first read).
"""

from __future__ import annotations

import hashlib

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from spa.core.knock import TagTable, knock_tag

NAMES = st.sampled_from([f"c{i}" for i in range(8)])


def key_of(name: str, version: int) -> bytes:
    return hashlib.sha256(f"{name}/{version}".encode()).digest()


class TagMachine(RuleBasedStateMachine):
    warm_later = False

    def __init__(self) -> None:
        super().__init__()
        self.model = {f"c{i}": key_of(f"c{i}", 0) for i in range(4)}  # enrolled: name -> key
        self.retired: list[bytes] = []  # keys revoked or re-keyed away
        self.version = 0
        self.table = TagTable(self.model, step=1000, warm_later=self.warm_later)
        self.kernel = set(self.table.start_journal())

    @rule(name=NAMES)
    def add(self, name: str) -> None:
        self.version += 1
        key = key_of(name, self.version)
        if name in self.model:
            self.retired.append(self.model[name])
        self.model[name] = key
        self.table.add(name, key)

    @rule(name=NAMES)
    def add_later(self, name: str) -> None:
        """As a group member's first read adds its clients: the current
        step's tags now, the rest among the first slices."""
        self.version += 1
        key = key_of(name, self.version)
        if name in self.model:
            self.retired.append(self.model[name])
        self.model[name] = key
        self.table.add(name, key, later=True)

    @rule(names=st.lists(NAMES, max_size=5), later=st.booleans())
    def add_many(self, names: list[str], later: bool) -> None:
        """Several at once (a member's first read: TagTable.add_many), a
        name given twice taking its last key."""
        batch = []
        for name in names:
            self.version += 1
            key = key_of(name, self.version)
            if name in self.model:
                self.retired.append(self.model[name])
            self.model[name] = key
            batch.append((name, key))
        self.table.add_many(batch, later=later)

    @rule(name=NAMES)
    def remove(self, name: str) -> None:
        if name in self.model:
            self.retired.append(self.model.pop(name))
        self.table.remove(name)

    @rule(limit=st.integers(1, 6))
    def slice(self, limit: int) -> None:
        self.table.slice(limit)

    @rule()
    def next_step(self) -> None:
        self.table.advance(self.table.step + 1)

    @rule(by=st.sampled_from([-3, -1, 0, 2, 50]))
    def jump(self, by: int) -> None:
        self.table.advance(self.table.step + by)

    @rule()
    def drain(self) -> None:
        added, removed = self.table.drain_changes()
        assert not set(added) & set(removed), "a tag both added and removed"
        assert not set(removed) - self.kernel, "removed a tag the kernel never had"
        assert not set(added) & self.kernel, "added a tag the kernel has"
        self.kernel = (self.kernel - set(removed)) | set(added)

    @invariant()
    def journal_is_exact(self) -> None:
        added, removed = self.table.drain_changes()
        self.kernel = (self.kernel - set(removed)) | set(added)
        assert self.kernel == set(self.table.all_tags())

    @invariant()
    def live_tags_present_and_retired_ones_gone(self) -> None:
        table, step, skew = self.table, self.table.step, self.table.skew
        live = range(step - skew, step + skew + 1) if not table.warming() else [step]
        for name, key in self.model.items():
            for s in live:
                assert table.lookup(knock_tag(key, s)) == (name, s), (name, s)
        for key in self.retired:
            for s in range(step - skew - 2, step + skew + 3):
                assert table.lookup(knock_tag(key, s)) is None
        assert len(table) <= (2 * skew + 3) * len(self.model)
        assert table.clients == frozenset(self.model)


def test_tag_table() -> None:
    """The machine's rules and invariants, run against the model."""
    run_state_machine_as_test(TagMachine, settings=settings(
        max_examples=150, stateful_step_count=40, deadline=None))


class WarmLaterMachine(TagMachine):
    warm_later = True


def test_tag_table_warmed_later() -> None:
    """The same, for a table made with the current step's tags alone."""
    run_state_machine_as_test(WarmLaterMachine, settings=settings(
        max_examples=150, stateful_step_count=40, deadline=None))
