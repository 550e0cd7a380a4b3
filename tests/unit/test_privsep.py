"""The gate keeper refuses what its config does not allow; the daemon's end
speaks to it over a real socketpair (spa.server.gatemsg, monitor, remote)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spa.backends.base import reconcile
from spa.backends.memory import MemoryBackend
from spa.core.policy import Service
from spa.server import gatemsg, monitor, privsep
from spa.server.errors import LocalError
from spa.server.monitor import MAX_GRANTS, SLACK, GateKeeper
from spa.server.remote import RemoteGate, RemoteGuard

SSH = Service("ssh", "tcp", 22, default_duration=30, max_duration=300)
NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def keeper(clock: Clock | None = None) -> tuple[GateKeeper, MemoryBackend, list[str]]:
    backend, lines = MemoryBackend(), list[str]()
    gate = GateKeeper(backend, config_path=Path("/nonexistent/server.toml"),
                      services={"ssh": SSH}, clock=clock or Clock(), log=lines.append,
                      read_services=lambda path: {"ssh": SSH})
    assert "ok" in gate.handle({"kind": "start", "services": ["ssh"]})
    return gate, backend, lines


def allow(address: str, service: str = "ssh", until: float = NOW + 30) -> dict[str, Any]:
    return {"kind": "apply", "changes": [["allow", address, service, until]]}


def test_a_checked_grant_reaches_the_backend() -> None:
    gate, backend, _ = keeper()
    assert gate.handle(allow("192.0.2.7")) == {"ok": None}
    assert backend.grants == {(ipaddress.ip_address("192.0.2.7"), "ssh"): NOW + 30}


@pytest.mark.parametrize(("message", "why"), [
    (allow("192.0.2.7", "mysql"), "no service 'mysql'"),
    (allow("192.0.2.0/24"), "not an address"),
    (allow("0.0.0.0"), "not a host address"),
    (allow("::"), "not a host address"),
    (allow("224.0.0.1"), "not a host address"),
    (allow("255.255.255.255"), "not a host address"),
    (allow("fe80::1%eth0"), "not a plain address"),
    (allow("::ffff:192.0.2.7"), "not a plain address"),
    (allow("example.org"), "not an address"),
    (allow("192.0.2.7", "ssh; drop"), "not a service name"),
    (allow("192.0.2.7", until=NOW + 300 + SLACK + 1), "within 300 s"),
    (allow("192.0.2.7", until=NOW - 1), "within 300 s"),
    (allow("192.0.2.7", until=float("nan")), "until is a number"),
    ({"kind": "apply", "changes": [["allow", "192.0.2.7", "ssh", True]]}, "until is a number"),
    ({"kind": "apply", "changes": [["flush", "ruleset"]]}, "unknown change"),
    ({"kind": "run", "argv": ["nft", "flush", "ruleset"]}, "unknown request"),
    ({"kind": "held", "table": "filter"}, "fields must be"),
    ({"kind": "start", "services": ["mysql"]}, "no service 'mysql'"),
    ({"kind": "start", "services": "ssh"}, "list of names"),
])
def test_the_gate_keeper_refuses_what_its_config_does_not_allow(
        message: dict[str, Any], why: str) -> None:
    gate, backend, lines = keeper()
    before = (dict(backend.grants), dict(backend.services))
    reply = gate.handle(message)
    assert "refused" in reply and why in reply["refused"], reply
    assert (backend.grants, backend.services) == before, "nothing changed"
    assert any("refused a request" in line for line in lines)


def test_a_batch_with_one_bad_change_is_refused_whole() -> None:
    gate, backend, _ = keeper()
    reply = gate.handle({"kind": "apply", "changes": [
        ["allow", "192.0.2.7", "ssh", NOW + 30], ["allow", "192.0.2.8", "mysql", NOW + 30]]})
    assert "refused" in reply
    assert backend.grants == {}


def test_services_come_from_the_gate_keepers_config_not_the_request() -> None:
    """The daemon names services; their ports are the gate keeper's reading."""
    seen: list[Path] = []
    wide = Service("ssh", "tcp", 3306, default_duration=30, max_duration=300)

    def read(path: Path) -> dict[str, Service]:
        seen.append(path)
        return {"ssh": SSH}

    backend = MemoryBackend()
    gate = GateKeeper(backend, config_path=Path("/etc/spa/server.toml"),
                      services={"ssh": wide}, clock=Clock(), log=lambda line: None,
                      read_services=read)
    gate.handle({"kind": "start", "services": ["ssh"]})
    assert seen == [Path("/etc/spa/server.toml")]
    assert backend.services["ssh"].port == 22


def test_the_gate_keeper_ends_grants_on_time_by_itself() -> None:
    """Whatever the daemon says or fails to say: over many rounds of silence."""
    clock = Clock()
    gate, backend, _ = keeper(clock)
    gate.handle(allow("192.0.2.7", until=NOW + 30))
    gate.handle(allow("192.0.2.8", until=NOW + 90))
    for _ in range(240):  # two minutes, a round each half second
        clock.now += 0.5
        gate.expire()
        live = {str(address) for address, _ in backend.grants}
        assert live == ({"192.0.2.7"} if clock.now < NOW + 30 else set()) | (
            {"192.0.2.8"} if clock.now < NOW + 90 else set())
    assert gate.granted == {}


def test_the_gate_keeper_holds_at_most_max_grants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor, "MAX_GRANTS", 3)
    gate, backend, _ = keeper()
    for n in range(3):
        assert "ok" in gate.handle(allow(f"192.0.2.{n + 1}"))
    assert "refused" in gate.handle(allow("192.0.2.9"))
    assert "ok" in gate.handle(allow("192.0.2.1", until=NOW + 60)), "a renewal is no new grant"
    assert len(backend.grants) == 3
    assert MAX_GRANTS >= 100_000


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1, 2]", b"{nope", b'"kind"'])
def test_frames_that_are_not_one_json_object_are_refused(body: bytes) -> None:
    with pytest.raises(gatemsg.RefusedError):
        gatemsg.parse_request(gatemsg.decode(body))


def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    with pytest.raises(gatemsg.RefusedError, match="over the"):
        gatemsg.frame_length((gatemsg.MAX_FRAME + 1).to_bytes(gatemsg.HEADER, "big"))


# ---- over a real socketpair ------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[RemoteGate, GateKeeper, MemoryBackend, threading.Thread]]:
    ours, theirs = socket.socketpair()
    clock = Clock()
    gate, backend, _ = keeper(clock)
    stop = threading.Event()
    thread = threading.Thread(target=monitor.serve, args=(gate, theirs, stop), daemon=True)
    thread.start()
    remote = RemoteGate(ours)
    yield remote, gate, backend, thread
    clock.now += 10_000  # every grant over: the gate keeper need not outlive the daemon
    stop.set()
    ours.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    theirs.close()


def test_the_daemons_end_is_a_backend(
        pair: tuple[RemoteGate, GateKeeper, MemoryBackend, threading.Thread]) -> None:
    remote, _, backend, _ = pair
    remote.start({"ssh": SSH}, now=NOW)
    assert remote.name == "memory" and remote.expires_by_itself is False
    address = ipaddress.ip_address("2001:db8::7")
    remote.allow(address, SSH, NOW + 30, now=NOW)
    assert remote.held(now=NOW) == {(address, "ssh"): NOW + 30}
    remote.remove(address, SSH)
    assert backend.grants == {}
    assert remote.drops() == {}
    assert remote.host_report() is None  # the memory backend has no ruleset


def test_a_refusal_is_a_local_error_that_says_so(
        pair: tuple[RemoteGate, GateKeeper, MemoryBackend, threading.Thread]) -> None:
    remote, _, backend, _ = pair
    remote.start({"ssh": SSH}, now=NOW)
    mysql = Service("mysql", "tcp", 3306, default_duration=30, max_duration=300)
    with pytest.raises(LocalError, match="refused a request: no service 'mysql'"):
        remote.allow(ipaddress.ip_address("192.0.2.7"), mysql, NOW + 30, now=NOW)
    assert backend.grants == {}


def test_the_guards_events_and_state_reach_the_daemon(
        pair: tuple[RemoteGate, GateKeeper, MemoryBackend, threading.Thread]) -> None:
    remote, _, backend, _ = pair
    remote.start({"ssh": SSH}, now=NOW)
    remote.allow(ipaddress.ip_address("192.0.2.7"), SSH, NOW + 30, now=NOW)
    recorded: list[object] = []
    changes: list[object] = []
    guard = RemoteGuard(remote, record=recorded.append, on_change=changes.append)
    backend.wipe()  # another program takes the gate away
    guard.check(0.0)
    assert backend.grants, "the gate keeper put the grant back from its own record"
    assert guard.state.state == "restored" and changes
    assert [getattr(e, "outcome", None) for e in recorded] == ["firewall"]


def test_when_the_gate_keeper_is_gone_the_daemon_is_told_once(
        pair: tuple[RemoteGate, GateKeeper, MemoryBackend, threading.Thread]) -> None:
    remote, _, _, thread = pair
    remote.start({"ssh": SSH}, now=NOW)
    lost: list[bool] = []
    remote.on_lost = lambda: lost.append(True)
    remote.stop()
    remote._sock.shutdown(socket.SHUT_WR)  # what a dead gate keeper looks like: EOF
    thread.join(timeout=5)
    for _ in range(2):
        with pytest.raises(LocalError, match="gate keeper is gone"):
            remote.held(now=NOW)
    assert lost == [True]


def test_when_the_daemon_is_gone_the_gate_keeper_stops_the_backend() -> None:
    ours, theirs = socket.socketpair()
    gate, backend, _ = keeper()
    thread = threading.Thread(target=monitor.serve, args=(gate, theirs, threading.Event()),
                              daemon=True)
    thread.start()
    ours.sendall(b"\x00\x00\x00\x10{")  # a frame begun, then the daemon dies
    ours.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert backend.log[-1] == ("stop",)
    theirs.close()


def test_a_restart_finds_grants_the_gate_keeper_never_made_and_keeps_them(
        pair: tuple[RemoteGate, GateKeeper, MemoryBackend, threading.Thread]) -> None:
    """The kernel still holds a lease from before the restart: reconcile makes
    it the gate keeper's own, so its guard puts it back after a flush."""
    remote, gate, backend, _ = pair
    kept = (ipaddress.ip_address("192.0.2.7"), "ssh")
    stale = (ipaddress.ip_address("192.0.2.8"), "ssh")
    backend.grants = {kept: NOW + 30, stale: NOW + 30}
    remote.start({"ssh": SSH}, now=NOW)
    reconcile(remote, {kept: NOW + 30}, {"ssh": SSH}, now=NOW)
    assert backend.grants == {kept: NOW + 30} and gate.granted == {kept: NOW + 30}
    backend.wipe()
    RemoteGuard(remote, record=lambda event: None).check(0.0)
    assert backend.grants == {kept: NOW + 30}
    with pytest.raises(LocalError, match="within 300 s"):
        remote.reconcile({kept: NOW + 3600}, now=NOW)
    assert gate.granted == {kept: NOW + 30}, "a refused reconcile changes nothing"


def test_a_gate_keeper_that_could_not_start_answers_with_its_one_line() -> None:
    """No backend here (iptables-nft, say): the daemon's first request gets
    the reason, so the operator reads one line, not a dead child."""
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=monitor.serve_failure,
                              args=(theirs, "iptables is the nf_tables variant here"),
                              daemon=True)
    thread.start()
    remote = RemoteGate(ours)
    with pytest.raises(LocalError, match=r"^iptables is the nf_tables variant here$"):
        remote.start({"ssh": SSH}, now=NOW)
    ours.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    theirs.close()


def test_a_start_that_leaves_a_service_out_still_gates_it() -> None:
    """From the adversarial review: `start` with an empty list installed the
    gate for no service, so every port was open to all."""
    gate, backend, _ = keeper()
    assert "ok" in gate.handle({"kind": "start", "services": []})
    assert set(backend.services) == {"ssh"}


def test_the_gate_keepers_guard_repairs_nothing_before_the_first_start() -> None:
    """From the 10^5-client start: the daemon took 2.4 s to ask `start`,
    and the gate keeper's guard, polling meanwhile, found no table and put
    one back for no service; the start that came then failed on it, and the
    gate stayed without its drop rules.  Before the first start there is no
    gate of ours to keep: the guard checks nothing; after it, it repairs."""
    backend, lines = MemoryBackend(), list[str]()
    gate = GateKeeper(backend, config_path=Path("/nonexistent/server.toml"),
                      services={"ssh": SSH}, clock=Clock(), log=lines.append,
                      read_services=lambda path: {"ssh": SSH})
    backend.wipe()  # what a poll finds before the start: no gate at all
    for woke in (0.0, 1.0):
        assert gate.guard.check(woke) is None
        gate.guard.poll(NOW + woke)
    assert ("repair",) not in backend.log and not backend.started
    assert "ok" in gate.handle({"kind": "start", "services": ["ssh"]})
    backend.wipe()
    assert gate.guard.check(2.0) == "the memory gate was removed by another program"
    assert backend.log[-1] == ("repair",)


@pytest.mark.parametrize("message", [
    {"kind": []}, {"kind": {}}, allow("192.0.2.7", until=10 ** 400),
    {"kind": "apply", "changes": [["allow", "192.0.2.7", "ssh", float("inf")]]},
])
def test_whatever_a_request_holds_it_is_a_refusal_never_a_dead_gate_keeper(
        message: dict[str, Any]) -> None:
    gate, backend, _ = keeper()
    assert "refused" in gate.handle(message)
    assert backend.grants == {}


def test_deep_nesting_and_many_lists_are_refused_before_decoding() -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"kind":"apply","changes":['
                 + b"[]," * (gatemsg.MAX_CHANGES + 5) + b"[]]}", b'{"a":{"b":{}}}'):
        with pytest.raises(gatemsg.RefusedError):
            gatemsg.decode(body)


@pytest.mark.skipif(os.geteuid() != 0, reason="a real drop needs root")
@pytest.mark.parametrize("bpf", [False, True], ids=["classic", "ebpf-map"])
def test_the_gate_keeper_keeps_cap_bpf_only_with_the_map_filter_and_passes_it_to_no_program(
        bpf: bool, tmp_path: Path) -> None:
    """A real drop, in a child: CAP_BPF stays only where the eBPF map filter
    runs (to make the maps of its growth), and is not among the ambient
    capabilities that nft or iptables would inherit."""
    config = tmp_path / "server.toml"
    config.write_text("")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        status = 1
        try:
            privsep.drop_to_gate_keeper(config, "nftables", bpf=bpf)
            held = privsep.capabilities()
            os.write(write, f"{held.effective} {held.ambient} {held.bounding}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    found = os.read(read, 200).split()
    os.close(read)
    assert os.waitpid(pid, 0)[1] == 0
    effective, ambient, bounding = map(int, found)
    wanted = 1 << privsep.CAP_NET_ADMIN | (1 << privsep.CAP_BPF if bpf else 0)
    assert effective == bounding == wanted
    assert ambient == 1 << privsep.CAP_NET_ADMIN
    assert privsep.gate_keeper_capabilities("iptables", bpf=True) == {
        privsep.CAP_NET_ADMIN, privsep.CAP_NET_RAW, privsep.CAP_BPF}
