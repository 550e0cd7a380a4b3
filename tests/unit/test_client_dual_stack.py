"""spa-client over both address families, and IPv6 literals in every command.

A fake server on loopback stands in for spa-server: a UDP knock port on
127.0.0.1 and on ::1 (the same number) whose knocks the real Verifier
judges, and the service's TCP port on each, listening only once a knock
from that family was accepted (its grant).  The name the client resolves
is faked (`resolve_all` with a lookup); nothing leaves loopback.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from spa.core.keys import MASTER_SECRET_SIZE, SERVER_ID_SIZE
from spa.core.policy import ClientPolicy, Policy, Service
from spa.core.uri import Enrollment, ServiceRef, render
from spa.core.verify import Accepted, Verifier
from spa.core.wire import Action
from spa_client import cli, knock
from spa_client.knock import KnockError, Target, open_and_wait, resolve_all, targets_for
from spa_client.profile import ProfileStore, default_name, same_host
from tests.integration.procs import command

if not socket.has_ipv6:  # pragma: no cover - every machine the tests run on has ::1
    pytest.skip("this machine has no IPv6 loopback", allow_module_level=True)

V4, V6 = "127.0.0.1", "::1"
SECRET = bytes(range(MASTER_SECRET_SIZE))
SERVER_ID = bytes(range(100, 100 + SERVER_ID_SIZE))


def free_port(kind: int) -> int:
    """A port number free on 127.0.0.1 and on ::1 for this socket kind."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as four:
            four.bind((V4, 0))
            port = int(four.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET6, kind) as six:
                    six.bind((V6, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on both loopback addresses")


class FakeServer:
    """The knock port and the service port on both loopback addresses."""

    def __init__(self, grant: tuple[str, ...] = (V4, V6)) -> None:
        self.knock_port = free_port(socket.SOCK_DGRAM)
        self.port = free_port(socket.SOCK_STREAM)
        self.grant = grant  # the families whose accepted knocks open the port
        service = Service("ssh", "tcp", self.port, 30, 300)
        self.verifier = Verifier(SERVER_ID, {"alice": SECRET}, Policy(
            {"ssh": service}, {"alice": ClientPolicy("alice", frozenset({"ssh"}))}),
            now=time.time())
        self.judged: list[tuple[str, Accepted | object, bytes]] = []  # (source, verdict, packet)
        self.listeners: dict[str, socket.socket] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sockets = []
        for family, address in ((socket.AF_INET, V4), (socket.AF_INET6, V6)):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((address, self.knock_port))
            udp.settimeout(0.05)
            self.sockets.append(udp)
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True)
                        for s in self.sockets]
        for thread in self.threads:
            thread.start()

    def enrollment(self, host: str = V6) -> Enrollment:
        return Enrollment(host, self.knock_port, SERVER_ID, "alice", SECRET,
                          (ServiceRef("ssh", "tcp", self.port),))

    def targets(self) -> tuple[Target, ...]:
        return (Target(V6, socket.AF_INET6, self.knock_port),
                Target(V4, socket.AF_INET, self.knock_port))

    def _serve(self, udp: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                packet, peer = udp.recvfrom(2048)
            except TimeoutError:
                continue
            source = str(peer[0])
            with self.lock:
                verdict = self.verifier.verify(packet, source, time.time())
                self.judged.append((source, verdict, packet))
                if (isinstance(verdict, Accepted) and source in self.grant
                        and verdict.request.action is Action.OPEN
                        and source not in self.listeners):
                    self._listen(source)

    def _listen(self, address: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, self.port))
        listener.listen(16)
        self.listeners[address] = listener
        threading.Thread(target=self._echo, args=(listener,), daemon=True).start()

    def _echo(self, listener: socket.socket) -> None:
        """Answer each connection with what it sends, reversed, once it half-closes."""
        listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while chunk := conn.recv(4096):
                        data += chunk
                    conn.sendall(data[::-1])
                except OSError:
                    pass

    def accepted(self) -> list[tuple[str, Accepted]]:
        with self.lock:
            return [(s, v) for s, v, _ in self.judged if isinstance(v, Accepted)]

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=2)
        for sock in [*self.sockets, *self.listeners.values()]:
            sock.close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def v4_only() -> Iterator[FakeServer]:
    """A server whose IPv6 knocks are judged but open nothing (the family ssh
    would try first is not through)."""
    fake = FakeServer(grant=(V4,))
    yield fake
    fake.close()


def getaddrinfo_of(*answers: tuple[int, str]) -> Callable[..., list[tuple[object, ...]]]:
    def lookup(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        return [(family, socket.SOCK_DGRAM, 17, "",
                 (address, port, 0, 0) if family == socket.AF_INET6 else (address, port))
                for family, address in answers]
    return lookup


def nothing(left: float, sends: int) -> None:
    return None


# -- resolving and choosing what to knock ---------------------------------------

def test_a_name_with_both_families_gives_one_target_each_in_the_resolvers_order() -> None:
    lookup = getaddrinfo_of((socket.AF_INET6, "2001:db8::7"), (socket.AF_INET, "192.0.2.7"),
                            (socket.AF_INET6, "2001:db8::8"), (socket.AF_INET, "192.0.2.8"))
    assert resolve_all("dual.example", 62201, lookup) == (
        Target("2001:db8::7", socket.AF_INET6, 62201), Target("192.0.2.7", socket.AF_INET, 62201))
    v4_first = getaddrinfo_of((socket.AF_INET, "192.0.2.7"), (socket.AF_INET6, "2001:db8::7"))
    assert [t.address for t in resolve_all("dual.example", 1, v4_first)] == [
        "192.0.2.7", "2001:db8::7"]
    assert resolve_all("::1", 9) == (Target("::1", socket.AF_INET6, 9),)


def test_an_unresolvable_name_is_one_line() -> None:
    def fails(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(KnockError, match=r"^cannot resolve nowhere\.example: Name or service"):
        resolve_all("nowhere.example", 1, fails)
    with pytest.raises(KnockError, match="no IPv4 or IPv6 address"):
        resolve_all("odd.example", 1, getaddrinfo_of())


def test_one_knock_only_when_the_request_names_an_address_or_carries_a_code() -> None:
    import ipaddress

    both = (Target("2001:db8::7", socket.AF_INET6, 1), Target("192.0.2.7", socket.AF_INET, 1))
    assert targets_for(both, address=None, otp="") == both
    assert targets_for(both, address=ipaddress.ip_address("198.51.100.1"), otp="") == both[1:]
    assert targets_for(both, address=ipaddress.ip_address("2001:db8::1"), otp="") == both[:1]
    assert targets_for(both[:1], address=ipaddress.ip_address("198.51.100.1"), otp="") == (
        both[0],), "no IPv4 address: the one there is"
    assert targets_for(both, address=None, otp="123456") == both[:1], (
        "a code opens once: the family ssh tries first")
    assert knock.parse_allow_ip("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")
    with pytest.raises(KnockError, match="not an IP address"):
        knock.parse_allow_ip("2001:db8::1]")
    with pytest.raises(KnockError, match="a zone"):
        knock.parse_allow_ip("fe80::1%eth0")


# -- knocking both families ---------------------------------------------------------

def test_open_knocks_each_family_with_a_packet_of_its_own_and_both_open(
        server: FakeServer) -> None:
    opened = open_and_wait(server.enrollment(), server.enrollment().services[0],
                           server.targets(), duration=0, address=None, timeout=5,
                           progress=nothing, others_within=2.0)
    assert opened is not None
    assert sorted(t.address for t in opened.targets) == [V4, V6]
    assert opened.shut == ()
    accepted = server.accepted()
    assert sorted(source for source, _ in accepted) == [V4, V6]
    for source, verdict in accepted:
        assert verdict.request.address is None, "each asks for the address it leaves from"
        assert str(verdict.decision.address) == source
    nonces = {packet[9:33] for _, _, packet in server.judged}
    assert len(nonces) == len(server.judged), "each packet sealed anew: no replay"


def test_connect_takes_the_family_that_opened(v4_only: FakeServer) -> None:
    """ssh would try ::1 first (the resolver's order); only 127.0.0.1 opens."""
    started = time.monotonic()
    opened = open_and_wait(v4_only.enrollment(), v4_only.enrollment().services[0],
                           v4_only.targets(), duration=0, address=None, timeout=5,
                           progress=nothing)
    assert opened is not None
    assert [t.address for t in opened.targets] == [V4]
    assert time.monotonic() - started < 1.0, "connect does not wait for the other family"
    waited = open_and_wait(v4_only.enrollment(), v4_only.enrollment().services[0],
                           v4_only.targets(), duration=0, address=None, timeout=5,
                           progress=nothing, others_within=0.3)
    assert waited is not None
    assert [t.address for t in waited.shut] == [V6], "open says which did not open"


def test_a_family_without_a_route_is_left_out(server: FakeServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_send = knock.send

    def send(target: Target, packet: bytes) -> None:
        if target.family == socket.AF_INET6:
            raise KnockError(f"cannot send to {target.address}: Network is unreachable")
        real_send(target, packet)

    monkeypatch.setattr(knock, "send", send)
    started = time.monotonic()
    opened = open_and_wait(server.enrollment(), server.enrollment().services[0],
                           server.targets(), duration=0, address=None, timeout=5,
                           progress=nothing, others_within=2.0)
    assert opened is not None
    assert [t.address for t in opened.targets] == [V4]
    assert opened.shut == ()
    assert time.monotonic() - started < 1.0, "nothing waited for: it was never knocked"
    monkeypatch.setattr(knock, "send", lambda target, packet: send(
        Target(target.address, socket.AF_INET6, target.knock_port), packet))
    with pytest.raises(KnockError, match="Network is unreachable"):
        open_and_wait(server.enrollment(), server.enrollment().services[0],
                      server.targets(), duration=0, address=None, timeout=1,
                      progress=nothing)


def test_keep_renews_each_family(server: FakeServer) -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += max(seconds, 0.001)

    sent = knock.keep_open(server.enrollment(), server.enrollment().services[0],
                           server.targets(), duration=60, show=lambda *_: None,
                           stop=lambda: now[0] >= 30, clock=lambda: now[0], sleep=sleep)
    assert sent == 4, "two renewals (at 0 and 20 s), each over both families"
    deadline = time.monotonic() + 2
    while len(server.accepted()) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(source for source, _ in server.accepted()) == [V4, V4, V6, V6]


# -- profiles: a name for an IPv6 server, found by any spelling --------------------

@pytest.mark.parametrize(("host", "name"), [
    ("fd10:210::1", "fd10-210--1"), ("::1", "0--1"), ("2001:db8::", "2001-db8--"),
    ("2001:db8:1:2:3:4:5:6", "2001-db8-1-2-3-4-5-6"), ("192.0.2.1", "192.0.2.1"),
    ("knock.example.org", "knock.example.org")])
def test_the_default_profile_name_of_a_host(host: str, name: str, tmp_path: Path) -> None:
    assert default_name(host) == name
    store = ProfileStore(tmp_path)
    store.save(name, Enrollment(host, 62201, SERVER_ID, "alice", SECRET,
                                (ServiceRef("ssh", "tcp", 22),)))
    assert store.find(host).name == name
    if ":" in host:
        assert name.replace("-", ":").removeprefix("0") in (host, host.removeprefix(":"))


def test_a_profile_is_found_by_any_spelling_of_its_ipv6_address() -> None:
    for typed in ("fd10:210::1", "[fd10:210::1]", "FD10:210:0::1", "fd10:210:0:0:0:0:0:1"):
        assert same_host("fd10:210::1", typed), typed
    assert not same_host("fd10:210::1", "fd10:210::2")
    assert same_host("knock.example.org", "Knock.Example.ORG")


# -- the commands, with IPv6 literals -----------------------------------------------

def run(tmp_path: Path, *args: str) -> tuple[int, str]:
    """A spa-client command in this process; (exit status, stdout + stderr)."""
    app = typer.Typer()
    app.callback()(cli._root)
    for name, function in cli._COMMANDS.items():
        app.command(name=name)(function)
    result = CliRunner().invoke(app, ["--config-dir", str(tmp_path), *args])
    return result.exit_code, result.output


@pytest.fixture
def both(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    """The fake server's name resolves to ::1 first, then 127.0.0.1."""
    monkeypatch.setattr(knock, "resolve_all", lambda host, port: server.targets())
    return server


def test_enroll_of_an_ipv6_uri_picks_a_safe_profile_name(tmp_path: Path) -> None:
    uri = render(Enrollment("fd10:210::1", 62201, SERVER_ID, "alice", SECRET,
                            (ServiceRef("ssh", "tcp", 22),)))
    assert uri.startswith("spa1://[fd10:210::1]:62201/alice?")
    code, out = run(tmp_path, "enroll", uri)
    assert code == 0, out
    assert "profile 'fd10-210--1' saved" in out
    assert "next: spa-client open ssh fd10-210--1" in out
    assert ProfileStore(tmp_path).find("[fd10:210::1]").name == "fd10-210--1"


def test_open_and_close_an_ipv6_literal_server(server: FakeServer, tmp_path: Path) -> None:
    ProfileStore(tmp_path).save("0--1", server.enrollment(V6))
    code, out = run(tmp_path, "open", "ssh", "[::1]", "--timeout", "5")
    assert code == 0, out
    assert f"ssh is open: ::1 port {server.port} accepts connections" in out
    code, out = run(tmp_path, "close", "ssh", "0:0::1")
    assert code == 0, out
    assert out.strip() == "close sent: ssh at ::1"
    deadline = time.monotonic() + 2
    while len(server.judged) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    actions = [v.request.action for _, v in server.accepted()]
    assert actions == [Action.OPEN, Action.CLOSE]
    assert {source for source, _ in server.accepted()} == {V6}


def test_open_and_close_knock_both_families_of_a_name(both: FakeServer,
                                                      tmp_path: Path) -> None:
    ProfileStore(tmp_path).save("dual", both.enrollment("dual.example"))
    code, out = run(tmp_path, "open", "ssh", "dual", "--timeout", "5")
    assert code == 0, out
    assert "ssh is open: " in out and "accept connections" in out
    assert {"::1", "127.0.0.1"} <= set(out.split(": ")[1].split(" port")[0].split(" and "))
    code, out = run(tmp_path, "close", "ssh", "dual.example")
    assert out.strip() == "close sent: ssh at ::1 and 127.0.0.1"
    code, out = run(tmp_path, "open", "ssh", "dual", "--no-wait")
    assert out.strip() == "knock sent: open ssh at ::1 and 127.0.0.1"


def test_open_says_which_family_did_not_open(v4_only: FakeServer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knock, "resolve_all", lambda host, port: v4_only.targets())
    monkeypatch.setattr(knock, "OTHERS_WITHIN", 0.3)
    ProfileStore(tmp_path).save("dual", v4_only.enrollment("dual.example"))
    code, out = run(tmp_path, "open", "ssh", "dual", "--timeout", "5")
    assert code == 0, out
    assert f"ssh is open: 127.0.0.1 port {v4_only.port} accepts connections" in out
    assert ("spa-client: ::1 (ssh tries it first) did not open; `spa-client ssh-config "
            "dual` makes ssh connect to the address that opened") in out


def test_ssh_config_of_an_ipv6_server(tmp_path: Path) -> None:
    ProfileStore(tmp_path).save("fd10-210--1", Enrollment(
        "fd10:210::1", 62201, SERVER_ID, "alice", SECRET, (ServiceRef("ssh", "tcp", 22),)))
    code, out = run(tmp_path, "ssh-config", "[fd10:210::1]")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[1] == "Host fd10:210::1"
    assert lines[2].endswith(f"--config-dir {tmp_path} connect %h %p")


def test_doctor_of_an_ipv6_server(server: FakeServer, tmp_path: Path) -> None:
    ProfileStore(tmp_path).save("0--1", server.enrollment(V6))
    code, out = run(tmp_path, "doctor", "::1", "--time-server", "none")
    assert code == 0, out
    assert "ok   name: ::1 is ::1" in out
    assert "opened in" in out and "at ::1" in out


def test_doctor_of_a_name_whose_one_family_does_not_open(v4_only: FakeServer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(knock, "resolve_all", lambda host, port: v4_only.targets())
    monkeypatch.setattr(knock, "OTHERS_WITHIN", 0.3)
    ProfileStore(tmp_path).save("dual", v4_only.enrollment("dual.example"))
    code, out = run(tmp_path, "doctor", "dual", "--time-server", "none")
    assert code == 0, out
    assert "ok   name: dual.example is ::1 and 127.0.0.1" in out
    assert "??   knock: ssh (tcp/" in out and "at 127.0.0.1; ::1 did not open" in out
    assert out.splitlines()[-1].startswith("the knock opened the port at some of the "
                                           "server's addresses only: ssh may try ::1 first")


def test_connect_to_an_ipv6_literal_relays_to_it(server: FakeServer, tmp_path: Path) -> None:
    """As ssh runs it (ProxyCommand: spa-client connect %h %p), a process of
    its own: the knock, the wait, the relay over IPv6."""
    ProfileStore(tmp_path).save("0--1", server.enrollment(V6))
    done = subprocess.run([*command("spa-client"), "--config-dir", str(tmp_path), "connect",
                           "::1", str(server.port)], input=b"over ipv6", capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"6vpi revo"
    assert [source for source, _ in server.accepted()] == [V6]
