"""`spa-server group ...` and enroll, revoke, rotate and clients on a group,
run in process through the real entry point (spa.cli.main) with the store
given as the in-memory fake (spa.server.groupstore.connect replaced): what
they print and write, and that every bad input is one line, exit status 2,
no traceback, no password."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spa import cli
from spa.core.uri import parse as parse_uri
from spa.group import layout
from spa.group.clients import decode_client
from spa.group.kv import KV
from spa.group.memory import MemoryStore
from spa.group.settings import GroupSettings
from spa.server import admin, groupstore
from spa.server import config as config_mod
from spa.server.groupstore import Login

ADMIN_PASSWORD = "adm1n-pa55-word"
MEMBER_PASSWORD = "m3mber-pa55"


@dataclass
class World:
    tmp: Path
    config: Path
    store: MemoryStore
    logins: list[Login | None] = field(default_factory=list)
    down: bool = False

    def files(self) -> list[str]:
        """The TLS options for a command that has no [group] table to read."""
        return ["--endpoint", "https://192.0.2.1:2379", "--ca", str(self.tmp / "ca.crt"),
                "--cert", str(self.tmp / "m.crt"), "--key", str(self.tmp / "m.key")]


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> World:
    store = MemoryStore(lambda: 1_790_000_000.0)
    found = World(tmp_path, tmp_path / "server.toml", store)

    def connect(settings: GroupSettings, login: Login | None = None) -> KV:
        found.logins.append(login)
        if login is None:  # a member: its role covers its group's prefix (RBAC's stand-in)
            groupstore.read_password(settings.password_file)
            return store.restricted(layout.group_prefix(settings.name).encode())
        return store

    def connect_one(settings: GroupSettings, endpoint: str, login: Login | None = None) -> KV:
        if found.down:
            down = MemoryStore(lambda: 0.0)
            down.unreachable = True
            return down
        return connect(settings, login)

    monkeypatch.setattr(groupstore, "connect", connect)
    monkeypatch.setattr(groupstore, "connect_one", connect_one)
    for name in ("admin-password", "password"):
        secret = ADMIN_PASSWORD if name.startswith("admin") else MEMBER_PASSWORD
        (tmp_path / name).write_text(secret + "\n")
        (tmp_path / name).chmod(0o600)
    return found


@pytest.fixture
def run(world: World, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Run:
    def run(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["spa-server", "--config", str(world.config), *args])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as done:
            cli.main()
        out = capsys.readouterr()
        for text in (out.out, out.err):
            assert ADMIN_PASSWORD not in text and MEMBER_PASSWORD not in text
        return int(done.value.code or 0), out.out, out.err

    assert run("init", "--state-dir", str(world.tmp / "state"), "--backend", "memory")[0] == 0
    return run


def one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    status, _, err = result
    assert status == 2, result
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def admin_options(world: World) -> list[str]:
    return ["--admin-user", "root", "--admin-password-file", str(world.tmp / "admin-password")]


def join_options(world: World, *more: str) -> list[str]:
    return ["group", "join", "--group", "office", "--member", "gw1",
            "--password-file", str(world.tmp / "password"), *world.files(), *more]


@pytest.fixture
def member(world: World, run: Run) -> World:
    """The config joined to group office (made by init with the admin's password on stdin)."""
    status, out, _ = run("group", "init", "--group", "office", *world.files(),
                         "--admin-user", "root", "--admin-password-file", "-",
                         stdin=ADMIN_PASSWORD + "\n")
    assert status == 0 and "group office created in etcd with a new random server id" in out
    assert world.logins[-1] == Login("root", ADMIN_PASSWORD)
    status, out, _ = run(*join_options(world))
    assert status == 0 and "this server is member gw1 of group office" in out, out
    return world


def test_a_client_of_the_group_from_enroll_to_rotate(member: World, run: Run) -> None:
    config = config_mod.load(member.config)
    assert config.group is not None and config.group.member == "gw1"
    assert config.group.user == "office-gw1"  # as group roles names it
    status, out, _ = run("enroll", "alice", "--service", "ssh", "--endpoint", "gw.example",
                         *admin_options(member))
    assert status == 0, out
    uri = next(line.strip() for line in out.splitlines() if "spa1://" in line)
    enrollment = parse_uri(uri)
    assert enrollment.server_id == config.server_id
    item = member.store.get(layout.client_key("office", "alice").encode())
    assert item is not None and decode_client(item.value, config.server_id).name == "alice"
    listing = run("clients")[1].splitlines()
    assert listing[1].split()[:3] == ["alice", "active", "ssh"]
    status, out, _ = run("revoke", "alice", "--close", *admin_options(member))
    assert status == 0 and "alice is revoked in group office" in out
    assert run("clients", "--state", "revoked")[1].splitlines()[1].split()[1] == "revoked"
    assert run("enroll", "bob", "--service", "ssh", "--endpoint", "gw.example", "--uri-only",
               *admin_options(member))[0] == 0
    status, out, _ = run("rotate", "bob", "--endpoint", "gw.example", "--grace", "10m",
                         *admin_options(member))
    assert status == 0 and "spa1://gw.example:62201/bob?" in out
    assert not (member.tmp / "state" / "clients.db").exists() or admin.load(
        member.config).clients == {}


def test_group_status_reports_and_fails_when_no_endpoint_answers(member: World,
                                                                 run: Run) -> None:
    run("enroll", "alice", "--service", "ssh", "--endpoint", "gw.example",
        *admin_options(member))
    status, out, _ = run("group", "status")
    assert status == 0, out
    assert "https://192.0.2.1:2379" in out and "ok" in out
    assert "clients: 1 (0 revoked, 1 active, 0 pending, 0 expired)" in out
    shown = json.loads(run("group", "status", "--json")[1])
    assert shown["endpoints"] == [{"url": "https://192.0.2.1:2379", "answered": True,
                                   "detail": "ok"}]
    assert shown["clients"]["active"] == 1 and shown["group"] == "office"
    member.down = True
    status, out, err = run("group", "status")
    assert status == 1 and "etcd: no endpoint answered" in err
    assert "unreachable" in out
    shown = json.loads(run("group", "status", "--json")[1])
    assert not shown["endpoints"][0]["answered"] and "clients" not in shown


def test_a_standalone_servers_clients_move_into_a_new_group(world: World, run: Run) -> None:
    status, out, _ = run("enroll", "alice", "--service", "ssh", "--endpoint", "203.0.113.1")
    uri = next(line.strip() for line in out.splitlines() if "spa1://" in line)
    status, out, _ = run("group", "init", "--group", "office", "--from-this-server",
                         *world.files(), *admin_options(world))
    assert status == 0, out
    assert "with this server's server id" in out and "added 1: alice" in out
    status, out, _ = run(*join_options(world))
    assert status == 0, out  # the same server id: its own clients are the group's now
    assert config_mod.load(world.config).server_id == parse_uri(uri).server_id
    assert run("clients")[1].splitlines()[1].split()[:2] == ["alice", "active"]
    assert "already in the group: alice" in run("group", "import", *admin_options(world))[1]


@pytest.mark.parametrize(("args", "says"), [
    (("enroll", "alice", "--service", "ssh", "--endpoint", "gw.example"),
     "enroll in group office writes to etcd as the group's admin: give --admin-user"),
    (("revoke", "alice"), "revoke in group office writes to etcd"),
    (("rotate", "alice", "--endpoint", "gw.example"), "rotate in group office writes"),
    (("enroll", "alice", "--service", "ssh", "--endpoint", "gw.example", "--admin-user",
      "root"), "give --admin-user USER and --admin-password-file FILE together"),
    (("enroll", "alice", "--service", "ssh", "--endpoint", "gw.example", "--admin-user",
      "a b", "--admin-password-file", "-"), "--admin-user: user 'a b'"),
    (("revoke", "nobody", "--admin-user", "root", "--admin-password-file", "-"),
     "standard input held no password"),
    (("rotate", "alice", "--admin-user", "root", "--admin-password-file", "PW"),
     "give --endpoint HOST[:PORT]"),
    (("revoke", "nobody", "--admin-user", "root", "--admin-password-file", "PW"),
     "no client named 'nobody' in group office"),
    (("clients", "--state", "gone"), "--state 'gone': choose one of"),
    (("group", "join", "--group", "other"), "Missing option"),
    (("group", "init", "--group", "Office", "--admin-user", "root",
      "--admin-password-file", "PW"), "--group: group name 'Office'"),
    (("group", "init", "--group", "office", "--admin-user", "root",
      "--admin-password-file", "PW"), "group office exists already in etcd"),
    (("group", "init", "--admin-user", "root", "--admin-password-file", "PW",
      "--from-this-server"), "is a member of group office already"),
])
def test_every_bad_input_on_a_member_is_one_line(member: World, run: Run,
                                                 args: tuple[str, ...], says: str) -> None:
    args = tuple(str(member.tmp / "admin-password") if a == "PW" else a for a in args)
    one_line_error(run(*args), says)


@pytest.mark.parametrize(("args", "says"), [
    (("enroll", "alice", "--service", "ssh", "--endpoint", "gw.example", "--admin-user",
      "root", "--admin-password-file", "PW"), "--admin-user is for a group member's config"),
    (("group", "status",), "names no group ([group]); join one with: spa-server group join"),
    (("group", "init", "--admin-user", "root", "--admin-password-file", "PW"),
     "name the group with --group NAME"),
    (("group", "init", "--group", "office", "--admin-user", "root",
      "--admin-password-file", "PW"), "give --endpoint URL"),
    (("group", "init", "--group", "office", "--endpoint", "https://192.0.2.1:2379",
      "--admin-user", "root", "--admin-password-file", "PW"), "give --ca FILE"),
    (("group", "init", "--group", "office"), "group init writes to etcd as the group's admin"),
    (("group", "init", "--group", "office", "--endpoint", "http://192.0.2.1:2379",
      "--admin-user", "root", "--admin-password-file", "PW"),
     "--endpoint: endpoint 'http://192.0.2.1:2379': write https://HOST:PORT"),
    (("group", "init", "--group", "office", "--timeout", "99", "--endpoint",
      "https://192.0.2.1:2379", "--ca", "c", "--cert", "c", "--key", "k", "--admin-user",
      "root", "--admin-password-file", "PW"), "--timeout timeout = 99"),
    (("group", "init", "--group", "office", "--admin-user", "root",
      "--admin-password-file", "NOFILE"), "admin password file"),
    (("group", "import", "--group", "office", "--admin-user", "root",
      "--admin-password-file", "PW"), "give --endpoint URL"),
    (("group", "status", "--admin-password", "x"), "No such option"),
])
def test_every_bad_input_on_a_standalone_server_is_one_line(world: World, run: Run,
                                                            args: tuple[str, ...],
                                                            says: str) -> None:
    args = tuple(str(world.tmp / "admin-password") if a == "PW" else
                 str(world.tmp / "none") if a == "NOFILE" else a for a in args)
    one_line_error(run(*args), says)


@pytest.mark.parametrize(("change", "says"), [
    (("--member", "../gw"), "group join: member name '../gw'"),
    (("--on-store-down", "open"), "choose fail_closed or local_only"),
    (("--timeout", "0"), "group join: timeout = 0"),
    (("--endpoint", "https://192.0.2.1:2379/v3"), "no path"),
])
def test_a_bad_join_writes_nothing(world: World, run: Run, change: tuple[str, ...],
                                   says: str) -> None:
    before = world.config.read_text()
    one_line_error(run(*join_options(world, *change)), says)
    assert world.config.read_text() == before


def test_join_before_the_group_exists_or_with_an_open_password_file(world: World,
                                                                     run: Run) -> None:
    before = world.config.read_text()
    one_line_error(run(*join_options(world)), "group office does not exist in etcd")
    (world.tmp / "password").chmod(0o644)
    one_line_error(run(*join_options(world)), "chmod 600")
    assert world.config.read_text() == before


def test_join_with_local_only_warns_with_the_risk(world: World, run: Run) -> None:
    assert run("group", "init", "--group", "office", *world.files(),
               *admin_options(world))[0] == 0
    status, out, _ = run(*join_options(world, "--on-store-down", "local_only"))
    assert status == 0 and "warning: local_only: while etcd cannot be reached" in out


@pytest.mark.parametrize("args", [("clients", "export"), ("clients", "import", "x.json")])
def test_what_works_on_the_local_store_only_says_so_on_a_member(member: World, run: Run,
                                                                 args: tuple[str, ...]) -> None:
    if args[1] == "import":
        (member.tmp / "x.json").write_text("{}")
        args = (*args[:2], str(member.tmp / "x.json"))
    one_line_error(run(*args), "this server is a member of group office, whose clients are "
                   "in etcd")


def test_status_points_a_member_to_group_status(member: World, run: Run) -> None:
    status, out, _ = run("status")
    assert status == 0 and "clients: group office's, in etcd: see spa-server group status" in out


def test_roles_prints_the_etcdctl_commands_without_a_password(world: World, run: Run) -> None:
    status, out, _ = run("group", "roles", "--group", "office", "--member", "gw1")
    assert status == 0
    lines = out.splitlines()
    assert ("etcdctl role grant-permission spa-office-member --prefix=true read "
            "/spa/groups/office/") in lines
    assert ("etcdctl role grant-permission spa-office-m-gw1 readwrite "
            "/spa/groups/office/members/gw1") in lines
    writes = [line.split()[-1] for line in lines if "spa-office-member --prefix=true "
              "readwrite" in line]
    assert writes == ["/spa/groups/office/claims/", "/spa/groups/office/leases/",
                      "/spa/groups/office/activated/"]
    assert all("--interactive=true" in line for line in lines if " user add " in line)
    one_line_error(run("group", "roles", "--group", "Office"), "--group or --member")
    one_line_error(run("group", "roles", "--group", "office", "--member", "a/b"),
                   "member name 'a/b'")


def test_no_command_takes_a_password_as_an_argument() -> None:
    import typer.main

    def walk(command: Any, path: str) -> list[tuple[str, str]]:  # click's, or typer's own
        found = [(path, p.name or "") for p in command.params if "password" in (p.name or "")]
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, f"{path} {name}")
        return found

    taking = walk(typer.main.get_command(cli.app), "spa-server")
    assert ("spa-server group join", "password_file") in taking
    assert ("spa-server enroll", "admin_password_file") in taking
    assert all(name.endswith("password_file") for _, name in taking), taking


def test_a_members_own_clients_are_listed_with_local(world: World, run: Run) -> None:
    assert run("enroll", "alice", "--service", "ssh", "--endpoint", "203.0.113.1")[0] == 0
    assert run("group", "init", "--group", "office", *world.files(),
               *admin_options(world))[0] == 0
    one_line_error(run(*join_options(world)), "1 client(s) enrolled at this server")
    assert run(*join_options(world, "--force"))[0] == 0
    status, out, err = run("clients")
    assert status == 0 and out.startswith("no clients enrolled")
    assert "own store holds 1 client(s) too, not the group's: spa-server clients --local" in err
    status, out, _ = run("clients", "--local")
    assert status == 0 and out.splitlines()[1].split()[0] == "alice"


def test_clients_set_rewrites_the_groups_record(member: World, run: Run) -> None:
    assert run("enroll", "alice", "--service", "ssh", "--endpoint", "gw.example",
               *admin_options(member))[0] == 0
    one_line_error(run("clients", "set", "alice", "--from", "192.0.2.0/24"),
                   "clients set in group office writes to etcd")
    status, out, _ = run("clients", "set", "alice", "--from", "192.0.2.0/24",
                         *admin_options(member))
    assert status == 0 and "alice: knocks accepted only from 192.0.2.0/24 now" in out
    config = config_mod.load(member.config)
    item = member.store.get(layout.client_key("office", "alice").encode())
    assert item is not None
    assert decode_client(item.value, config.server_id).sources == ("192.0.2.0/24",)
    assert "nothing changed" in run("clients", "set", "alice", "--from", "192.0.2.0/24",
                                    *admin_options(member))[1]
    one_line_error(run("clients", "set", "bob", "--no-from", *admin_options(member)),
                   "no client named 'bob' in group office")
