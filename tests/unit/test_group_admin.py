"""The group's admin side on the in-memory store (spa.group.memory): the
[group] table, the password file, init, join, enroll, revoke, rotate, the
client list, status and the import of a standalone server's clients."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import tomlkit

from spa.core.keys import SERVER_ID_SIZE, derive_keys
from spa.core.uri import parse as parse_uri
from spa.group import layout
from spa.group.clients import decode_client
from spa.group.memory import MemoryStore
from spa.group.policy import OnStoreDown
from spa.group.records import (
    Activation,
    LeaseRecord,
    Member,
    decode_meta,
    decode_revocation,
    encode_activation,
    encode_lease,
    encode_member,
)
from spa.group.settings import GroupSettings
from spa.server import admin, admin_group, admin_groupsetup, groupstore
from spa.server import config as config_mod
from spa.server.errors import ConfigError, LocalError
from spa.server.groupconfig import parse_group

NOW = 1_790_000_000.0
GROUP = "office"
GROUP_ID = bytes(range(1, SERVER_ID_SIZE + 1))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def settings(tmp_path: Path, **changes: object) -> GroupSettings:
    values: dict[str, object] = dict(
        name=GROUP, member="gw1", endpoints=("https://192.0.2.1:2379",),
        ca_file=tmp_path / "ca.crt", cert_file=tmp_path / "m.crt", key_file=tmp_path / "m.key",
        user="office-gw1", password_file=tmp_path / "password")
    values.update(changes)
    return GroupSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(Clock())


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "server.toml"
    admin.init(path, listen_port=62201, backend="memory", state_dir=tmp_path / "state",
               force=False, services=["ssh", "https"])
    return path


def made_group(store: MemoryStore, tmp_path: Path, server_id: bytes = GROUP_ID) -> GroupSettings:
    group = settings(tmp_path)
    admin_groupsetup.init(store, group, "root", server_id=server_id, now=NOW)
    return group


def joined(store: MemoryStore, tmp_path: Path, config_path: Path) -> config_mod.ServerConfig:
    group = made_group(store, tmp_path)
    config, _ = admin_groupsetup.join(config_path, group, store)
    return config


# ---- the [group] table ----------------------------------------------------------

GOOD = {"name": "office", "member": "gw1.example", "endpoints": ["https://10.0.0.1:2379",
                                                                  "https://[2001:db8::1]",
                                                                  "https://etcd.example:2381/"],
        "ca_file": "etcd/ca.crt", "cert_file": "/etc/spa/m.crt", "key_file": "/etc/spa/m.key",
        "user": "office-gw1", "password_file": "/etc/spa/pw"}


def test_a_group_table_parses_into_group_settings(tmp_path: Path) -> None:
    parsed = parse_group
    found = parsed(tmp_path / "server.toml", {"group": GOOD})
    assert found is not None
    assert found.endpoints == ("https://10.0.0.1:2379", "https://[2001:db8::1]:2379",
                               "https://etcd.example:2381")
    assert found.ca_file == tmp_path / "etcd" / "ca.crt"  # beside the config
    assert found.on_store_down is OnStoreDown.FAIL_CLOSED and found.timeout == 2.0
    assert parsed(tmp_path / "server.toml", {}) is None
    local = parsed(tmp_path / "x.toml", {"group": {**GOOD, "on_store_down": "local_only",
                                                   "timeout": 5}})
    assert local is not None and local.on_store_down is OnStoreDown.LOCAL_ONLY


@pytest.mark.parametrize(("change", "says"), [
    ({"name": "Office"}, "group name 'Office': use a-z"),
    ({"name": "a/b"}, "group name"),
    ({"member": "../x"}, "member name '../x'"),
    ({"endpoints": []}, "endpoints is empty"),
    ({"endpoints": ["http://10.0.0.1:2379"]}, "write https://HOST:PORT"),
    ({"endpoints": ["https://10.0.0.1:2379/v3"]}, "no path"),
    ({"endpoints": ["https://u@10.0.0.1:2379"]}, "no path, user"),
    ({"endpoints": ["https://10.0.0.1:0"]}, "port must be 1-65535"),
    ({"endpoints": ["https://2001:db8::1:2379"]}, "in brackets"),
    ({"endpoints": ["https://10.0.0.1:2379", "https://10.0.0.1"]}, "twice"),
    ({"endpoints": ["https://bad_host:2379"]}, "neither an IP address nor a DNS name"),
    ({"endpoints": "https://10.0.0.1:2379"}, "endpoints must be a list"),
    ({"endpoints": [2379]}, "give URLs as strings"),
    ({"timeout": 0}, "timeout = 0: give seconds between 0.1 and 30"),
    ({"timeout": 31}, "between 0.1 and 30"),
    ({"timeout": "2"}, "timeout must be a number"),
    ({"on_store_down": "open"}, "choose fail_closed or local_only"),
    ({"user": "a b"}, "user 'a b'"),
    ({"password": "hunter2"}, "holds no etcd password"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"ca_file": ""}, "ca_file is empty"),
])
def test_a_bad_group_table_is_one_line_with_the_fix(tmp_path: Path, change: dict[str, object],
                                                    says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_group(tmp_path / "s.toml", {"group": {**GOOD, **change}})
    message = str(caught.value)
    assert says in message and "\n" not in message, message
    assert message.startswith(f"{tmp_path / 's.toml'}: [group]")
    assert "hunter2" not in message


@pytest.mark.parametrize("missing", sorted(set(GOOD)))
def test_a_missing_group_key_names_the_line_to_write(tmp_path: Path, missing: str) -> None:
    table = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ConfigError, match=f"needs {missing}, e.g. {missing} = "):
        parse_group(tmp_path / "s.toml", {"group": table})


def test_the_store_down_risk_is_in_the_refusal(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_group(tmp_path / "s.toml", {"group": {**GOOD,
                                                                 "on_store_down": "x"}})
    assert "captured on the way to one member" in str(caught.value)


def test_the_config_file_carries_its_group(config_path: Path) -> None:
    text = config_path.read_text() + "\n[group]\n" + "\n".join(
        f"{k} = {tomlkit.item(v).as_string()}" for k, v in GOOD.items()) + "\n"
    config_path.write_text(text)
    config = config_mod.load(config_path)
    assert config.group is not None and config.group.name == "office"
    assert config_mod.load(config_path).group == config.group


# ---- the password file ----------------------------------------------------------


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_password_file_is_read_when_private(tmp_path: Path) -> None:
    assert groupstore.read_password(write(tmp_path / "pw", "s3cret pass\n")) == "s3cret pass"


@pytest.mark.parametrize(("text", "mode", "says"), [
    ("s3cret\n", 0o640, "chmod 600"),
    ("s3cret\n", 0o604, "accessible to group or others"),
    ("", 0o600, "alone on one line"),
    ("s3cret\nmore\n", 0o600, "alone on one line"),
])
def test_a_bad_password_file_is_refused_without_its_content(tmp_path: Path, text: str,
                                                            mode: int, says: str) -> None:
    path = write(tmp_path / "pw", text, mode)
    with pytest.raises(LocalError) as caught:
        groupstore.read_password(path)
    assert says in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_password_file_behind_a_link_or_missing_is_refused(tmp_path: Path) -> None:
    target = write(tmp_path / "real", "s3cret\n")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(LocalError, match="symbolic link"):
        groupstore.read_password(tmp_path / "link")
    with pytest.raises(LocalError, match="does not exist; create it"):
        groupstore.read_password(tmp_path / "none")
    os.link(target, tmp_path / "second")
    with pytest.raises(LocalError, match="hard links"):
        groupstore.read_password(target)


def test_the_tls_files_are_checked_before_anything_connects(tmp_path: Path) -> None:
    group = settings(tmp_path)
    with pytest.raises(LocalError, match=r"etcd CA file .* does not exist"):
        groupstore.access(group)
    for name in ("ca.crt", "m.crt"):
        write(tmp_path / name, "-----BEGIN CERTIFICATE-----\n")
    write(tmp_path / "m.key", "key\n", 0o644)
    with pytest.raises(LocalError, match="chmod 600"):
        groupstore.access(group)
    (tmp_path / "m.key").chmod(0o600)
    write(tmp_path / "password", "pw-of-gw1\n")
    access = groupstore.access(group)
    assert access.user == "office-gw1" and access.password == "pw-of-gw1"
    assert "pw-of-gw1" not in repr(access)
    admin_login = groupstore.Login("root", "the-admin-pw")
    assert groupstore.access(group, admin_login).user == "root"
    assert "the-admin-pw" not in repr(admin_login)


# ---- init and join -------------------------------------------------------------


def test_init_creates_the_meta_record_once(store: MemoryStore, tmp_path: Path) -> None:
    group = made_group(store, tmp_path)
    item = store.get(layout.meta_key(GROUP).encode())
    assert item is not None
    meta = decode_meta(item.value)
    assert (meta.group, meta.server_id, meta.created) == (GROUP, GROUP_ID, int(NOW))
    with pytest.raises(LocalError, match="group office exists already in etcd; join it"):
        admin_groupsetup.init(store, group, "root", server_id=bytes(16), now=NOW + 1)
    assert store.get(layout.meta_key(GROUP).encode()) == item  # never overwritten


def test_join_writes_the_group_and_its_server_id_keeping_comments(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    config_path.write_text("# my own note\n" + config_path.read_text())
    config = joined(store, tmp_path, config_path)
    assert config.group == settings(tmp_path)
    assert config.server_id == GROUP_ID
    text = config_path.read_text()
    assert text.startswith("# my own note\n") and "[group]" in text
    assert "fail_closed: no grant while etcd cannot be reached" in text
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    assert config_mod.load(config_path) == config


def test_join_writes_the_risk_of_local_only_beside_it(store: MemoryStore, tmp_path: Path,
                                                      config_path: Path) -> None:
    made_group(store, tmp_path)
    admin_groupsetup.join(config_path, settings(tmp_path, on_store_down=OnStoreDown.LOCAL_ONLY),
                          store)
    assert 'on_store_down = "local_only" # RISK: local_only: while etcd' in (
        config_path.read_text())


def test_join_refuses_a_missing_group_an_unreadable_one_and_another_group(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    before = config_path.read_text()
    with pytest.raises(LocalError, match=r"group office does not exist in etcd .* group init"):
        admin_groupsetup.join(config_path, settings(tmp_path), store)
    made_group(store, tmp_path)
    other = store.restricted(layout.group_prefix("other").encode())
    with pytest.raises(LocalError, match="etcd user 'office-gw1' has no such right on "
                                         "/spa/groups/office/"):
        admin_groupsetup.join(config_path, settings(tmp_path), other)
    store.unreachable = True
    with pytest.raises(LocalError, match=r"unreachable .* check that etcd runs at "
                                         r"https://192.0.2.1:2379"):
        admin_groupsetup.join(config_path, settings(tmp_path), store)
    store.unreachable = False
    assert config_path.read_text() == before
    admin_groupsetup.join(config_path, settings(tmp_path), store)
    admin_groupsetup.init(store, settings(tmp_path, name="lab"), "root", server_id=GROUP_ID,
                          now=NOW)
    with pytest.raises(LocalError, match="member of group office already"):
        admin_groupsetup.join(config_path, settings(tmp_path, name="lab"), store)


def test_join_refuses_to_strand_this_servers_own_clients(store: MemoryStore, tmp_path: Path,
                                                         config_path: Path) -> None:
    admin.enroll(config_path, "alice", ["ssh"], "203.0.113.1", now=NOW)
    made_group(store, tmp_path)
    with pytest.raises(LocalError, match="1 client\\(s\\) enrolled at this server hold keys "
                                         "for its own server id"):
        admin_groupsetup.join(config_path, settings(tmp_path), store)
    config, _ = admin_groupsetup.join(config_path, settings(tmp_path), store, force=True)
    assert config.server_id == GROUP_ID


def test_a_server_id_that_is_not_the_groups_is_refused(store: MemoryStore, tmp_path: Path,
                                                       config_path: Path) -> None:
    config = joined(store, tmp_path, config_path)
    text = config_path.read_text().replace(config_mod.b64encode(GROUP_ID),
                                           config_mod.b64encode(bytes(range(2, 18))))
    config_path.write_text(text)
    with pytest.raises(ConfigError, match=r"server_id is not group office's .* group join"):
        admin_group.enroll(store, config.group or settings(tmp_path), "root",
                           config_mod.load(config_path), "alice", ["ssh"], "gw.example",
                           expires=None, now=NOW, otp=False, sources=())


# ---- clients ---------------------------------------------------------------------


def counting_random() -> object:
    drawn: list[bytes] = []

    def random(size: int) -> bytes:
        drawn.append(os.urandom(size))
        return drawn[-1]
    random.drawn = drawn  # type: ignore[attr-defined]
    return random


def test_enroll_writes_derived_keys_only_and_prints_the_groups_uri(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    config = joined(store, tmp_path, config_path)
    assert config.group is not None
    made = admin_group.enroll(store, config.group, "root", config, "alice", ["ssh", "ssh"],
                              "gw.example", expires=None, now=NOW, otp=True,
                              sources=("192.0.2.0/24",))
    enrollment = parse_uri(made.uri)
    assert enrollment.server_id == GROUP_ID and enrollment.host == "gw.example"
    assert enrollment.otp and made.otp_uri is not None
    assert [s.name for s in enrollment.services] == ["ssh"]
    item = store.get(layout.client_key(GROUP, "alice").encode())
    assert item is not None
    assert config_mod.b64encode(enrollment.secret).encode() not in item.value
    assert enrollment.secret not in item.value
    client = decode_client(item.value, GROUP_ID)
    assert client.keys == derive_keys(enrollment.secret, GROUP_ID)
    assert client.sources == ("192.0.2.0/24",) and client.otp_secret
    assert not os.path.exists(config.state_dir / "clients.db")  # nothing kept here
    with pytest.raises(LocalError, match="'alice' is already enrolled in group office"):
        admin_group.enroll(store, config.group, "root", config, "alice", ["ssh"],
                           "gw.example", expires=None, now=NOW, otp=False, sources=())
    assert store.get(layout.client_key(GROUP, "alice").encode()) == item


@pytest.mark.parametrize(("name", "services", "endpoint", "says"), [
    ("bad name", ["ssh"], "gw.example", "client name 'bad name'"),
    ("alice", ["smtp"], "gw.example", "unknown service 'smtp'"),
    ("alice", [], "gw.example", "name at least one service"),
    ("alice", ["ssh"], "gw.example:99999", "out of range"),
])
def test_a_bad_enrollment_writes_nothing(store: MemoryStore, tmp_path: Path, config_path: Path,
                                         name: str, services: list[str], endpoint: str,
                                         says: str) -> None:
    config = joined(store, tmp_path, config_path)
    assert config.group is not None
    revision = store.revision
    with pytest.raises(LocalError, match=says):
        admin_group.enroll(store, config.group, "root", config, name, services, endpoint,
                           expires=None, now=NOW, otp=False, sources=())
    assert store.revision == revision


def test_a_member_login_cannot_enroll_where_its_role_reads_only(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    config = joined(store, tmp_path, config_path)
    assert config.group is not None
    claims_only = store.restricted(layout.kind_prefix(GROUP, layout.Kind.CLAIM).encode())
    with pytest.raises(LocalError, match="permission denied"):
        admin_group.enroll(claims_only, config.group, "office-gw1", config, "alice", ["ssh"],
                           "gw.example", expires=None, now=NOW, otp=False, sources=())


def test_revoke_writes_its_own_key_and_close_is_added_later(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    config = joined(store, tmp_path, config_path)
    group = config.group
    assert group is not None
    admin_group.enroll(store, group, "root", config, "alice", ["ssh"], "gw.example",
                       expires=None, now=NOW, otp=False, sources=())
    lease = LeaseRecord("alice", layout.check_address("192.0.2.7"), "ssh", "tcp", 22,
                        NOW + 60, "gw2")
    store.put(layout.lease_key(GROUP, "alice", lease.address, "ssh").encode(),
              encode_lease(lease))
    record = store.get(layout.client_key(GROUP, "alice").encode())
    done = admin_group.revoke(store, group, "root", "alice", now=NOW)
    assert done.changed and "stay until they expire, at most 60 s" in done.message
    item = store.get(layout.revoked_key(GROUP, "alice").encode())
    assert item is not None
    assert decode_revocation(item.value).close is False
    assert store.get(layout.client_key(GROUP, "alice").encode()) == record
    assert not admin_group.revoke(store, group, "root", "alice", now=NOW + 5).changed
    closed = admin_group.revoke(store, group, "root", "alice", now=NOW + 9, close=True)
    assert closed.changed and "end as well" in closed.message
    item = store.get(layout.revoked_key(GROUP, "alice").encode())
    assert item is not None
    assert decode_revocation(item.value).close and decode_revocation(item.value).at == int(NOW)
    with pytest.raises(LocalError, match="no client named 'bob' in group office"):
        admin_group.revoke(store, group, "root", "bob", now=NOW)
    with pytest.raises(LocalError, match="no client named"):
        admin_group.revoke(store, group, "root", "../x", now=NOW)


def test_rotate_writes_new_keys_and_keeps_the_old_ones_for_the_grace(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    config = joined(store, tmp_path, config_path)
    group = config.group
    assert group is not None
    first = parse_uri(admin_group.enroll(store, group, "root", config, "alice", ["https"],
                                         "gw.example", expires=None, now=NOW, otp=False,
                                         sources=()).uri)
    with pytest.raises(LocalError, match="give --endpoint HOST"):
        admin_group.rotate(store, group, "root", config, "alice", grace=0, now=NOW,
                           endpoint=None)
    uri = admin_group.rotate(store, group, "root", config, "alice", grace=600.5, now=NOW,
                             endpoint="gw.example:7000")
    second = parse_uri(uri)
    assert second.port == 7000 and second.secret != first.secret
    item = store.get(layout.client_key(GROUP, "alice").encode())
    assert item is not None
    client = decode_client(item.value, GROUP_ID)
    assert client.keys == derive_keys(second.secret, GROUP_ID)
    assert client.old_keys == derive_keys(first.secret, GROUP_ID)
    assert client.old_until == int(NOW) + 601
    assert set(client.key_sets(NOW + 600)) == {"alice", "alice~old"}
    assert set(client.key_sets(NOW + 601)) == {"alice"}
    admin_group.rotate(store, group, "root", config, "alice", grace=0, now=NOW,
                       endpoint="gw.example")
    item = store.get(layout.client_key(GROUP, "alice").encode())
    assert item is not None
    assert decode_client(item.value, GROUP_ID).old_keys is None
    admin_group.revoke(store, group, "root", "alice", now=NOW)
    with pytest.raises(LocalError, match="alice is revoked in group office"):
        admin_group.rotate(store, group, "root", config, "alice", grace=0, now=NOW,
                           endpoint="gw.example")


def test_the_client_list_decides_states_as_the_standalone_list_does(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    config = joined(store, tmp_path, config_path)
    group = config.group
    assert group is not None
    for name, expires in (("active", None), ("pending", 3600.0), ("expired", 10.0),
                          ("knocked", 10.0), ("revoked", None)):
        admin_group.enroll(store, group, "root", config, name, ["ssh"], "gw.example",
                           expires=expires, now=NOW, otp=False, sources=())
    store.put(layout.activated_key(GROUP, "knocked").encode(),
              encode_activation(Activation("knocked", int(NOW) + 10)))
    admin_group.revoke(store, group, "root", "revoked", now=NOW)
    meta = groupstore.read_meta(store, group, "gw1")
    rows = admin_group.client_entries(store, group, "gw1", meta, now=NOW + 60)
    states = {entry.name: state for entry, state in rows}
    assert states == {"active": "active", "expired": "expired", "knocked": "active",
                      "pending": f"pending until {config_mod.format_utc(NOW + 3600)}",
                      "revoked": "revoked"}
    assert all(entry.secret == b"" for entry, _ in rows)


def test_status_counts_members_clients_and_live_leases(store: MemoryStore, tmp_path: Path,
                                                       config_path: Path) -> None:
    config = joined(store, tmp_path, config_path)
    group = config.group
    assert group is not None
    for name in ("a", "b"):
        admin_group.enroll(store, group, "root", config, name, ["ssh"], "gw.example",
                           expires=None, now=NOW, otp=False, sources=())
    admin_group.revoke(store, group, "root", "b", now=NOW)
    store.put(layout.member_key(GROUP, "gw1").encode(), encode_member(Member("gw1", NOW)))
    for until in (NOW + 30, NOW - 30):
        lease = LeaseRecord("a", layout.check_address("192.0.2.7"), "ssh", "tcp", 22, until,
                            "gw1")
        store.put(layout.lease_key(GROUP, "a", lease.address, f"s{int(until) % 7}").encode(),
                  encode_lease(lease))
    found = admin_groupsetup.status(store, group, "gw1", now=NOW)
    assert [m.member for m in found.members] == ["gw1"]
    assert found.counts == {"revoked": 1, "active": 1, "pending": 0, "expired": 0}
    assert found.leases == 1 and found.revision == store.revision
    store.unreachable = True
    with pytest.raises(LocalError, match="unreachable"):
        admin_groupsetup.status(store, group, "gw1", now=NOW)


# ---- a standalone server's clients into the group -------------------------------


def test_import_brings_a_standalone_servers_clients_in_under_its_own_id(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    uri = admin.enroll(config_path, "alice", ["ssh"], "203.0.113.1", now=NOW)
    admin.enroll(config_path, "bob", ["ssh"], "203.0.113.1", now=NOW)
    admin.enroll(config_path, "carol", ["ssh"], "203.0.113.1", now=NOW, expires=60)
    admin.revoke(config_path, "bob", now=NOW, close=True)
    config = config_mod.load(config_path)
    from spa.server.state import StateDir

    StateDir(config.state_dir).save_activated({"carol": config_mod.format_utc(NOW + 60)})
    group = settings(tmp_path)
    admin_groupsetup.init(store, group, "root", server_id=config.server_id, now=NOW)
    report = admin_groupsetup.import_here(config_path, group, store, "root", now=NOW)
    assert report.added == ["alice", "bob", "carol"] and not report.skipped
    enrollment = parse_uri(uri)
    item = store.get(layout.client_key(GROUP, "alice").encode())
    assert item is not None
    assert decode_client(item.value, config.server_id).keys == derive_keys(
        enrollment.secret, enrollment.server_id)  # alice's URI works at every member
    revoked = store.get(layout.revoked_key(GROUP, "bob").encode())
    assert revoked is not None and decode_revocation(revoked.value).close
    assert store.get(layout.activated_key(GROUP, "carol").encode()) is not None
    again = admin_groupsetup.import_here(config_path, group, store, "root", now=NOW + 5)
    assert again.added == [] and again.unchanged == ["alice", "bob", "carol"]
    admin.rotate(config_path, "alice", grace=0, now=NOW + 9)
    third = admin_groupsetup.import_here(config_path, group, store, "root", now=NOW + 9)
    assert third.differ == ["alice"]
    assert store.get(layout.client_key(GROUP, "alice").encode()) == item  # kept


def test_import_refuses_a_server_whose_id_is_not_the_groups(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    admin.enroll(config_path, "alice", ["ssh"], "203.0.113.1", now=NOW)
    group = made_group(store, tmp_path)
    revision = store.revision
    with pytest.raises(LocalError, match=r"another server id than .* enroll them in the group "
                                         r"anew"):
        admin_groupsetup.import_here(config_path, group, store, "root", now=NOW)
    assert store.revision == revision


def test_import_skips_an_fwknop_client_and_says_how_to_move_it(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    config = config_mod.load(config_path)
    entry = config_mod.ClientEntry("legacy", b"", ("ssh",), kind="fwknop",
                                   fwknop_key=b"k" * 16, fwknop_hmac_key=b"h" * 32)
    group = settings(tmp_path)
    meta = admin_groupsetup.init(store, group, "root", server_id=config.server_id, now=NOW)
    report = admin_groupsetup.import_clients(store, group, "root", meta, config, [entry],
                                             activated={}, now=NOW)
    assert report.skipped and report.skipped[0][0] == "legacy"
    assert "move it to spa1:// with rotate" in report.lines()[-1]
    assert store.get(layout.client_key(GROUP, "legacy").encode()) is None


def test_without_the_group_library_a_group_command_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "spa.group.etcd", None)  # as if etcd3gw were missing
    with pytest.raises(LocalError, match=r"needs the etcd3gw library: install the group "
                                         r"extra: pip install 'spa\[group\]'"):
        groupstore.connect(settings(tmp_path))


def test_join_counts_only_clients_whose_keys_the_new_id_breaks(
        store: MemoryStore, tmp_path: Path, config_path: Path) -> None:
    admin.enroll(config_path, "gone", ["ssh"], "203.0.113.1", now=NOW)
    admin.revoke(config_path, "gone", now=NOW)
    config = config_mod.load(config_path)
    with admin.open_store(config, now=NOW) as clients:
        clients.add(config_mod.ClientEntry("legacy", b"", ("ssh",), kind="fwknop",
                                           fwknop_key=b"k" * 16, fwknop_hmac_key=b"h" * 32),
                    at=NOW)
    assert admin_groupsetup.local_client_count(config) == 0
    made_group(store, tmp_path)
    joined_config, _ = admin_groupsetup.join(config_path, settings(tmp_path), store)
    assert joined_config.server_id == GROUP_ID
