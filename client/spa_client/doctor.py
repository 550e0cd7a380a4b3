"""`spa-client doctor HOST`: why does my knock not open the port?

The server never answers, so a client cannot ask it what went wrong.  The
doctor checks, in order, what it can see from here: the profile (present,
0600, readable), what this device knows of the enrollment, the server's name,
this machine's clock, then sends a real knock and probes the port.

Invariants:
- Each check is a `Finding` whose `Fact` says what was measured; the checks
  take their I/O (name lookup, kernel clock, time server, knock, `now`) as
  arguments, so tests fake them.  The SNTP parsing and arithmetic are pure.
- The clock is blamed only when a time server measured it more than `WINDOW`
  (the server's default, 30 s) off.  A clock that could not be measured is a
  caution ("could not check"), never the thing to fix first; a measured clock
  within the window is fine whatever the kernel's "unsynchronized" flag says.
- The enrollment line states only what this device recorded: a profile that
  opened its port before (`ProfileStore.record_opened`) is not pending; one
  with `exp=` that never did is pending until then, or expired after.
- `verdict` tells one story from the findings: never "all good" beside a FAIL,
  never the clock when it measured fine; a failed knock of a profile that
  opened before leads with "revoked".  No advice names an option that the
  `doctor` command lacks (a unit test checks every string).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from spa.clitools import format_utc
from spa.core.uri import ServiceRef
from spa.core.verify import DEFAULT_WINDOW
from spa_client.profile import Profile, ProfileError, ProfileStore

WINDOW = DEFAULT_WINDOW  # seconds: the server's default window for a knock's clock
KNOCK_TIMEOUT = 3.0  # seconds the doctor's knock waits for the port to open
STA_UNSYNC = 0x0040  # linux/timex.h: the kernel's clock is not synchronized



class Fact(Enum):
    """What one check found; `OK_OF` maps it to ok (True), FAIL (False) or
    could not tell / caution (None)."""

    PROFILE_OK = "profile ok"
    PROFILE_BAD = "profile bad"
    IN_USE = "opened before"
    PENDING = "pending"
    EXPIRED = "expired"
    NAME_OK = "name ok"
    NAME_BAD = "name bad"
    CLOCK_OK = "clock ok"
    CLOCK_OFF = "clock off"
    CLOCK_UNCHECKED = "clock unchecked"
    OPENED = "opened"
    PARTLY_OPENED = "opened at some addresses"
    OPEN_ALREADY = "open already"
    UNPROBED = "sent, cannot probe"
    SHUT = "did not open"
    NOT_SENT = "not sent"


OK_OF: dict[Fact, bool | None] = {
    Fact.PROFILE_OK: True, Fact.PROFILE_BAD: False, Fact.IN_USE: True, Fact.PENDING: True,
    Fact.EXPIRED: None, Fact.NAME_OK: True, Fact.NAME_BAD: False, Fact.CLOCK_OK: True,
    Fact.CLOCK_OFF: False, Fact.CLOCK_UNCHECKED: None, Fact.OPENED: True,
    Fact.PARTLY_OPENED: None,
    Fact.OPEN_ALREADY: True, Fact.UNPROBED: None, Fact.SHUT: False, Fact.NOT_SENT: None,
}


@dataclass(frozen=True, slots=True)
class Finding:
    fact: Fact
    what: str
    fix: str = ""  # for a FAIL: what to do; for a caution: what to keep in mind

    @property
    def ok(self) -> bool | None:
        return OK_OF[self.fact]


@dataclass(frozen=True, slots=True)
class Knocked:
    """What the knock edge saw: OPENED, OPEN_ALREADY (before any knock),
    UNPROBED (UDP), SHUT or NOT_SENT (no authenticator code)."""

    fact: Fact
    service: ServiceRef
    took: float | None = None  # seconds from the knock to the open port (OPENED)
    opened: tuple[str, ...] = ()  # the server's addresses that opened (OPENED)
    shut: tuple[str, ...] = ()  # those knocked that did not (a family that is not through)


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("pad", ctypes.c_byte * 200)]


def kernel_clock() -> tuple[bool, float] | None:
    """(synchronized, max error in seconds) from adjtimex(2) (read only), or
    None where the call is not available (not Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        timex = _Timex()
        if libc.adjtimex(ctypes.byref(timex)) < 0:
            return None
    except (OSError, AttributeError):
        return None
    return (not timex.status & STA_UNSYNC, timex.maxerror / 1e6)


# -- checks: pure ---------------------------------------------------------------




def check_profile(store: ProfileStore, host: str) -> tuple[Finding, Profile | None]:
    try:
        profile = store.find(host)
    except ProfileError as exc:
        return Finding(Fact.PROFILE_BAD, f"profile: {exc}", str(exc)), None
    e = profile.enrollment
    return Finding(Fact.PROFILE_OK, f"profile {profile.name!r}: client {e.client} at "
                   f"{e.host}:{e.port} (0600)"), profile


def check_enrollment(profile: Profile, opened: float | None, now: float) -> Finding | None:
    """What this device knows: when the profile last opened its port, else
    (exp= in its URI) whether its first knock is still due."""
    expires = profile.enrollment.expires
    if opened is not None:
        return Finding(Fact.IN_USE, "enrollment: in use: this profile last opened its port at "
                       f"{format_utc(opened)}"
                       + (", so it is no longer pending" if expires else ""))
    if expires is None:
        return None
    if now < expires:
        return Finding(Fact.PENDING, f"enrollment: pending until {format_utc(expires)}: its first "
                       "knock must reach the server by then")
    return Finding(Fact.EXPIRED, f"enrollment: expired at {format_utc(expires)}, unless this "
                   "device knocked before then (none recorded here)",
                   "the enrollment may have expired: ask your admin for a new one "
                   f"(spa-server rotate {profile.enrollment.client})")


def check_clock(kernel: tuple[bool, float] | None, offset: float | None,
                server: str | None) -> Finding:
    """Measured `offset` (seconds, from `server`) decides; the kernel's view
    only adds a fact, or stands in (as ok or caution) when none was measured."""
    unsynced = kernel is not None and not kernel[0]
    flag = "; the kernel says it is not synchronized (no NTP)" if unsynced else ""
    if offset is not None:
        if abs(offset) > WINDOW:
            side = "behind" if offset > 0 else "ahead of"
            return Finding(Fact.CLOCK_OFF, f"clock: {abs(offset):.0f} s {side} {server}, more "
                           f"than the server's {WINDOW:.0f} s window{flag}",
                           "set this clock right: turn on automatic time (timedatectl set-ntp "
                           "true, or the phone's 'automatic date & time'); the server refuses "
                           "every knock from it as stale, without a word")
        return Finding(Fact.CLOCK_OK, f"clock: {offset:+.3f} s from {server}, within the "
                       f"server's {WINDOW:.0f} s window" + (flag and f"{flag}, but it is close "
                                                            "enough for knocking"))
    unmeasured = f"no answer from {server}" if server else "--time-server none"
    return _unmeasured_clock(kernel, unmeasured)


def _unmeasured_clock(kernel: tuple[bool, float] | None, unmeasured: str) -> Finding:
    caution = (f"could not check the clock ({unmeasured}): compare it with a correct one; "
               f"the server refuses knocks from a clock more than {WINDOW:.0f} s off")
    if kernel is None:
        return Finding(Fact.CLOCK_UNCHECKED, f"clock: not measured ({unmeasured}), and this "
                       "system does not say whether it is synchronized", caution)
    synced, max_error = kernel
    if not synced:
        return Finding(Fact.CLOCK_UNCHECKED, f"clock: not measured ({unmeasured}), and the "
                       "kernel says it is not synchronized (no NTP)", caution)
    if max_error > WINDOW:
        return Finding(Fact.CLOCK_UNCHECKED, f"clock: not measured ({unmeasured}); the kernel "
                       f"says synchronized, but its error may be {max_error:.0f} s", caution)
    return Finding(Fact.CLOCK_OK, f"clock: synchronized, says the kernel (error at most "
                   f"{max_error:.3f} s); not measured ({unmeasured})")


def check_knock(result: Knocked, profile: Profile) -> Finding:
    ref = result.service
    what = f"knock: {ref.name} ({ref.protocol}/{ref.port})"
    if result.fact is Fact.OPENED:
        where = f" at {' and '.join(result.opened)}" if result.opened else ""
        line = f"{what} opened in {(result.took or 0) * 1000:.0f} ms{where}"
        if not result.shut:
            return Finding(Fact.OPENED, line)
        shut = " and ".join(result.shut)
        return Finding(Fact.PARTLY_OPENED, f"{line}; {shut} did not open",
                       f"ssh may try {shut} first and wait: check this machine's route to "
                       f"it, or let ssh connect through spa-client (spa-client ssh-config "
                       f"{profile.name}), which connects to the address that opened")
    if result.fact is Fact.OPEN_ALREADY:
        return Finding(Fact.OPEN_ALREADY, f"{what} is open already, before any knock (a lease "
                       "this address holds, or no firewall): no knock was needed, so none "
                       "was tested", f"to test a knock, close it (spa-client close {ref.name} "
                       f"{profile.name}) and run spa-client doctor {profile.name} again")
    if result.fact is Fact.UNPROBED:
        return Finding(Fact.UNPROBED, f"{what}: sent; a UDP port cannot be probed from here",
                       f"see whether {ref.name} answers now")
    if result.fact is Fact.NOT_SENT:
        return Finding(Fact.NOT_SENT, f"{what}: not sent: profile {profile.name!r} needs a "
                       "code from your authenticator app",
                       f"run spa-client doctor {profile.name} --otp CODE (the code your app "
                       "shows now)")
    return Finding(Fact.SHUT, f"{what} did not open within {KNOCK_TIMEOUT:.0f} s")


def why_shut(profile: Profile, enrollment: Finding | None, clock: Finding,
             opened: float | None) -> str:
    """The likely causes of a knock that did not open, in the order the
    findings support (a clock measured off is `verdict`'s business)."""
    e = profile.enrollment
    questions = (f"whether {e.client} is enrolled and not revoked (spa-server clients), "
                 f"whether the server runs, and whether UDP port {e.port} reaches it from "
                 "your network")
    if opened is not None:
        clock_ok = " and the clock checked fine" if clock.fact is Fact.CLOCK_OK else ""
        lead = (f"revoked or re-keyed on the server, most likely: this profile opened the port "
                f"at {format_utc(opened)}{clock_ok}, yet the server ignores it now; ask your admin "
                f"(spa-server clients shows {e.client} as revoked; after spa-server rotate "
                f"{e.client}, enroll its new URI); if it is active there, the server may be "
                f"down or UDP port {e.port} blocked from your network")
    elif enrollment is not None and enrollment.fact is Fact.EXPIRED:
        lead = (f"expired, revoked or unreachable: the first knock was due by "
                f"{format_utc(e.expires or 0)} and none is recorded here; ask your admin for a new "
                f"enrollment (spa-server rotate {e.client}); if it has not expired, ask "
                f"{questions}")
    elif enrollment is not None and enrollment.fact is Fact.PENDING:
        lead = ("revoked or unreachable: the server took no first knock of this pending "
                f"enrollment; ask your admin {questions}")
    else:
        lead = ("revoked, not enrolled, or unreachable: this device has no record of this "
                f"profile opening the port; ask your admin {questions}")
    code = "; or the authenticator code was wrong or stale: try a fresh one" if e.otp else ""
    caution = f"; also, {clock.fix}" if clock.fact is Fact.CLOCK_UNCHECKED else ""
    return lead + code + caution


def diagnose(store: ProfileStore, host: str, *,
             resolve: Callable[[str, int], str],
             clock: Callable[[], tuple[bool, float] | None],
             time_offset: Callable[[], float | None],
             time_server: str | None,
             knock: Callable[[Profile], Knocked],
             now: float) -> list[Finding]:
    """Every check that applies, in order; stops where later ones cannot run.
    `time_offset()` is this clock's offset from `time_server` (None: no
    answer; `time_server` None: not asked).  Records a knock that opened."""
    first, profile = check_profile(store, host)
    if profile is None:
        return [first]
    opened = store.last_opened(profile.name)
    enrollment = check_enrollment(profile, opened, now)
    e = profile.enrollment
    try:
        name = Finding(Fact.NAME_OK, f"name: {e.host} is {resolve(e.host, e.port)}")
    except Exception as exc:  # resolve raises KnockError; say it, whatever it is
        name = Finding(Fact.NAME_BAD, f"name: {exc}", f"check the server's name ({e.host}) "
                       "or your DNS")
        return [f for f in (first, enrollment, name) if f is not None]
    clocked = check_clock(clock(), time_offset(), time_server)
    result = knock(profile)
    if result.fact is Fact.OPENED:  # (at one address at least)
        store.record_opened(profile.name, now)
        enrollment = check_enrollment(profile, now, now)
    knocked = check_knock(result, profile)
    if knocked.fact is Fact.SHUT:
        knocked = Finding(Fact.SHUT, knocked.what, why_shut(profile, enrollment, clocked, opened))
    return [f for f in (first, enrollment, name, clocked, knocked) if f is not None]


KNOCK_FACTS = (Fact.OPENED, Fact.PARTLY_OPENED, Fact.OPEN_ALREADY, Fact.UNPROBED, Fact.SHUT,
               Fact.NOT_SENT)
_LEAD = {
    Fact.PARTLY_OPENED: "the knock opened the port at some of the server's addresses only: ",
    Fact.OPEN_ALREADY: "the port is open already, so this run tested no knock: ",
    Fact.UNPROBED: "the knock was sent, but a UDP port cannot be probed: ",
    Fact.NOT_SENT: "no knock sent: ",
}


def verdict(findings: list[Finding]) -> str:
    """One line that follows from the findings: "fix: ..." exactly when one
    of them is a FAIL (the clock first only when measured off), "all good"
    only when every check ran and passed."""
    stop = next((f for f in findings if f.fact in (Fact.PROFILE_BAD, Fact.NAME_BAD)), None)
    if stop is not None:
        return f"fix: {stop.fix}"
    knocked = next((f for f in findings if f.fact in KNOCK_FACTS), None)
    clock = next((f for f in findings if f.fact is Fact.CLOCK_OFF), None)
    if clock is not None:
        opened = knocked is not None and knocked.ok is True
        return (f"fix: the clock first: {clock.fix}"
                + (" (this server let the knock in: its window is wider)" if opened
                   else "; then run the doctor again"))
    if knocked is not None and knocked.fact is Fact.SHUT:
        return f"fix: {knocked.fix}"
    cautions = [f.fix for f in findings if f.ok is None and f is not knocked]
    still = "; still: " + "; ".join(cautions) if cautions else ""
    if knocked is None or knocked.fact is Fact.OPENED:
        return ("all checks passed that could run" + still if cautions
                else "all good: the knock opened the port")
    return _LEAD[knocked.fact] + knocked.fix + still
