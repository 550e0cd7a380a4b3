"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spa.group.memory import MemoryStore
from tests.group_world import Group
from tests.server_world import FakeClock


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    """Members of one group on the memory fake of etcd, under a fake clock
    (tests/group_world.py); closed afterwards."""
    clock = FakeClock()
    made = Group(tmp_path, MemoryStore(clock), clock)
    yield made
    made.close()
