"""Loose ends of a member (issue 18), on the memory fake and a fake clock:
another member's lease of a service this member cannot install, a rotation
racing the members' grants, a restart while etcd is down, an authenticator
code used at one member and sent to another (docs/groups.md)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nacl.pwhash
import pyotp
import pytest
from starlette.testclient import TestClient

from spa.core.errors import Reason
from spa.core.keys import MASTER_SECRET_SIZE, derive_keys
from spa.core.otp import DRIFT, STEP
from spa.core.verify import Accepted, Refused
from spa.core.wire import Action, Request, build_packet
from spa.group import layout
from spa.group.claims import Inline
from spa.group.link import GroupLink
from spa.group.memory import MemoryStore
from spa.group.otpclaim import otp_claim_ttl, otp_claim_until
from spa.group.records import MEMBER_SKEW, LeaseRecord, encode_lease
from spa.server import admin_group, webauth
from spa.server import config as config_mod
from spa.server.daemon import Server
from spa.server.dashboard import Dashboard, make_app
from spa.server.state import describe_group
from tests.group_world import ADDRESS, GROUP, SOURCE, Group, settings
from tests.server_world import START, FakeClock, World

NAMED = ('\n[services.db]\nport = 22\ndefault_duration = 60\nmax_duration = 300\n'
         'host = "db.internal"\n')


def _share(group: Group, record: LeaseRecord) -> None:
    """Write a lease as the member that granted it does (claims.Claimer.share)."""
    key = layout.lease_key(group.group, record.client, record.address, record.service)
    group.kv.put(key.encode(), encode_lease(record), group.kv.grant(record.ttl(group.clock.now)))


def test_another_members_lease_of_a_named_gateway_service_is_logged_not_installed(
        group: Group) -> None:
    group.member("b", config=NAMED)
    group.enroll("alice", "ssh", "db")
    group.settle()
    until = group.clock.now + 60
    _share(group, LeaseRecord("alice", ADDRESS, "db", "tcp", 22, until, "a"))
    group.settle()
    assert group.grants("b") == set()  # no destination to guess: nothing installed
    assert any("lease of client=alice for service db is not installed here: its host is "
               "a name" in line for line in group.worlds["b"].logs)
    # the same member installs a lease of a service of its own at once (the control)
    _share(group, LeaseRecord("alice", ADDRESS, "ssh", "tcp", 22, until, "a"))
    group.settle()
    assert group.grants("b") == {(SOURCE, "ssh")}
    assert group.worlds["b"].backend.grants[(ADDRESS, "ssh")] == pytest.approx(until)


def _code(group: Group, client: str, at: float) -> str:
    return pyotp.TOTP(group.otp_secrets[client]).at(at)


def test_an_authenticator_code_used_at_one_member_is_refused_at_another(group: Group) -> None:
    a, b, c = group.member("a"), group.member("b"), group.member("c")
    group.enroll("alice", otp=True)
    group.settle()
    now = group.clock.now
    code = _code(group, "alice", now)
    a.handle(group.packet("alice", otp=code), SOURCE)
    assert group.grants("a") == {(SOURCE, "ssh")}
    # a new packet (new nonce) with the same code: b's own checker never saw it
    b.handle(group.packet("alice", otp=code), SOURCE)
    assert group.refusals("b") == [("otp_reused", "alice")]
    assert group.links["b"].claimer.counts["otp_reused"] == 1
    assert [e.outcome for e in group.worlds["b"].events()].count("accepted") == 0
    # as on one server, the earlier code still in the drift window is spent too
    c.handle(group.packet("alice", otp=_code(group, "alice", now - STEP)), SOURCE)
    assert group.refusals("c") == [("otp_reused", "alice")]
    assert group.links["c"].claimer.counts["otp_reused"] == 1
    # the next code is alice's to use, at any member
    group.clock.advance(STEP)
    b.handle(group.packet("alice", "https", otp=_code(group, "alice", group.clock.now)), SOURCE)
    assert (ADDRESS, "https") in group.worlds["b"].backend.grants
    assert [group.links[m].claimer.counts["claimed"] for m in "abc"] == [1, 1, 0]


def test_an_authenticator_step_claim_lasts_while_any_member_could_accept_its_code() -> None:
    step = int(START // STEP)
    until = otp_claim_until(step)
    # a member whose clock is MEMBER_SKEW behind still accepts the code until then
    behind = until - MEMBER_SKEW - 0.001
    assert step in range(int(behind // STEP) - DRIFT, int(behind // STEP) + DRIFT + 1)
    assert step not in range(int((until - MEMBER_SKEW) // STEP) - DRIFT,
                             int((until - MEMBER_SKEW) // STEP) + DRIFT + 1)
    assert otp_claim_ttl(step, START) >= until - START
    assert layout.parse_key(GROUP, layout.otp_claim_key(GROUP, "alice", step)) == (
        layout.KeyRef(layout.Kind.CLAIM, ("alice", f"otp-{step}")))
    for bad in (-1, layout.OTP_STEP_MAX + 1, True):
        with pytest.raises(layout.GroupNameError):
            layout.otp_claim_key(GROUP, "alice", bad)


def _knock(group: Group, secret: bytes, service: str = "ssh") -> bytes:
    request = Request(int(group.clock.now * 1000), Action.OPEN, service, 60, None, "")
    return build_packet(request, derive_keys(secret, group.server_id), group.server_id,
                        nonce=os.urandom(24))


def _rotate(group: Group, grace: float) -> bytes:
    """`spa-server rotate alice` on member a's config: the new secret."""
    new = os.urandom(MASTER_SECRET_SIZE)
    config = config_mod.load(group.worlds["a"].config_path)
    admin_group.rotate(group.kv, settings("a"), "a", config, "alice", grace=grace,
                       now=group.clock.now, endpoint="gw.example", random=lambda n: new[:n])
    return new


def _granted(result: Accepted | Refused) -> bool:
    return isinstance(result, Accepted)


def test_a_rotation_without_grace_stops_the_old_key_as_each_member_applies_it(
        group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    old = group.secrets["alice"]
    new = _rotate(group, grace=0)
    # in etcd now, not yet switched on the members' receive threads: the old
    # key is still taken there, the new one not yet (its tag is unknown)
    assert _granted(b.handle(_knock(group, old), SOURCE))
    assert b.handle(_knock(group, new, "https"), SOURCE) == Refused(Reason.UNKNOWN_TAG)
    group.settle()  # each member's receive thread applies the rotation
    for member in (a, b):
        assert member.handle(_knock(group, old), SOURCE) == Refused(Reason.UNKNOWN_TAG)
        assert _granted(member.handle(_knock(group, new), SOURCE))


def test_a_rotation_with_grace_takes_both_keys_until_the_grace_ends_at_every_member(
        group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.settle()
    old = group.secrets["alice"]
    new = _rotate(group, grace=600)
    group.settle()
    assert _granted(a.handle(_knock(group, old), SOURCE))
    assert _granted(b.handle(_knock(group, new), SOURCE))
    group.clock.advance(599)
    for link in group.links.values():
        link.member.tick()
    group.settle()
    assert _granted(b.handle(_knock(group, old), SOURCE))  # the grace lasts
    group.clock.advance(2)  # past ceil(rotation + 600), on the members' clock
    for link in group.links.values():
        link.member.tick()  # the member thread's next round ends the grace
    group.settle()
    for member in (a, b):
        assert member.handle(_knock(group, old), SOURCE) == Refused(Reason.UNKNOWN_TAG)
        assert _granted(member.handle(_knock(group, new, "https"), SOURCE))


def _group_table(member: str) -> str:
    """A member's [group] table (its files are never read here: the store is given)."""
    return (f'\n[group]\nname = "{GROUP}"\nmember = "{member}"\n'
            'endpoints = ["https://192.0.2.1:2379"]\nca_file = "etcd/ca.crt"\n'
            f'cert_file = "etcd/{member}.crt"\nkey_file = "etcd/{member}.key"\n'
            f'user = "{member}"\npassword_file = "etcd/password"\n')


def _stop(group: Group, name: str) -> None:
    server = group.worlds[name].server
    assert server is not None
    server.shutdown()  # (its link too: a companion)
    group.worlds[name].server = None


def _start_again(group: Group, name: str) -> Server:
    """Start member `name` again on its state, as the runner does (its config
    now with its [group] table), on the store as it is."""
    world = group.worlds[name]
    with world.config_path.open("a") as file:
        file.write(_group_table(name))
    server = world.start()
    link = GroupLink(server, group.kv, settings(name), executor=Inline())
    link.start()
    server.run_commands()
    group.links[name] = link
    return server


def test_a_member_restarted_while_etcd_is_down_keeps_its_leases_and_recovers(
        group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.worlds["a"].enroll("carol")  # a's own client, in its own store
    a.housekeeping()
    group.enroll("alice")
    group.enroll("bob")
    group.settle()
    a.handle(group.packet("alice", duration=300), SOURCE)
    a.handle(group.packet("bob", "https", duration=300), "192.0.2.20")
    assert group.grants("a") == {(SOURCE, "ssh"), ("192.0.2.20", "https")}
    a.housekeeping()  # the state is saved
    _stop(group, "a")
    b.handle(group.packet("bob", "https", duration=0, action=Action.CLOSE), "192.0.2.20")
    group.kv.unreachable = True  # type: ignore[attr-defined]
    group.clock.advance(10)
    a = _start_again(group, "a")
    logs = group.worlds["a"].logs
    # it starts, and keeps its leases of the group's clients with their ends
    assert group.grants("a") == {(SOURCE, "ssh"), ("192.0.2.20", "https")}
    assert group.worlds["a"].backend.grants[(ADDRESS, "ssh")] == pytest.approx(
        START + 300)
    # fail closed for the group's clients (no table until the group is read),
    # its own client served as ever
    a.handle(group.packet("alice", "https"), SOURCE)
    assert group.refusals("a")[-1] == ("unknown_tag", None)
    assert isinstance(a.handle(group.worlds["a"].packet("carol", "https"), "192.0.2.30"),
                      Accepted)
    for _ in range(10):  # still down: said once, at the start
        group.links["a"].member.tick()
        group.clock.advance(0.5)
    assert [line for line in logs if line.startswith("error group")] == [
        next(line for line in logs if "serving this server's own clients" in line)]
    group.kv.unreachable = False  # type: ignore[attr-defined]
    group.clock.advance(5)
    group.links["a"].member.tick()
    group.settle()
    assert any(line.startswith("group g1: read at revision") for line in logs)
    # the group's first read: the lease closed at b meanwhile ends, alice's stays
    assert group.grants("a") == {(SOURCE, "ssh"), ("192.0.2.30", "https")}
    assert any("1 leases restored at start are not the group's any more" in line
               for line in logs)
    a.handle(group.packet("alice", "https"), SOURCE)
    assert (SOURCE, "https") in group.grants("a")


def _dashboard(group: Group, member: str) -> TestClient:
    """A signed-in dashboard on member `member`'s config and state."""
    world = group.worlds[member]
    webauth.save(world.root / "state", webauth.make_credentials(
        "correct horse battery staple", opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN))
    http = TestClient(make_app(Dashboard(world.config_path, clock=group.clock, log=print)),
                      base_url="http://127.0.0.1:9713")
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', http.get("/login").text)
    assert found is not None
    answer = http.post("/login", data={"csrf": found.group(1),
                                       "password": "correct horse battery staple"},
                       follow_redirects=False)
    assert answer.status_code == 303
    return http


def test_a_members_dashboard_names_its_group_and_the_group_s_clients(group: Group) -> None:
    a = group.member("a")
    group.worlds["a"].enroll("carol")  # a's own client
    a.housekeeping()
    group.enroll("alice")
    group.enroll("bob")
    group.settle()
    a.handle(group.packet("alice"), SOURCE)
    a.housekeeping()  # leases saved where the dashboard reads them
    group.links["a"].tick()  # the presence thread's round hands over the facts
    a.run_commands()
    with _dashboard(group, "a") as http:
        for path in ("/", "/clients"):
            page = http.get(path).text
            banner = re.search(r'<p class="group" id="group">(.*?)</p>', page, re.S)
            assert banner is not None, path
            text = " ".join(banner.group(1).split())
            assert "member <b>a</b> of group <b>g1</b>" in text
            assert "the group's 2 clients live in etcd" in text
            assert "group-down" not in text
        # the list is the server's own (carol), and the open lease is the group's alice's
        clients = http.get("/clients").text
        assert "carol" in clients and "bob" not in clients
        assert http.get("/api/leases").json()["leases"][0]["clients"] == ["alice"]
        group.kv.unreachable = True  # type: ignore[attr-defined]
        a.handle(group.packet("alice", "https"), SOURCE)  # its claim finds etcd down
        group.links["a"].tick()
        a.run_commands()
        assert "new grants for the group's clients are refused" in " ".join(
            http.get("/").text.split())


def test_a_standalone_dashboard_says_nothing_of_a_group(tmp_path: Path) -> None:
    made = Group(tmp_path, MemoryStore(FakeClock()))
    world = World(tmp_path / "alone", clock=made.clock)
    world.root.mkdir()
    world.init()
    world.start()
    made.worlds["alone"] = world  # (for the helper; no link: not a member)
    try:
        with _dashboard(made, "alone") as http:
            assert 'id="group"' not in http.get("/").text
    finally:
        assert world.server is not None
        world.server.shutdown()


def test_status_says_which_group_a_member_serves_and_whether_etcd_answers(
        group: Group) -> None:
    a = group.member("a")
    group.enroll("alice")
    group.settle()
    assert describe_group(None) is None  # a standalone server: no line
    group.links["a"].tick()
    a.run_commands()
    running = group.worlds["a"].server.state.running_server()  # type: ignore[union-attr]
    assert running is not None
    assert describe_group(running.get("group")) == (
        "member a of group g1, 1 of the group's clients (read at revision "
        f"{group.links['a'].member.revision}); etcd answering")
    group.kv.unreachable = True  # type: ignore[attr-defined]
    a.handle(group.packet("alice"), SOURCE)
    group.links["a"].tick()
    a.run_commands()
    running = group.worlds["a"].server.state.running_server()  # type: ignore[union-attr]
    assert running is not None
    assert describe_group(running.get("group")).endswith(  # type: ignore[union-attr]
        "etcd UNREACHABLE: new grants for the group's clients are refused")


def test_a_member_restarted_with_etcd_up_ends_at_once_the_saved_leases_the_group_lacks(
        group: Group) -> None:
    a, b = group.member("a"), group.member("b")
    group.enroll("alice")
    group.enroll("bob")
    group.settle()
    a.handle(group.packet("alice", duration=300), SOURCE)
    a.handle(group.packet("bob", "https", duration=300), "192.0.2.20")
    a.housekeeping()
    _stop(group, "a")
    b.handle(group.packet("bob", "https", duration=0, action=Action.CLOSE), "192.0.2.20")
    _start_again(group, "a")
    assert group.grants("a") == {(SOURCE, "ssh")}  # bob's, closed at b meanwhile, is gone
    assert group.worlds["a"].backend.grants[(ADDRESS, "ssh")] == pytest.approx(START + 300)
