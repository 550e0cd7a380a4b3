"""spa-client doctor's findings, with a faked clock and network."""

from __future__ import annotations

import os
from pathlib import Path

from spa.core.uri import Enrollment, ServiceRef
from spa_client.doctor import check_clock, diagnose, verdict
from spa_client.profile import Profile, ProfileStore

ENROLLMENT = Enrollment("knock.example.org", 62201, bytes(16), "alice", os.urandom(32),
                        (ServiceRef("ssh", "tcp", 22),))


def store_with_profile(tmp_path: Path) -> ProfileStore:
    store = ProfileStore(tmp_path)
    store.save("srv", ENROLLMENT)
    return store


def resolve(host: str, port: int) -> str:
    return "203.0.113.10"


def test_all_good(tmp_path: Path) -> None:
    findings = diagnose(store_with_profile(tmp_path), "srv", resolve=resolve,
                        clock=lambda: (True, 0.05), knock=lambda p: (True, "opened in 3 ms"))
    assert [f.ok for f in findings] == [True, True, True, True]
    assert verdict(findings) == "all good: the knock opened the port"


def test_an_unsynchronized_clock_is_blamed_first_when_the_knock_fails(tmp_path: Path) -> None:
    findings = diagnose(store_with_profile(tmp_path), "srv", resolve=resolve,
                        clock=lambda: (False, 16.0), knock=lambda p: (False, "did not open"))
    line = verdict(findings)
    assert line.startswith("fix: the clock first: turn on automatic time")
    assert "30 s" in line and "revoked" in line
    # the same clock with a knock that works is only a caution
    findings = diagnose(store_with_profile(tmp_path), "srv", resolve=resolve,
                        clock=lambda: (False, 16.0), knock=lambda p: (True, "opened"))
    assert verdict(findings).startswith("all checks passed that could run; still:")


def test_a_clock_with_a_large_error_fails() -> None:
    assert check_clock(lambda: (True, 120.0)).ok is False
    assert check_clock(lambda: None).ok is None


def test_a_bad_profile_stops_before_any_packet(tmp_path: Path) -> None:
    store = store_with_profile(tmp_path)
    path = tmp_path / "profiles" / "srv.toml"
    path.chmod(0o644)
    sent: list[Profile] = []

    def knock(profile: Profile) -> tuple[bool, str]:
        sent.append(profile)
        return True, ""

    findings = diagnose(store, "srv", resolve=resolve, clock=lambda: (True, 0.0), knock=knock)
    assert len(findings) == 1 and findings[0].ok is False
    assert "chmod 600" in verdict(findings)
    assert sent == []
    missing = diagnose(ProfileStore(tmp_path / "none"), "elsewhere", resolve=resolve,
                       clock=lambda: (True, 0.0), knock=lambda p: (True, ""))
    assert "enroll" in verdict(missing)


def test_an_unresolvable_name_stops_before_the_knock(tmp_path: Path) -> None:
    def fail(host: str, port: int) -> str:
        raise OSError("cannot resolve knock.example.org")

    findings = diagnose(store_with_profile(tmp_path), "srv", resolve=fail,
                        clock=lambda: (True, 0.0), knock=lambda p: (True, ""))
    assert [f.ok for f in findings] == [True, False]
    assert "DNS" in verdict(findings)


def test_a_pending_enrollment_past_its_time_is_named_as_the_likely_cause(
        tmp_path: Path) -> None:
    from dataclasses import replace

    store = ProfileStore(tmp_path)
    store.save("srv", replace(ENROLLMENT, expires=1_800_000_000))
    early = diagnose(store, "srv", resolve=resolve, clock=lambda: (True, 0.0),
                     knock=lambda p: (True, "opened"), now=1_799_999_000)
    assert early[1].ok is True and "due by 2027-01-15" in early[1].what
    late = diagnose(store, "srv", resolve=resolve, clock=lambda: (True, 0.0),
                    knock=lambda p: (False, "did not open"), now=1_800_000_100)
    assert late[1].ok is None
    assert verdict(late) == ("fix: ask your admin for a new enrollment (spa-server rotate "
                             "alice) if knocks do not open")
