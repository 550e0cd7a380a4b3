"""spa-client doctor's findings, with a faked clock and network.

The only packets sent here go to a fake SNTP server on 127.0.0.1."""

from __future__ import annotations

import itertools
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from spa.core.uri import Enrollment, ServiceRef
from spa_client.doctor import (
    WINDOW,
    Fact,
    Finding,
    Knocked,
    check_clock,
    diagnose,
    verdict,
)
from spa_client.profile import Profile, ProfileStore
from spa_client.sntp import (
    DEFAULT_TIME_SERVER,
    SntpError,
    clock_offset,
    from_ntp,
    parse_reply,
    query_offset,
    sntp_request,
    to_ntp,
)

ENROLLMENT = Enrollment("knock.example.org", 62201, bytes(16), "alice", os.urandom(32),
                        (ServiceRef("ssh", "tcp", 22),))
SSH = ENROLLMENT.services[0]
NOW = 1_799_999_000.0  # 2027-01-15 07:43:20 UTC
EXPIRES = 1_800_000_000  # 2027-01-15 08:00:00 UTC
SERVER = "time.test"


def store_with_profile(tmp_path: Path, enrollment: Enrollment = ENROLLMENT) -> ProfileStore:
    store = ProfileStore(tmp_path)
    store.save("srv", enrollment)
    return store


def resolve(host: str, port: int) -> str:
    return "203.0.113.10"


def knocks(fact: Fact, took: float | None = 0.003) -> Callable[[Profile], Knocked]:
    return lambda profile: Knocked(fact, profile.enrollment.services[0], took)


def run(store: ProfileStore, *, kernel: tuple[bool, float] | None = (True, 0.05),
        offset: float | None = 0.01, server: str | None = SERVER,
        knock: Fact = Fact.OPENED, now: float = NOW) -> list[Finding]:
    return diagnose(store, "srv", resolve=resolve, clock=lambda: kernel,
                    time_offset=lambda: offset, time_server=server, knock=knocks(knock),
                    now=now)


def facts(findings: list[Finding]) -> list[Fact]:
    return [f.fact for f in findings]


def test_all_good_and_the_open_is_recorded(tmp_path: Path) -> None:
    store = store_with_profile(tmp_path)
    findings = run(store)
    assert facts(findings) == [Fact.PROFILE_OK, Fact.IN_USE, Fact.NAME_OK, Fact.CLOCK_OK,
                               Fact.OPENED]
    assert verdict(findings) == "all good: the knock opened the port"
    assert store.last_opened("srv") == int(NOW)
    record = tmp_path / "profiles" / "srv.opened"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert "key=" not in record.read_text() and store.names() == ["srv"]


# -- point 2: the clock is measured, and blamed only when off by more than the window

def test_a_measured_clock_is_fine_even_if_the_kernel_says_unsynchronized(
        tmp_path: Path) -> None:
    store = store_with_profile(tmp_path)
    store.record_opened("srv", NOW - 60)
    findings = run(store, kernel=(False, 16.0), offset=0.2, knock=Fact.SHUT)
    clock = findings[3]
    assert clock.fact is Fact.CLOCK_OK
    assert "+0.200 s from time.test" in clock.what and "not synchronized" in clock.what
    line = verdict(findings)
    assert line.startswith("fix: revoked or re-keyed") and "the clock checked fine" in line
    assert "clock first" not in line and "could not check" not in line
    assert "set this clock" not in line


def test_a_clock_measured_off_by_more_than_the_window_is_blamed_first(
        tmp_path: Path) -> None:
    findings = run(store_with_profile(tmp_path), offset=-95.0, knock=Fact.SHUT)
    assert findings[2].fact is Fact.CLOCK_OFF and findings[2].ok is False
    assert "95 s ahead of time.test" in findings[2].what
    assert verdict(findings).startswith("fix: the clock first: set this clock right")
    assert check_clock((True, 0.0), WINDOW + 1, SERVER).fact is Fact.CLOCK_OFF
    assert check_clock((True, 0.0), WINDOW - 1, SERVER).fact is Fact.CLOCK_OK
    assert "behind" in check_clock(None, 40.0, SERVER).what


def test_an_unmeasured_unsynchronized_clock_is_a_caution_never_the_fix(
        tmp_path: Path) -> None:
    store = store_with_profile(tmp_path)
    findings = run(store, kernel=(False, 16.0), offset=None, knock=Fact.SHUT)
    assert findings[2].fact is Fact.CLOCK_UNCHECKED
    assert "no answer from time.test" in findings[2].what
    line = verdict(findings)
    assert line.startswith("fix: revoked") and "clock first" not in line
    assert "also, could not check the clock" in line and f"{WINDOW:.0f} s" in line
    # the same clock with a knock that works is only a caution
    findings = run(store, kernel=(False, 16.0), offset=None)
    assert verdict(findings).startswith("all checks passed that could run; still: could not "
                                        "check the clock")


def test_without_a_time_server_the_kernel_stands_in() -> None:
    assert check_clock((True, 0.01), None, None).fact is Fact.CLOCK_OK
    assert "--time-server none" in check_clock((True, 0.01), None, None).what
    assert check_clock((True, 120.0), None, None).fact is Fact.CLOCK_UNCHECKED
    assert check_clock(None, None, SERVER).fact is Fact.CLOCK_UNCHECKED


# -- SNTP: fixed bytes, then a fake server on loopback

def test_ntp_timestamps_with_fixed_bytes() -> None:
    assert to_ntp(0.0) == bytes.fromhex("83aa7e8000000000")  # 1970 is 2208988800 s after 1900
    assert from_ntp(bytes.fromhex("83aa7e8080000000")) == 0.5
    # 2024-10-03 22:26:44.25 UTC is 0xeaa998a4 s after 1900, and a quarter (0x40000000)
    assert from_ntp(bytes.fromhex("eaa998a440000000")) == 1_727_994_404.25
    # the top bit clear: era 1, from 2036-02-07 06:28:16 UTC
    assert time.gmtime(from_ntp(bytes(8)))[:6] == (2036, 2, 7, 6, 28, 16)
    assert from_ntp(to_ntp(NOW + 0.125)) == NOW + 0.125


def test_offset_from_the_four_timestamps() -> None:
    assert clock_offset(0.0, 105.0, 106.0, 3.0) == 104.0  # the server is 104 s ahead
    assert clock_offset(100.0, 60.5, 60.5, 101.0) == -40.0  # this clock is 40 s ahead


def reply(request: bytes, t2: float, t3: float, *, first: int = 0x24, stratum: int = 2,
          origin: bytes | None = None) -> bytes:
    """A server's reply (leap 0, version 4, mode 4 unless `first` says otherwise)."""
    echoed = request[40:48] if origin is None else origin
    return bytes([first, stratum, 6, 0xEC]) + bytes(20) + echoed + to_ntp(t2) + to_ntp(t3)


def test_parse_reply_reads_t2_t3_and_refuses_anything_else() -> None:
    request = sntp_request(NOW)
    assert request[0] == 0x23 and len(request) == 48 and from_ntp(request[40:48]) == NOW
    assert parse_reply(reply(request, NOW + 1, NOW + 2), request) == (NOW + 1, NOW + 2)
    bad = {
        "short": reply(request, NOW, NOW)[:47],
        "not a server": reply(request, NOW, NOW, first=0x23),
        "kiss": reply(request, NOW, NOW, stratum=0),
        "not synchronized": reply(request, NOW, NOW, first=0xE4),
        "another request": reply(request, NOW, NOW, origin=to_ntp(NOW - 1)),
        "no transmit": reply(request, NOW, NOW)[:40] + bytes(8),
    }
    for why, data in bad.items():
        with pytest.raises(SntpError):
            parse_reply(data, request)
        assert why


@pytest.fixture
def sntp_server() -> Iterator[Callable[[float, list[bytes]], int]]:
    """A fake SNTP server on 127.0.0.1: answers one request with `strays`
    first, then a reply whose clock is `ahead` seconds ahead of the request's."""
    socks: list[socket.socket] = []

    def start(ahead: float, strays: list[bytes]) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        socks.append(sock)

        def serve() -> None:
            request, peer = sock.recvfrom(512)
            t1 = from_ntp(request[40:48])
            for stray in strays:
                sock.sendto(stray, peer)
            sock.sendto(reply(request, t1 + ahead, t1 + ahead), peer)

        threading.Thread(target=serve, daemon=True).start()
        return int(sock.getsockname()[1])

    yield start
    for sock in socks:
        sock.close()


def test_query_offset_against_a_fake_server_on_loopback(
        sntp_server: Callable[[float, list[bytes]], int]) -> None:
    made: list[tuple[int, int]] = []

    def factory(family: int, kind: int) -> socket.socket:
        made.append((family, kind))
        return socket.socket(family, kind)

    port = sntp_server(100.0, [])
    offset = query_offset("127.0.0.1", port=port, timeout=2.0, socket_factory=factory,
                          now=lambda: NOW)
    assert offset == pytest.approx(100.0, abs=1e-5)
    assert made == [(socket.AF_INET, socket.SOCK_DGRAM)]
    stray = reply(sntp_request(NOW - 5), NOW, NOW)  # an answer to some other request
    port = sntp_server(-42.0, [b"junk", stray])
    assert query_offset("127.0.0.1", port=port, now=lambda: NOW) == pytest.approx(-42.0,
                                                                                  abs=1e-5)


def test_query_offset_is_none_without_an_answer() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = int(silent.getsockname()[1])
        assert query_offset("127.0.0.1", port=port, timeout=0.2) is None
    assert query_offset("127.0.0.1", port=port, timeout=2.0) is None  # refused: nobody there
    assert query_offset("no-such-host.invalid", timeout=0.2) is None


# -- point 3: the enrollment states only what this device recorded

def test_a_profile_that_opened_before_and_now_fails_is_likely_revoked(tmp_path: Path) -> None:
    store = store_with_profile(tmp_path, replace(ENROLLMENT, expires=EXPIRES))
    assert store.record_opened("srv", NOW - 3600)
    findings = run(store, knock=Fact.SHUT, now=EXPIRES + 86_400)
    assert findings[1].fact is Fact.IN_USE and "pending" not in findings[1].what.replace(
        "no longer pending", "")
    line = verdict(findings)
    assert line.startswith("fix: revoked or re-keyed on the server, most likely: this "
                           "profile opened the port at 2027-01-15T06:43:20Z and the clock "
                           "checked fine")
    assert "spa-server clients shows alice as revoked" in line


def test_a_pending_enrollment_is_pending_then_expired_until_it_opens(tmp_path: Path) -> None:
    store = store_with_profile(tmp_path, replace(ENROLLMENT, expires=EXPIRES))
    early = run(store, knock=Fact.SHUT)
    assert early[1].fact is Fact.PENDING and "pending until 2027-01-15T08:00:00Z" in early[1].what
    assert verdict(early).startswith("fix: revoked or unreachable: the server took no first "
                                     "knock of this pending enrollment")
    late = run(store, knock=Fact.SHUT, now=EXPIRES + 100)
    assert late[1].fact is Fact.EXPIRED and late[1].ok is None
    line = verdict(late)
    assert line.startswith("fix: expired, revoked or unreachable")
    assert line.index("spa-server rotate alice") < line.index("UDP port 62201")
    opened = run(store, now=EXPIRES + 100)
    assert opened[1].fact is Fact.IN_USE and verdict(opened).startswith("all good")
    assert run(store, knock=Fact.SHUT, now=EXPIRES + 200)[1].fact is Fact.IN_USE


def test_a_never_opened_plain_profile_names_no_expiry(tmp_path: Path) -> None:
    findings = run(store_with_profile(tmp_path), knock=Fact.SHUT)
    assert Fact.IN_USE not in facts(findings) and Fact.EXPIRED not in facts(findings)
    line = verdict(findings)
    assert line.startswith("fix: revoked, not enrolled, or unreachable: this device has no "
                           "record of this profile opening the port")
    assert "expired" not in line


def test_the_record_belongs_to_one_enrollment(tmp_path: Path) -> None:
    store = store_with_profile(tmp_path)
    assert store.record_opened("srv", NOW)
    store.save("srv", ENROLLMENT)  # the same URI again: still the same enrollment
    assert store.last_opened("srv") == int(NOW)
    store.save("srv", replace(ENROLLMENT, secret=os.urandom(32)))  # rotated: a new one
    assert store.last_opened("srv") is None
    store.record_opened("srv", NOW)
    store.forget("srv")
    assert store.last_opened("srv") is None
    assert list((tmp_path / "profiles").iterdir()) == []


def test_a_failed_record_never_fails(tmp_path: Path) -> None:
    assert ProfileStore(tmp_path / "missing").record_opened("srv", NOW) is False
    store = store_with_profile(tmp_path)
    (tmp_path / "profiles" / "srv.opened").write_text("last_opened = 'soon'\n")
    assert store.last_opened("srv") is None


# -- point 1: --otp, and no advice names an option the command lacks

def test_an_authenticator_profile_without_a_code_says_to_pass_otp(tmp_path: Path) -> None:
    store = store_with_profile(tmp_path, replace(ENROLLMENT, otp=True))
    findings = run(store, knock=Fact.NOT_SENT)
    assert findings[-1].ok is None
    assert verdict(findings) == ("no knock sent: run spa-client doctor srv --otp CODE (the code "
                                 "your app shows now)")
    shut = verdict(run(store, knock=Fact.SHUT))
    assert "authenticator code was wrong or stale" in shut


def doctor_options() -> set[str]:
    import typer

    from spa_client import cli

    app = typer.Typer()
    app.command()(cli.doctor)
    command = typer.main.get_command(app)
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


def test_doctor_has_otp_and_time_server() -> None:
    import inspect

    from spa_client import cli

    assert {"--otp", "--time-server", "--service"} <= doctor_options()
    default = inspect.signature(cli.doctor).parameters["time_server"].default
    assert default == DEFAULT_TIME_SERVER


KERNELS: list[tuple[bool, float] | None] = [None, (True, 0.01), (False, 16.0), (True, 120.0)]
CLOCKS: list[tuple[str | None, float | None]] = [
    (SERVER, 0.2), (SERVER, -95.0), (SERVER, 45.0), (SERVER, None), (None, None)]


def every_run(tmp_path: Path) -> Iterator[list[Finding]]:
    """Every combination of profile, record, clock and knock outcome."""
    for i, (otp, expires, was_opened) in enumerate(itertools.product(
            (False, True), (None, EXPIRES), (False, True))):
        store = store_with_profile(tmp_path / str(i), replace(ENROLLMENT, otp=otp,
                                                              expires=expires))
        for (server, offset), kernel, fact, now in itertools.product(
                CLOCKS, KERNELS, (Fact.OPENED, Fact.OPEN_ALREADY, Fact.UNPROBED, Fact.SHUT,
                                  Fact.NOT_SENT), (NOW, EXPIRES + 1.0)):
            store._forget_opened("srv")
            if was_opened:
                store.record_opened("srv", NOW - 60)
            yield run(store, kernel=kernel, offset=offset, server=server, knock=fact, now=now)
    yield diagnose(ProfileStore(tmp_path / "none"), "srv", resolve=resolve,
                   clock=lambda: None, time_offset=lambda: None, time_server=None,
                   knock=knocks(Fact.OPENED), now=NOW)
    bad = store_with_profile(tmp_path / "bad")
    (tmp_path / "bad" / "profiles" / "srv.toml").chmod(0o644)
    yield run(bad)
    yield diagnose(store_with_profile(tmp_path / "partly"), "srv", resolve=resolve,
                   clock=lambda: None, time_offset=lambda: None, time_server=None,
                   knock=lambda profile: Knocked(Fact.OPENED, SSH, 0.003,
                                                 opened=("203.0.113.10",),
                                                 shut=("2001:db8::10",)), now=NOW)

    def unresolvable(host: str, port: int) -> str:
        raise OSError("cannot resolve knock.example.org")

    yield diagnose(store_with_profile(tmp_path / "dns"), "srv", resolve=unresolvable,
                   clock=lambda: None, time_offset=lambda: None, time_server=None,
                   knock=knocks(Fact.OPENED), now=NOW)


def test_every_string_names_only_options_and_commands_that_exist(tmp_path: Path) -> None:
    import typer

    import spa.cli
    from spa_client import cli, knock

    options = doctor_options()
    server_commands = set(typer.main.get_command(spa.cli.app).commands)  # type: ignore[attr-defined]
    texts = set()
    for findings in every_run(tmp_path):
        texts |= {f.what for f in findings} | {f.fix for f in findings} | {verdict(findings)}
    with pytest.raises(knock.KnockError) as raised:  # pytest's stdin is no terminal
        cli._otp_code(None, True, profile_name="srv")
    texts.add(str(raised.value))
    for text in texts:
        assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) <= options, text
        assert set(re.findall(r"spa-client ([a-z-]+)", text)) <= set(cli._COMMANDS), text
        assert set(re.findall(r"spa-server ([a-z-]+)", text)) <= server_commands, text
    assert any("--otp CODE" in text for text in texts)


# -- point 4: the verdict follows from the findings

def test_the_verdict_tells_one_story(tmp_path: Path) -> None:
    for findings in every_run(tmp_path):
        line = verdict(findings)
        fail = any(f.ok is False for f in findings)
        assert line.startswith("fix: ") == fail, (line, findings)
        all_ok = all(f.ok for f in findings)
        opened = findings[-1].fact is Fact.OPENED
        assert line.startswith("all good") == (all_ok and opened), line
        clock = next((f for f in findings if f.what.startswith("clock:")), None)
        measured_ok = clock is not None and clock.fact is Fact.CLOCK_OK
        assert ("clock first" in line) == (clock is not None and clock.fact is Fact.CLOCK_OFF)
        if measured_ok:
            assert "could not check the clock" not in line and "set this clock" not in line
        if Fact.IN_USE in facts(findings) and Fact.SHUT in facts(findings):
            assert line.startswith(("fix: revoked", "fix: the clock first")), line


def test_a_bad_profile_stops_before_any_packet(tmp_path: Path) -> None:
    store = store_with_profile(tmp_path)
    path = tmp_path / "profiles" / "srv.toml"
    path.chmod(0o644)
    sent: list[Profile] = []

    def knock(profile: Profile) -> Knocked:
        sent.append(profile)
        return Knocked(Fact.OPENED, SSH)

    findings = diagnose(store, "srv", resolve=resolve, clock=lambda: (True, 0.0),
                        time_offset=lambda: 0.0, time_server=SERVER, knock=knock, now=NOW)
    assert len(findings) == 1 and findings[0].ok is False
    assert "chmod 600" in verdict(findings)
    assert sent == []
    missing = diagnose(ProfileStore(tmp_path / "none"), "elsewhere", resolve=resolve,
                       clock=lambda: (True, 0.0), time_offset=lambda: 0.0,
                       time_server=SERVER, knock=knock, now=NOW)
    assert "enroll" in verdict(missing)


def test_an_unresolvable_name_stops_before_the_clock_and_the_knock(tmp_path: Path) -> None:
    def fail(host: str, port: int) -> str:
        raise OSError("cannot resolve knock.example.org")

    asked: list[str] = []

    def offset() -> float:
        asked.append("time")
        return 0.0

    findings = diagnose(store_with_profile(tmp_path), "srv", resolve=fail,
                        clock=lambda: (True, 0.0), time_offset=offset, time_server=SERVER,
                        knock=knocks(Fact.OPENED), now=NOW)
    assert [f.ok for f in findings] == [True, False]
    assert "DNS" in verdict(findings) and asked == []


def test_a_port_open_before_the_knock_tested_no_knock(tmp_path: Path) -> None:
    findings = run(store_with_profile(tmp_path), knock=Fact.OPEN_ALREADY)
    assert "is open already, before any knock" in findings[-1].what
    assert verdict(findings).startswith("the port is open already, so this run tested no "
                                        "knock: to test a knock, close it (spa-client close "
                                        "ssh srv)")
    assert ProfileStore(tmp_path).last_opened("srv") is None  # it proves nothing of the key
