"""Shared test setup: hypothesis profiles and a small world of keys and clients.

Profiles (choose with --hypothesis-profile NAME or HYPOTHESIS_PROFILE):
- dev (default): quick, for the edit-test loop.
- ci: thousands of examples for the fuzz and round-trip properties (3,000 a
  property; the stateful machines cap theirs lower), with no per-example
  deadline (a loaded machine would flake on one): on two cores every
  property under it takes about 80 s of the suite's 20 minutes (issue 17's
  measurement: tests/property ~50 s, the unit tests' properties ~30 s).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.etcd_world"]  # the etcd_cluster fixture (group tests)

settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile(
    "ci",
    max_examples=3000,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session", autouse=True)
def checkout_searchable_by_the_daemon(tmp_path_factory: pytest.TempPathFactory
                                      ) -> Iterator[None]:
    """As root, `spa-server run` forks its gate keeper and then runs as a
    service user (nobody here, spa on a real host), which imports what it
    still needs from this checkout's .venv.  A clone in a private directory
    (mktemp -d is 0700) is out of its reach: give its ancestors the search
    (x, not read) permission for the session, and put the modes back.  So
    with the temporary directories the tests put state directories in (SQLite
    opens the event store by its full path).  SPA_TESTS_ANCESTORS_SEARCHABLE=1
    says the caller did it for the ancestors (scripts/test.sh, which runs two
    pytest processes side by side: one putting the modes back at its end
    would take the permission from the other); the temporary directories,
    each process's own, are still made searchable here."""
    changed: list[tuple[Path, int]] = []
    if os.geteuid() == 0:
        if not os.environ.get("SPA_TESTS_ANCESTORS_SEARCHABLE"):
            for directory in reversed(Path(sys.executable).absolute().parents):
                mode = directory.stat().st_mode
                if not mode & 0o001:
                    changed.append((directory, mode))
                    directory.chmod((mode & 0o7777) | 0o001)
        for directory in (tmp_path_factory.getbasetemp().parent,
                          tmp_path_factory.getbasetemp()):
            directory.chmod(directory.stat().st_mode & 0o7777 | 0o001)  # ours, made 0700
    try:
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode & 0o7777)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """pytest's, searchable by the daemon's service user (see above)."""
    if os.geteuid() == 0:
        tmp_path.chmod(tmp_path.stat().st_mode & 0o7777 | 0o001)
    return tmp_path
