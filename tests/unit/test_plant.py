"""Issue 16's review, F2: root never uses a state directory another user
could have made first (spa.server.plant), and a restart trusts saved leases
only as far as the config does (spa.core.leases.restore_saved)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from spa.core.leases import Lease, restore_saved
from spa.server import admin
from spa.server.errors import LocalError
from spa.server.plant import refuse_planted_state_dir

NOBODY = 65534  # a service user (privsep.SERVICE_USERS): the tests' daemon runs as it
STRANGER = 4242  # nobody this machine knows: an ordinary local user

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown and the checks need root")


def a_dir(path: Path, mode: int, owner: int = 0) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    os.chown(path, owner, owner)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config file root owns, in root's private directory."""
    path = tmp_path / "server.toml"
    path.write_text("")
    return path


@root_only
@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o775, 0o757])
def test_a_state_dir_in_a_directory_others_may_write_is_refused(
        tmp_path: Path, config: Path, mode: int) -> None:
    """Sticky or not: in /tmp anyone can make the name first."""
    shared = a_dir(tmp_path / "shared", mode)
    for state in (shared / "try-state", shared / "deeper" / "state"):  # missing, or not
        with pytest.raises(LocalError, match=rf"^state directory {state} would be in "
                           rf"{shared}, which other users may write in \(mode {mode:04o}\)"):
            refuse_planted_state_dir(state, config=config)
    (shared / "try-state").mkdir()
    with pytest.raises(LocalError, match="other users may write in"):
        refuse_planted_state_dir(shared / "try-state", config=config)


@root_only
def test_a_state_dir_in_a_stranger_s_directory_is_refused(tmp_path: Path, config: Path) -> None:
    theirs = a_dir(tmp_path / "theirs", 0o755, STRANGER)
    with pytest.raises(LocalError, match=rf"in {theirs}, which other users may write in "
                       rf"\(owned by #{STRANGER} \(uid {STRANGER}\)\)"):
        refuse_planted_state_dir(theirs / "state", config=config)


@root_only
def test_a_state_dir_a_stranger_owns_is_refused_one_root_or_a_service_user_owns_is_not(
        tmp_path: Path, config: Path) -> None:
    state = a_dir(tmp_path / "state", 0o700, STRANGER)
    with pytest.raises(LocalError, match=rf"^state directory {state} is owned by #{STRANGER} "
                       rf"\(uid {STRANGER}\), neither root, the config's owner nor a service "
                       r"user .*chown root: "):
        refuse_planted_state_dir(state, config=config)
    for owner in (0, NOBODY):  # root's; the daemon's, once `run` handed it over
        os.chown(state, owner, owner)
        refuse_planted_state_dir(state, config=config)
    refuse_planted_state_dir(tmp_path / "missing", config=config)


@root_only
def test_the_config_s_owner_may_own_the_state_dir_and_its_parent(tmp_path: Path) -> None:
    """A user's own config and state, run by root (nobodys_config in the
    integration tests): both the user's, nobody else could plant them."""
    home = a_dir(tmp_path / "home", 0o700, STRANGER)
    config = home / "server.toml"
    config.write_text("")
    os.chown(config, STRANGER, STRANGER)
    state = a_dir(home / "state", 0o700, STRANGER)
    refuse_planted_state_dir(state, config=config)
    os.chown(config, 0, 0)
    with pytest.raises(LocalError, match="other users may write in"):
        refuse_planted_state_dir(state, config=config)


def test_anyone_but_root_is_not_checked(tmp_path: Path, config: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    refuse_planted_state_dir(shared / "try-state", config=config)


@root_only
def test_init_refuses_a_1777_directory_before_writing_anything(tmp_path: Path) -> None:
    shared = a_dir(tmp_path / "shared", 0o1777)
    with pytest.raises(LocalError, match="other users may write in"):
        admin.init(shared / "try.toml", listen_port=62201, backend="memory", state_dir=None,
                   force=False)
    with pytest.raises(LocalError, match="other users may write in"):
        admin.init(tmp_path / "server.toml", listen_port=62201, backend="memory",
                   state_dir=shared / "state", force=False)
    assert os.listdir(shared) == [] and not (tmp_path / "server.toml").exists()


# ---- saved leases ----------------------------------------------------------

NOW = 1_800_000_000.0
ADDRESS = ipaddress.ip_address("192.0.2.10")


def lease(client: str, service: str, expires: float) -> Lease:
    return Lease(client, ADDRESS, service, expires)


def test_a_saved_lease_ends_at_most_its_service_s_max_duration_from_now() -> None:
    """A 73-year lease in leases.json opens for 300 s (ssh's longest)."""
    saved = [lease("alice", "ssh", 4102444800), lease("alice", "https", NOW + 60),
             lease("alice", "ssh", float("inf"))]
    restored = restore_saved(saved, clients={"alice"}, max_durations={"ssh": 300, "https": 3600},
                             now=NOW)
    assert restored.kept == [lease("alice", "ssh", NOW + 300), lease("alice", "https", NOW + 60),
                             lease("alice", "ssh", NOW + 300)]
    assert (restored.dropped, restored.capped) == (0, 2)
    assert restored.note() == ("saved leases: dropped 0 of an unknown client or service, "
                               "cut 2 to their service's max_duration from now")


def test_a_saved_lease_of_an_unknown_client_or_service_is_dropped() -> None:
    saved = [lease("mallory", "ssh", NOW + 10), lease("alice", "telnet", NOW + 10),
             lease("alice", "ssh", float("nan")), lease("alice", "ssh", NOW - 5)]
    restored = restore_saved(saved, clients={"alice"}, max_durations={"ssh": 300}, now=NOW)
    assert restored.kept == [lease("alice", "ssh", NOW - 5)]  # (expired: the table drops it)
    assert (restored.dropped, restored.capped) == (3, 0)
    assert "dropped 3" in restored.note()
    assert restore_saved(restored.kept, clients={"alice"}, max_durations={"ssh": 300},
                         now=NOW).note() == ""
